"""Helpers for the policy tests that run against the real database through Topeng.

Strategy: the DBA-readable policy fixtures (tests/fixtures/policy/*.sql) are judged by the unit
suite against a synthetic catalog. Here the same cases run against the sample bank: `World`
creates, as superuser, the objects the synthetic catalog has beyond the bank schema (views,
materialized views, a partitioned table, a mixed-case table, public tables) and one login user
per fixture role and search_path, writes rules/bank.yaml extended with the fixtures' extra roles
(analyst, auditor), and removes it all again. Three runners (asyncpg, psycopg, psql) turn a
case into an `Outcome`: result sets, or the error with SQLSTATE, message, detail and hint, plus
every notice. `LeakMatcher` scans whatever came back for the raw protected values of the
sample database, also reversed, hex- and base64-encoded.
"""

from __future__ import annotations

import base64
import binascii
import decimal
import importlib.util
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import pglast
import psycopg
import yaml
from harness import BANK_RULES, REPO_ROOT, PgServer, TopengProcess

# -- the fixture cases -----------------------------------------------------------------------


def _load_fixture_module() -> ModuleType:
    """tests/unit/test_policy_fixtures.py, imported under a private name (not collected)."""
    path = REPO_ROOT / "tests" / "unit" / "test_policy_fixtures.py"
    spec = importlib.util.spec_from_file_location("topeng_policy_fixture_defs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


FIXTURES = _load_fixture_module()
CASES: list[Any] = list(FIXTURES.CASES)

#: Cases that cannot run against the real database, with the reason. Keep this short.
SKIP: dict[str, str] = {}

#: Known bugs by client ("*" for all): case title -> reason. Marked xfail(strict=True).
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def known_bug(client: str, case: Any) -> str | None:
    return KNOWN_BUGS.get((client, case.title)) or KNOWN_BUGS.get(("*", case.title))


#: SQL run as superuser after a case (direct or through Topeng) to undo what it created.
AFTER: dict[str, str] = {
    "dba may run DDL": "DROP TABLE IF EXISTS public.t",
}

#: Row limits of the roles in `World.rules` (max_rows_per_query).
ROW_LIMITS: dict[str, int | None] = {
    "agent": 50,
    "supervisor": 1000,
    "analyst": None,
    "auditor": None,
    "dba": None,
}


def expectation(case: Any) -> tuple[str, str | None, set[str]]:
    """(kind, sqlstate, masked column names) of a case's `expect` header."""
    words = case.expect.split()
    if words[0] == "refuse":
        return "refuse", words[1], set()
    if words[0] == "mask":
        return "mask", None, {n.strip() for n in " ".join(words[1:]).split(",")}
    return "allow", None, set()


def statements(sql: str) -> tuple[str, ...]:
    """The statements of a string, as PostgreSQL splits it (empty ones dropped)."""
    try:
        return tuple(s for s in pglast.split(sql) if s.strip())
    except pglast.parser.ParseError:
        return (sql,)


_READ_ONLY_NODES = {"SelectStmt", "VariableShowStmt"}


def stateful(sql: str) -> bool:
    """True unless every statement is a plain SELECT/SHOW (the session may be reused after)."""
    try:
        parsed = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return False
    for raw in parsed:
        stmt = raw.stmt
        name = type(stmt).__name__
        if name not in _READ_ONLY_NODES:
            return True
        if name == "SelectStmt" and (stmt.intoClause is not None or stmt.lockingClause):
            return True
    return False


_PARAM = re.compile(r"\$(\d+)")


def has_params(sql: str) -> bool:
    """Bind parameters ($1) outside a PREPARE (whose $1 is its own)."""
    return bool(_PARAM.search(sql)) and not sql.lstrip().upper().startswith("PREPARE")


def param_values(sql: str, niks: Sequence[str]) -> list[Any]:
    """Values for a case's $n: NIKs of real customers (an array for `= ANY($n)`)."""
    values: list[Any] = []
    numbers = sorted({int(n) for n in _PARAM.findall(sql)})
    for n in numbers:
        if re.search(rf"ANY\s*\(\s*\${n}\s*\)", sql, re.IGNORECASE):
            values.append([niks[0], niks[1]])
        else:
            values.append(niks[(n - 1) % len(niks)])
    return values


def to_psycopg(sql: str) -> str:
    """$n placeholders as psycopg's %(pN)s (and literal % doubled)."""
    return _PARAM.sub(lambda m: f"%(p{m.group(1)})s", sql.replace("%", "%%"))


# -- the world: objects, users, rules --------------------------------------------------------

_SQL_TYPES = {
    "int4": "integer",
    "int8": "bigint",
    "text": "text",
    "varchar": "varchar(100)",
    "bpchar": "char(16)",
    "date": "date",
    "timestamptz": "timestamptz",
    "numeric": "numeric(18,2)",
}

#: Relations of the synthetic catalog that the sample bank does not have, in creation order.
_EXTRA_DDL = """
CREATE TABLE public.notes (id bigint, customer_id bigint, body text);
INSERT INTO public.notes
    SELECT g, g, 'called about account ' || g FROM generate_series(1, 30) g;
CREATE TABLE public.notes_city (id bigint, city varchar(100));
INSERT INTO public.notes_city VALUES (1, 'Kota Bandung'), (2, 'Kota Bogor');
CREATE VIEW public.pg_stat_statements AS
    SELECT 10::oid AS userid, 'select 1'::text AS query, 1::bigint AS calls;
CREATE TABLE bank.customer_docs (id bigint, customer_id bigint, no_ktp char(16), doc_type text)
    PARTITION BY RANGE (id);
CREATE TABLE bank.customer_docs_2024 PARTITION OF bank.customer_docs
    FOR VALUES FROM (MINVALUE) TO (MAXVALUE);
INSERT INTO bank.customer_docs
    SELECT id, id, nik, 'KTP' FROM bank.customers WHERE id <= 40;
CREATE TABLE bank."CustomerArchive" (id bigint, nik char(16), "Full_Name" text);
INSERT INTO bank."CustomerArchive" SELECT id, nik, full_name FROM bank.customers WHERE id <= 40;
CREATE VIEW bank.customer_directory AS
    SELECT c.id, c.full_name, c.city, c.nik FROM bank.customers c;
CREATE VIEW bank.customer_contacts AS
    SELECT customers.id, customers.full_name, customers.no_hp, customers.email FROM bank.customers;
CREATE VIEW bank.customer_secrets AS SELECT id, nama_ibu_kandung FROM bank.customers;
CREATE VIEW bank.account_summary AS
    SELECT customer_id, count(*) AS n_accounts, sum(balance) AS total
    FROM bank.accounts GROUP BY customer_id;
CREATE VIEW bank.customer_nik_upper AS SELECT id, upper(nik::text) AS nik_upper FROM bank.customers;
CREATE VIEW bank.directory_lite AS SELECT id, nik FROM bank.customer_directory;
CREATE MATERIALIZED VIEW bank.mv_city_counts AS
    SELECT city, count(*) AS n FROM bank.customers GROUP BY city;
CREATE MATERIALIZED VIEW bank.mv_niks AS SELECT id, nik FROM bank.customers;
CREATE VIEW bank.branches_view AS SELECT id, city FROM public.notes_city;
"""

_DROP_DDL = """
DROP VIEW IF EXISTS bank.branches_view, bank.directory_lite, bank.customer_directory,
    bank.customer_contacts, bank.customer_secrets, bank.account_summary,
    bank.customer_nik_upper, public.pg_stat_statements CASCADE;
DROP MATERIALIZED VIEW IF EXISTS bank.mv_city_counts, bank.mv_niks CASCADE;
DROP TABLE IF EXISTS bank.customer_docs, bank."CustomerArchive", public.notes,
    public.notes_city, public.t CASCADE;
"""

#: One login user per fixture role and search_path: (role, search_path) -> user.
_USER_PREFIX = {
    "agent": "agent_fx",
    "supervisor": "spv_fx",
    "analyst": "analyst_fx",
    "auditor": "audit_fx",
    "dba": "dba_fx",
}
PASSWORD = "fixture-secret"


def fixture_user(role: str, search_path: tuple[str, ...]) -> str:
    suffix = "b" if "bank" in search_path else "p"
    return f"{_USER_PREFIX[role]}_{suffix}"


def _all_users() -> list[tuple[str, str]]:
    users = []
    for role in _USER_PREFIX:
        users.append((fixture_user(role, ("public",)), "public"))
        users.append((fixture_user(role, ("bank", "public")), "bank, public"))
    return users


def extended_rules(directory: Path, *, keep_rate_limits: bool = False) -> Path:
    """rules/bank.yaml plus the fixtures' analyst and auditor roles (before agent).

    The per-minute row budget is dropped unless asked for: hundreds of cases in a minute would
    otherwise be refused with 53400 by the budget rather than judged.
    """
    doc = yaml.safe_load(BANK_RULES.read_text())
    roles: dict[str, Any] = {}
    for name, spec in doc["roles"].items():
        if name == "agent":
            roles["analyst"] = {
                "users": ["analyst_*"],
                "statements": ["select", "explain", "prepare", "cursor", "listen"],
                "copy_out": "mask",
            }
            roles["auditor"] = {
                "users": ["audit_*"],
                "statements": ["select", "insert"],
                "copy_out": "allow",
            }
            if not keep_rate_limits:
                spec = {k: v for k, v in spec.items() if k != "max_rows_per_minute"}
        roles[name] = spec
    doc["roles"] = roles
    doc["policies"]["analyst"] = {
        "nik": {"mask": "partial", "keep_first": 6, "filter": "any"},
        "phone": {"mask": "partial", "keep_last": 3, "filter": "deny"},
    }
    doc["policies"]["auditor"] = {"email": "deny"}
    path = directory / "fixture-rules.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def bank_rules_without_rate(directory: Path, **changes: Any) -> Path:
    """rules/bank.yaml without the agent's per-minute row budget, with `changes` to agent."""
    doc = yaml.safe_load(BANK_RULES.read_text())
    agent = {k: v for k, v in doc["roles"]["agent"].items() if k != "max_rows_per_minute"}
    agent.update(changes)
    doc["roles"]["agent"] = agent
    path = directory / "bank-norate.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def create_world(pg: PgServer) -> None:
    """The synthetic catalog's extra relations and the fixture users, in the real database."""
    pg.execute(_DROP_DDL + _EXTRA_DDL)
    lines = []
    for user, path in _all_users():
        lines.append(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{user}') "
            f"THEN CREATE ROLE {user} LOGIN; END IF; END $$;"
        )
        lines.append(f"ALTER ROLE {user} LOGIN PASSWORD '{PASSWORD}';")
        lines.append(f"ALTER ROLE {user} SET search_path = {path};")
        if user.startswith("dba_"):
            lines.append(f"ALTER ROLE {user} SUPERUSER;")
        lines.append(f"GRANT USAGE ON SCHEMA bank, public TO {user};")
        lines.append(f"GRANT SELECT ON ALL TABLES IN SCHEMA bank, public TO {user};")
    pg.execute("\n".join(lines) + "\n")


def drop_world(pg: PgServer) -> None:
    lines = [_DROP_DDL]
    for user, _ in _all_users():
        lines.append(
            f"DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{user}') "
            f"THEN EXECUTE 'DROP OWNED BY {user} CASCADE'; EXECUTE 'DROP ROLE {user}'; "
            f"END IF; END $$;"
        )
    pg.execute("\n".join(lines) + "\n")


# -- outcomes --------------------------------------------------------------------------------


@dataclass
class ResultSet:
    names: tuple[str, ...]
    rows: list[tuple[Any, ...]]


@dataclass
class ServerError:
    sqlstate: str | None
    message: str
    detail: str | None = None
    hint: str | None = None

    def text(self) -> str:
        return "\n".join(x for x in (self.sqlstate, self.message, self.detail, self.hint) if x)


@dataclass
class Outcome:
    results: list[ResultSet] = field(default_factory=list)
    error: ServerError | None = None
    notices: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # notifications, parameter statuses

    def texts(self) -> Iterable[str]:
        """Everything that came back, as text (bytes decoded, rows rendered)."""
        for result in self.results:
            yield " ".join(result.names)
            for row in result.rows:
                for value in row:
                    yield from render(value)
        if self.error is not None:
            yield self.error.text()
        yield from self.notices
        yield from self.extra


def render(value: Any) -> Iterable[str]:
    if value is None:
        return
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        yield raw.decode("latin-1")
        yield raw.hex()
    elif isinstance(value, list | tuple):
        for item in value:
            yield from render(item)
    elif isinstance(value, dict):
        yield repr(value)
    else:
        yield str(value)


# -- asyncpg ---------------------------------------------------------------------------------


def _apg_error(exc: BaseException) -> ServerError:
    if isinstance(exc, asyncpg.PostgresError):
        return ServerError(
            exc.sqlstate,
            str(getattr(exc, "message", None) or exc.args[0] if exc.args else exc),
            getattr(exc, "detail", None),
            getattr(exc, "hint", None),
        )
    return ServerError(None, f"{type(exc).__name__}: {exc}")


async def apg_connect(dsn: str, notices: list[str] | None = None) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    if notices is not None:

        def on_log(_conn: object, message: asyncpg.PostgresLogMessage) -> None:
            notices.append(
                "\n".join(
                    str(x)
                    for x in (
                        getattr(message, "sqlstate", None),
                        getattr(message, "message", None),
                        getattr(message, "detail", None),
                        getattr(message, "hint", None),
                    )
                    if x
                )
            )

        conn.add_log_listener(on_log)
    return conn


async def run_asyncpg(conn: asyncpg.Connection, sql: str, params: Sequence[Any] = ()) -> Outcome:
    """Each statement prepared and fetched (extended protocol, binary results)."""
    outcome = Outcome()
    try:
        for stmt in statements(sql):
            if re.match(r"\s*COPY\b", stmt, re.IGNORECASE):
                sink = io.BytesIO()
                # asyncpg's public COPY methods build their own statement; this one sends ours
                await conn._copy_out(stmt, sink, None)
                outcome.results.append(ResultSet(("copy",), [(sink.getvalue(),)]))
                continue
            args = list(params) if has_params(stmt) else []
            prepared = await conn.prepare(stmt)
            names = tuple(a.name for a in prepared.get_attributes())
            rows = await prepared.fetch(*args)
            if names:
                outcome.results.append(ResultSet(names, [tuple(r) for r in rows]))
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
        outcome.error = _apg_error(exc)
    return outcome


# -- psycopg ---------------------------------------------------------------------------------


def pc_connect(dsn: str, outcome_sink: list[str] | None = None) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, autocommit=True)
    if outcome_sink is not None:

        def on_notice(diag: psycopg.errors.Diagnostic) -> None:
            outcome_sink.append(
                "\n".join(
                    x
                    for x in (
                        diag.sqlstate,
                        diag.message_primary,
                        diag.message_detail,
                        diag.message_hint,
                    )
                    if x
                )
            )

        def on_notify(notify: psycopg.Notify) -> None:
            outcome_sink.append(f"NOTIFY {notify.channel} {notify.payload}")

        conn.add_notice_handler(on_notice)
        conn.add_notify_handler(on_notify)
    return conn


