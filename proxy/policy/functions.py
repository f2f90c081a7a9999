"""Which functions and operators a restricted role may call.

Strategy: an allowlist, not a denylist. A function is allowed only when it is a built-in of
`pg_catalog` that computes on its arguments alone (string, number, date/time, aggregate,
JSON/array builders, ...): a user-defined function can read any table internally, and a handful
of built-ins run SQL given as text or reach outside the table data. Those built-ins are also
listed in `DENIED` with a specific explanation, so the refusal can say why. Names are compared as
PostgreSQL stores them (the parser already folded unquoted names to lower case); a name qualified
with any schema but `pg_catalog` is never allowed. JSON/array/XML builders are in the allowlist:
whether their arguments may contain protected columns is the expression rule's business.

One denied built-in has a narrow exception: `set_config(name, value, is_local)` is allowed when
the analysis saw every call's arguments as constants (a string literal name, a literal or `$n`
value and flag) and every name is in `SET_CONFIG_SETTINGS` (see there for why so few).
`current_setting` only reads a setting and is allowed whatever it names: reading cannot change
what Topeng sees or masks, and SHOW and pg_settings read the same values.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "ALLOWED_FUNCTIONS",
    "ALLOWED_OPERATORS",
    "DENIED",
    "SET_CONFIG_SETTINGS",
    "function_verdict",
    "is_set_config",
    "operator_ok",
    "set_config_verdict",
]

_AGGREGATES: Final = """
count sum avg min max bool_and bool_or every array_agg string_agg json_agg jsonb_agg
json_object_agg jsonb_object_agg stddev stddev_pop stddev_samp variance var_pop var_samp
percentile_cont percentile_disc mode rank dense_rank percent_rank cume_dist row_number ntile
lag lead first_value last_value nth_value bit_and bit_or bit_xor corr covar_pop covar_samp
regr_avgx regr_avgy regr_count regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy
any_value xmlagg range_agg range_intersect_agg
"""

_STRINGS: Final = """
upper lower initcap length char_length character_length octet_length bit_length concat
concat_ws substr substring left right lpad rpad ltrim rtrim btrim trim replace translate
reverse repeat position strpos split_part starts_with format quote_ident quote_literal
quote_nullable md5 sha224 sha256 sha384 sha512 encode decode to_hex ascii chr
regexp_replace regexp_match regexp_matches regexp_split_to_array regexp_split_to_table
regexp_like regexp_count regexp_instr regexp_substr string_to_array string_to_table
array_to_string normalize unistr overlay text_pattern_ops casefold
"""

_NUMBERS: Final = """
abs ceil ceiling floor round trunc sign sqrt cbrt power pow exp ln log log10 mod div pi
degrees radians random random_normal setseed width_bucket gcd lcm factorial scale
min_scale trim_scale sin cos tan asin acos atan atan2 sind cosd tand asind acosd atand
atan2d sinh cosh tanh asinh acosh atanh to_char to_number to_date to_timestamp numeric
int2 int4 int8 float4 float8 text varchar bpchar bool
"""

_TIME: Final = """
now current_timestamp current_date current_time localtime localtimestamp clock_timestamp
statement_timestamp transaction_timestamp timeofday date_part date_trunc date_bin extract
age make_date make_time make_timestamp make_timestamptz make_interval justify_days
justify_hours justify_interval isfinite to_timestamp date_add date_subtract
"""

_CONDITIONAL: Final = """
coalesce nullif greatest least num_nulls num_nonnulls
"""

_BUILDERS: Final = """
json_build_object jsonb_build_object json_build_array jsonb_build_array to_json to_jsonb
row_to_json array_to_json json_object jsonb_object jsonb_set jsonb_insert jsonb_strip_nulls
json_strip_nulls jsonb_pretty json_typeof jsonb_typeof json_array_length jsonb_array_length
json_extract_path json_extract_path_text jsonb_extract_path jsonb_extract_path_text
json_array_elements jsonb_array_elements json_array_elements_text jsonb_array_elements_text
json_each jsonb_each json_each_text jsonb_each_text json_object_keys jsonb_object_keys
jsonb_path_query jsonb_path_exists jsonb_path_match jsonb_path_query_array
jsonb_path_query_first array_append array_prepend array_cat array_length array_lower
array_upper array_ndims array_dims array_position array_positions array_remove
array_replace cardinality unnest generate_series generate_subscripts array_fill
xmlelement xmlforest xmlconcat xmlcomment xmlroot xmlparse xmlserialize
"""

_SESSION_INFO: Final = """
current_user session_user user current_role current_schema current_schemas
current_database current_catalog current_setting version pg_backend_pid
txid_current txid_current_if_assigned txid_snapshot_xmin txid_snapshot_xmax
pg_current_xact_id pg_current_xact_id_if_assigned xact_commit_timestamp
gen_random_uuid uuid_generate_v4 inet_client_addr inet_client_port
pg_typeof format_type col_description obj_description shobj_description
pg_get_userbyid has_table_privilege has_schema_privilege has_column_privilege
has_database_privilege has_function_privilege pg_table_is_visible pg_type_is_visible
pg_function_is_visible pg_get_expr pg_get_constraintdef pg_get_indexdef pg_encoding_to_char
pg_get_viewdef pg_get_function_result pg_get_function_arguments pg_get_function_identity_arguments
pg_get_triggerdef pg_get_ruledef pg_get_statisticsobjdef pg_get_partkeydef
pg_relation_is_publishable
pg_get_serial_sequence pg_size_pretty pg_total_relation_size pg_relation_size pg_table_size
pg_indexes_size pg_database_size pg_column_size to_regclass to_regtype to_regproc
to_regnamespace pg_is_in_recovery pg_postmaster_start_time array_to_string
"""

ALLOWED_FUNCTIONS: Final = frozenset(
    " ".join(
        (_AGGREGATES, _STRINGS, _NUMBERS, _TIME, _CONDITIONAL, _BUILDERS, _SESSION_INFO)
    ).split()
)
"""Built-in pg_catalog functions a restricted role may call (by unqualified name)."""

_DENIED_TEXT: Final = (
    (
        r"(query|table|schema|database|cursor)_to_xml(schema|_and_xmlschema)?|"
        r"(query|table|schema|database|cursor)_to_xmlschema",
        "runs SQL given as text, or dumps a whole table, past Topeng's analysis",
    ),
    (r"ts_stat", "runs SQL given as text past Topeng's analysis"),
    (r"dblink.*", "opens a connection that Topeng does not see"),
    (
        r"pg_read_file|pg_read_binary_file|pg_ls_.*|pg_stat_file",
        "reads files on the database server",
    ),
    (r"lo_.*|loread|lowrite|lo_import|lo_export", "reads or writes large objects"),
    (r"pg_notify", "sends notifications to other sessions"),
    (r"set_config", "changes session settings behind Topeng's back"),
    (r"pg_sleep.*", "holds a server connection idle"),
    (
        r"pg_terminate_backend|pg_cancel_backend|pg_reload_conf|pg_rotate_logfile|"
        r"pg_signal_backend|pg_promote|pg_switch_wal|pg_create_restore_point",
        "administers the server",
    ),
    (r"pg_stat_get_.*|pg_stat_statements.*", "shows other sessions' statements"),
    (r"nextval|setval", "changes a sequence"),
)
DENIED: Final = tuple((re.compile(p), why) for p, why in _DENIED_TEXT)
"""(pattern, why): functions refused with a specific explanation."""

ALLOWED_OPERATORS: Final = frozenset(
    """= <> != < > <= >= + - * / % ^ || ~~ !~~ ~~* !~~* ~ ~* !~ !~* @> <@ && -> ->> #> #>>
    ? ?| ?& @? @@ |/ ||/ @ & | # << >> <<| |>> &< &> -|- <-> #- !! ~=""".split()
)
"""Built-in operator symbols (the built-in functions behind them compute on their arguments)."""


SET_CONFIG_SETTINGS: Final = frozenset({"jit"})
"""Settings a restricted role may change with `set_config` (lower case, as PostgreSQL compares).

asyncpg turns `jit` off around its type introspection (`set_config('jit', 'off', false)`, then
`set_config('jit', $1, false)` to restore it). `jit` only decides whether the server compiles
expressions to machine code: the same rows and values come back either way, and it plays no part
in Topeng's analysis, so changing it cannot unmask anything. The role may also `SET jit`.

Why not more, although SET allows a few more parameters: set_config runs inside a query, once
per row it is evaluated for, so it can change a setting between the rows of one result. The
parameters that shape how values are written (DateStyle, IntervalStyle, TimeZone,
extra_float_digits, bytea_output, client_encoding, standard_conforming_strings) would then
change within a result Topeng is masking and a client is decoding; application_name is a
channel to other sessions; search_path, role and session_authorization change what names mean
and who runs the query (refused for SET too); timeouts and transaction settings have SET. No
client we know needs any of them through set_config. Keep this list a subset of the parameters
SET allows (`proxy.policy.decide.ALLOWED_SETTINGS` includes it)."""

_SET_CONFIG_NAMES: Final = frozenset({("set_config",), ("pg_catalog", "set_config")})


def is_set_config(name: tuple[str, ...]) -> bool:
    """Whether a called function name is pg_catalog's set_config (qualified or not)."""
    return name in _SET_CONFIG_NAMES


def set_config_verdict(settings: frozenset[str | None]) -> str | None:
    """None if every set_config call of a statement may run; else why not.

    `settings` holds, per call, the setting name it changes (lower case), or None when the call's
    arguments are not all constants.
    """
    if not settings or None in settings:
        return (
            "changes session settings behind Topeng's back; it is allowed only with constant "
            "arguments and a setting name of: " + ", ".join(sorted(SET_CONFIG_SETTINGS))
        )
    names = sorted(s for s in settings if s is not None and s not in SET_CONFIG_SETTINGS)
    if names:
        return (
            f"would change {', '.join(names)} behind Topeng's back; set_config may change only: "
            + ", ".join(sorted(SET_CONFIG_SETTINGS))
        )
    return None


def function_verdict(name: tuple[str, ...]) -> str | None:
    """None if a restricted role may call the function; else why not (a sentence fragment)."""
    if len(name) > 2 or (len(name) == 2 and name[0] != "pg_catalog"):
        return "is not a built-in function of pg_catalog"
    base = name[-1]
    for pattern, why in DENIED:
        if pattern.fullmatch(base):
            return why
    if base in ALLOWED_FUNCTIONS:
        return None
    return "is not in Topeng's list of built-in functions that only compute on their arguments"


def operator_ok(name: tuple[str, ...]) -> bool:
    """Whether a restricted role may use the operator (schema-qualified only with pg_catalog)."""
    if len(name) > 2 or (len(name) == 2 and name[0] != "pg_catalog"):
        return False
    return name[-1] in ALLOWED_OPERATORS