_REPORTED = (
    "application_name", "client_encoding", "DateStyle", "IntervalStyle", "TimeZone",
    "integer_datetimes", "is_superuser", "server_encoding", "server_version",
    "session_authorization", "standard_conforming_strings", "search_path", "in_hot_standby",
    "default_transaction_read_only", "scram_iterations",
)  # fmt: skip


def parameter_statuses(conn: psycopg.Connection[Any]) -> list[str]:
    found = []
    for name in _REPORTED:
        value = conn.pgconn.parameter_status(name.encode())
        if value is not None:
            found.append(f"{name}={value.decode(errors='replace')}")
    return found


def _pc_error(exc: psycopg.Error) -> ServerError:
    diag = exc.diag
    return ServerError(
        exc.sqlstate, diag.message_primary or str(exc), diag.message_detail, diag.message_hint
    )


def run_psycopg(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any] = ()) -> Outcome:
    """The whole string in one execute (simple protocol without params), text results."""
    outcome = Outcome()
    try:
        with conn.cursor() as cur:
            if re.match(r"\s*COPY\b", sql, re.IGNORECASE) and len(statements(sql)) == 1:
                data = bytearray()
                with cur.copy(sql) as copy:
                    for chunk in copy:
                        data += chunk
                outcome.results.append(ResultSet(("copy",), [(bytes(data),)]))
                return outcome
            if has_params(sql):
                cur.execute(
                    to_psycopg(sql).encode(),
                    {f"p{i + 1}": v for i, v in enumerate(params)},
                )
            else:
                cur.execute(sql.encode())
            while True:
                if cur.description is not None:
                    names = tuple(c.name for c in cur.description)
                    outcome.results.append(ResultSet(names, [tuple(r) for r in cur.fetchall()]))
                if not cur.nextset():
                    break
    except psycopg.Error as exc:
        if isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None:
            outcome.error = ServerError(None, str(exc))
        else:
            outcome.error = _pc_error(exc)
    return outcome


# -- psql ------------------------------------------------------------------------------------

FS = "\x1f"
RS = "\x1e"


def psql_binary(pg: PgServer) -> str:
    if pg.bin_dir is not None and (pg.bin_dir / "psql").is_file():
        return str(pg.bin_dir / "psql")
    return "psql"


@dataclass
class PsqlRun:
    returncode: int
    records: list[str]
    stderr: str

    @property
    def sqlstate(self) -> str | None:
        match = re.search(r"ERROR:\s+([0-9A-Z]{5}):", self.stderr)
        return match.group(1) if match else None

    @property
    def message(self) -> str:
        match = re.search(r"ERROR:\s+[0-9A-Z]{5}:\s+(.*)", self.stderr)
        return match.group(1) if match else self.stderr


def run_psql(
    pg: PgServer, host: str, port: int, user: str, password: str | None, sql: str
) -> PsqlRun:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    env["PGCONNECT_TIMEOUT"] = "10"
    command = [
        psql_binary(pg), "-X", "-q", "-A", "-F", FS, "-R", RS, "-P", "footer=off",
        "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose",
        "-h", host, "-p", str(port), "-U", user, "-d", pg.database, "-c", sql,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    records = [r for r in done.stdout.split(RS)]
    if records and records[-1].strip() == "":
        records.pop()
    return PsqlRun(done.returncode, records, done.stderr)


# -- comparing masked results ----------------------------------------------------------------


def check_masked_value(masked: Any, raw: Any, where: str) -> None:
    """A masked value keeps the raw value's type (and char(16) length) but not its value."""
    if raw is None:
        assert masked is None, f"{where}: NULL became {masked!r}"
        return
    assert masked is not None or isinstance(raw, str), f"{where}: {raw!r} became NULL"
    if masked is None:
        return
    assert type(masked) is type(raw), f"{where}: type {type(raw)} became {type(masked)}"
    if isinstance(raw, decimal.Decimal):
        assert masked % 1_000_000 == 0, f"{where}: {masked} is not rounded to a million"
        if raw % 1_000_000 != 0:
            assert masked != raw, f"{where}: income not masked"
        return
    assert masked != raw, f"{where}: value not masked: {masked!r}"
    if isinstance(raw, str) and len(raw) == 16 and raw.isdigit():
        assert len(masked) == 16, f"{where}: char(16) became {masked!r}"


def compare_masked(
    got: Outcome, raw: Outcome, masked_names: set[str], where: str, *, positional: bool = False
) -> int:
    """Proxied results against direct ones: masked columns masked, the rest identical.

    Returns the number of masked values checked. `positional`: results whose names differ
    (a FETCH of a binary cursor) are paired by position.
    """
    assert got.error is None, f"{where}: {got.error}"
    assert raw.error is None, f"{where}: direct run failed: {raw.error}"
    assert len(got.results) == len(raw.results), f"{where}: {got.results} vs {raw.results}"
    checked = 0
    for mine, theirs in zip(got.results, raw.results, strict=True):
        assert mine.names == theirs.names, f"{where}: columns {mine.names} vs {theirs.names}"
        assert len(mine.rows) == len(theirs.rows), f"{where}: row counts differ"
        for m_row, r_row in zip(mine.rows, theirs.rows, strict=True):
            for index, name in enumerate(mine.names):
                if name in masked_names:
                    check_masked_value(m_row[index], r_row[index], f"{where} column {name}")
                    checked += 1
                elif mine.names == ("copy",):
                    assert m_row[index] != r_row[index] or not r_row[index], where
                else:
                    assert m_row[index] == r_row[index], (
                        f"{where}: column {name}: {m_row[index]!r} != {r_row[index]!r}"
                    )
    return checked


# -- the leak matcher ------------------------------------------------------------------------

_DIGITS = re.compile(r"\d{10,}")
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_WORDS = re.compile(r"[A-Za-z]+")
_HEX = re.compile(r"(?:\\x)?((?:[0-9a-fA-F]{2}){8,})")
_B64 = re.compile(r"[A-Za-z0-9+/]{12,}={0,2}")


@dataclass
class Leak:
    label: str
    value: str
    form: str

    def __str__(self) -> str:
        return f"{self.label} {self.value!r} ({self.form})"


class LeakMatcher:
    """Finds raw protected values in text: sets of needles, looked up by token, not by regex.

    - digit strings (NIK, KK, phone digits-only and local 0-prefixed forms): every substring
      of a run of 10+ digits of a needle's length is looked up;
    - e-mail addresses: e-mail-shaped tokens;
    - mother's maiden names of two or more words: word n-grams (single given names are
      everyone's names and would match full_name);
    - exact incomes (not multiples of a million, which a rounded value can equal): numeric
      tokens, excluding numbers that unprotected columns hold;
    each also in the reversed text and in decoded hex and base64 runs.
    """

    def __init__(self, protected: dict[str, Iterable[str]], unprotected: Iterable[str] = ()):
        self.digits: dict[str, str] = {}
        self.digit_lengths: set[int] = set()
        self.emails: dict[str, str] = {}
        self.names: dict[tuple[str, ...], str] = {}
        self.name_lengths: set[int] = set()
        self.numbers: dict[str, str] = {}
        allowed = set(unprotected)
        allowed_grams: set[tuple[str, ...]] = set()
        for text in allowed:
            words = text.split()
            for size in (2, 3, 4):
                for start in range(0, len(words) - size + 1):
                    allowed_grams.add(tuple(words[start : start + size]))
        for label, values in protected.items():
            for value in values:
                if value is None:
                    continue
                value = str(value).strip()
                if label in ("nik", "family_card"):
                    self._digit(value, label)
                elif label == "phone":
                    digits = re.sub(r"\D", "", value)
                    self._digit(digits, label)
                    if digits.startswith("62"):
                        self._digit("0" + digits[2:], label)
                elif label == "email":
                    self.emails[value.lower()] = label
                elif label == "mother_maiden_name":
                    words = tuple(value.split())
                    if len(words) >= 2 and words not in allowed_grams:
                        self.names[words] = label
                        self.name_lengths.add(len(words))
                elif label == "income":
                    number = decimal.Decimal(value)
                    if number % 1_000_000 == 0:
                        continue
                    forms = [f"{number:.2f}"]
                    if number == number.to_integral():
                        forms.append(f"{number:.0f}")
                    for form in forms:
                        if form not in allowed:
                            self.numbers[form] = label

    def _digit(self, value: str, label: str) -> None:
        if len(value) >= 10:
            self.digits[value] = label
            self.digit_lengths.add(len(value))

    def _scan_plain(self, text: str, form: str) -> list[Leak]:
        found: list[Leak] = []
        for run in _DIGITS.findall(text):
            for size in self.digit_lengths:
                for start in range(0, len(run) - size + 1):
                    part = run[start : start + size]
                    if part in self.digits:
                        found.append(Leak(self.digits[part], part, form))
        if "@" in text:
            for token in _EMAIL.findall(text):
                token = token.lower().strip(".")
                if token in self.emails:
                    found.append(Leak(self.emails[token], token, form))
        if self.numbers:
            for token in _NUMBER.findall(text):
                if token in self.numbers:
                    found.append(Leak(self.numbers[token], token, form))
        if self.names:
            words = _WORDS.findall(text)
            for size in self.name_lengths:
                for start in range(0, len(words) - size + 1):
                    key = tuple(words[start : start + size])
                    if key in self.names:
                        found.append(Leak(self.names[key], " ".join(key), form))
        return found

    def scan(self, text: str, *, sent: str = "") -> list[Leak]:
        """Leaks in `text`, except values the client itself sent (in `sent`)."""
        found = self._scan_plain(text, "plain")
        found += self._scan_plain(text[::-1], "reversed")
        for match in _HEX.finditer(text):
            try:
                decoded = binascii.unhexlify(match.group(1)).decode("latin-1")
            except (binascii.Error, ValueError):
                continue
            found += self._scan_plain(decoded, "hex")
            found += self._scan_plain(decoded[::-1], "hex reversed")
        for match in _B64.finditer(text):
            chunk = match.group(0)
            for trim in range(0, 4):
                piece = chunk[: len(chunk) - trim] if trim else chunk
                piece += "=" * (-len(piece) % 4)
                try:
                    decoded = base64.b64decode(piece, validate=True).decode("latin-1")
                except (binascii.Error, ValueError):
                    continue
                found += self._scan_plain(decoded, "base64")
                break
        if sent and found:
            mine = {leak.value for leak in self._scan_plain(sent, "sent")}
            mine |= {leak.value for leak in self._scan_plain(sent[::-1], "sent")}
            found = [leak for leak in found if leak.value not in mine]
        return found

    def scan_outcome(self, outcome: Outcome, *, sent: str = "") -> list[Leak]:
        found: list[Leak] = []
        for text in outcome.texts():
            found += self.scan(text, sent=sent)
        return found


#: Labels each role must not see in full (rules/bank.yaml).
HIDDEN = {
    "agent": ("nik", "family_card", "mother_maiden_name", "income", "phone", "email"),
    "supervisor": ("nik", "family_card", "mother_maiden_name", "phone", "email"),
}


def load_protected(superuser_dsn: str) -> tuple[dict[str, list[str]], list[str]]:
    """Every protected value of the sample bank, by label, and the unprotected strings and
    numbers that could collide with them (names, balances, amounts)."""
    with psycopg.connect(superuser_dsn) as conn:
        rows = conn.execute(
            "SELECT nik, no_kk, nama_ibu_kandung, penghasilan::text, no_hp, email, full_name "
            "FROM bank.customers"
        ).fetchall()
        numbers = conn.execute(
            "SELECT abs(amount)::text FROM bank.transactions UNION "
            "SELECT abs(balance)::text FROM bank.accounts UNION "
            "SELECT trunc(abs(amount))::text FROM bank.transactions"
        ).fetchall()
    protected = {
        "nik": [r[0] for r in rows],
        "family_card": [r[1] for r in rows],
        "mother_maiden_name": [r[2] for r in rows],
        "income": [r[3] for r in rows],
        "phone": [r[4] for r in rows if r[4]],
        "email": [r[5] for r in rows if r[5]],
    }
    unprotected = [r[6] for r in rows] + [r[0] for r in numbers]
    return protected, unprotected


def matcher_for(role: str, protected: dict[str, list[str]], unprotected: list[str]) -> LeakMatcher:
    return LeakMatcher({label: protected[label] for label in HIDDEN[role]}, unprotected)


def proxy_dsn(topeng: TopengProcess, user: str, password: str) -> str:
    return topeng.dsn(user, password)
