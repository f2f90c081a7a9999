"""The policy fixtures: tests/fixtures/policy/*.sql, each case SQL + role + expected decision.

A case is a comment header followed by SQL, up to the next header:

    -- case: agent looks up a customer by NIK
    -- role: agent
    -- expect: mask nik,no_hp          (output columns masked, by name)
    SELECT id, nik, no_hp FROM bank.customers WHERE nik = '3273010101900001';

`expect` is `allow`, `mask col,col`, or `refuse SQLSTATE reason`. Optional headers:
`-- search_path: a, b` and `-- prepared: name=allow|refuse|mask` / `-- cursor: name=...` for
statements that need earlier ones. The catalog is the bank schema below, built without a
database; the rules are rules/bank.yaml plus two roles that loosen or tighten it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.policy.catalog import Catalog, from_json
from proxy.policy.decision import ALLOW, ColumnMask, Decision, Mask, Refuse
from proxy.policy.rules import Rules, load_rules

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "policy"
SEARCH_PATH = ("pg_catalog", "public")

_TYPES = {
    "int4": (23, "integer", 4),
    "int8": (20, "bigint", 8),
    "text": (25, "text", -1),
    "varchar": (1043, "character varying(100)", -1),
    "bpchar": (1042, "character(16)", -1),
    "date": (1082, "date", 4),
    "timestamptz": (1184, "timestamp with time zone", 8),
    "numeric": (1700, "numeric(18,2)", -1),
    "name": (19, "name", 64),
    "oid": (26, "oid", 4),
    "bool": (16, "boolean", 1),
}

# (oid, schema, name, relkind, columns "name:type ...", view_sql, parent)
_RELATIONS: list[tuple[int, str, str, str, str, str | None, int | None]] = [
    (
        16400,
        "bank",
        "customers",
        "r",
        "id:int8 full_name:varchar nik:bpchar no_kk:bpchar nama_ibu_kandung:varchar "
        "birth_date:date gender:bpchar penghasilan:numeric no_hp:varchar email:varchar "
        "address:text city:varchar province:varchar created_at:timestamptz",
        None,
        None,
    ),
    (
        16410,
        "bank",
        "accounts",
        "r",
        "id:int8 customer_id:int8 account_number:varchar product:varchar balance:numeric "
        "opened_at:date status:varchar",
        None,
        None,
    ),
    (
        16420,
        "bank",
        "transactions",
        "r",
        "id:int8 account_id:int8 amount:numeric kind:varchar description:text "
        "created_at:timestamptz",
        None,
        None,
    ),
    (
        16430,
        "bank",
        "customer_docs",
        "p",
        "id:int8 customer_id:int8 no_ktp:bpchar doc_type:text",
        None,
        None,
    ),
    (
        16431,
        "bank",
        "customer_docs_2024",
        "r",
        "id:int8 customer_id:int8 no_ktp:bpchar doc_type:text",
        None,
        16430,
    ),
    (16440, "bank", "CustomerArchive", "r", "id:int8 nik:bpchar Full_Name:text", None, None),
    (
        16450,
        "bank",
        "customer_directory",
        "v",
        "id:int8 full_name:varchar city:varchar nik:bpchar",
        "SELECT c.id, c.full_name, c.city, c.nik FROM bank.customers c;",
        None,
    ),
    (
        16451,
        "bank",
        "customer_contacts",
        "v",
        "id:int8 full_name:varchar no_hp:varchar email:varchar",
        "SELECT customers.id, customers.full_name, customers.no_hp, customers.email\n"
        "   FROM bank.customers;",
        None,
    ),
    (
        16452,
        "bank",
        "customer_secrets",
        "v",
        "id:int8 nama_ibu_kandung:varchar",
        "SELECT id, nama_ibu_kandung FROM bank.customers;",
        None,
    ),
    (
        16453,
        "bank",
        "account_summary",
        "v",
        "customer_id:int8 n_accounts:int8 total:numeric",
        "SELECT customer_id, count(*) AS n_accounts, sum(balance) AS total\n"
        "   FROM bank.accounts GROUP BY customer_id;",
        None,
    ),
    (
        16454,
        "bank",
        "customer_nik_upper",
        "v",
        "id:int8 nik_upper:text",
        "SELECT id, upper(nik::text) AS nik_upper FROM bank.customers;",
        None,
    ),
    (
        16455,
        "bank",
        "directory_lite",
        "v",
        "id:int8 nik:bpchar",
        "SELECT id, nik FROM bank.customer_directory;",
        None,
    ),
    (
        16456,
        "bank",
        "mv_city_counts",
        "m",
        "city:varchar n:int8",
        "SELECT city, count(*) AS n FROM bank.customers GROUP BY city;",
        None,
    ),
    (
        16457,
        "bank",
        "mv_niks",
        "m",
        "id:int8 nik:bpchar",
        "SELECT id, nik FROM bank.customers;",
        None,
    ),
    (
        16458,
        "bank",
        "branches_view",
        "v",
        "id:int8 city:varchar",
        "SELECT id, city FROM notes_city;",
        None,
    ),
    (16500, "public", "notes", "r", "id:int8 customer_id:int8 body:text", None, None),
    (16501, "public", "notes_city", "r", "id:int8 city:varchar", None, None),
    (16502, "public", "pg_stat_statements", "v", "userid:oid query:text calls:int8", None, None),
    (
        1259,
        "pg_catalog",
        "pg_class",
        "r",
        "oid:oid relname:name relnamespace:oid relkind:bpchar",
        None,
        None,
    ),
    (2615, "pg_catalog", "pg_namespace", "r", "oid:oid nspname:name", None, None),
    (1249, "pg_catalog", "pg_attribute", "r", "attrelid:oid attname:name attnum:int4", None, None),
    (
        12001,
        "pg_catalog",
        "pg_stats",
        "v",
        "schemaname:name tablename:name attname:name most_common_vals:text histogram_bounds:text",
        None,
        None,
    ),
    (12002, "pg_catalog", "pg_stat_activity", "v", "pid:int4 usename:name query:text", None, None),
    (12003, "pg_catalog", "pg_statistic", "r", "starelid:oid staattnum:int4", None, None),
    (12004, "pg_catalog", "pg_stats_ext", "v", "tablename:name most_common_vals:text", None, None),
    (12005, "pg_catalog", "pg_authid", "r", "oid:oid rolname:name rolpassword:text", None, None),
    (12006, "pg_catalog", "pg_shadow", "v", "usename:name passwd:text", None, None),
    (12007, "pg_catalog", "pg_largeobject", "r", "loid:oid data:text", None, None),
    (12008, "pg_catalog", "pg_user_mappings", "v", "umoptions:text", None, None),
    (12009, "pg_catalog", "pg_roles", "v", "rolname:name oid:oid", None, None),
    (12010, "pg_catalog", "pg_tables", "v", "schemaname:name tablename:name", None, None),
    (
        13100,
        "information_schema",
        "columns",
        "v",
        "table_schema:name table_name:name column_name:name",
        None,
        None,
    ),
]
_SCHEMAS = [[11, "pg_catalog"], [2200, "public"], [13000, "information_schema"], [16384, "bank"]]


def catalog_document() -> str:
    """The bank schema as a CATALOG_SQL document, without a database."""
    schema_oid = {name: oid for oid, name in _SCHEMAS}
    relations = []
    columns = []
    for oid, schema, name, kind, cols, view_sql, parent in _RELATIONS:
        relations.append([oid, schema_oid[schema], name, kind, parent, parent, view_sql])
        for attnum, spec in enumerate(cols.split(), start=1):
            col, typ = spec.split(":")
            type_oid, fmt, typlen = _TYPES[typ]
            columns.append([oid, attnum, col, type_oid, -1, fmt, typ, None, None, typlen])
    return json.dumps(
        {
            "format": 1,
            "scope": "database",
            "database": "bank",
            "server_version_num": 150004,
            "schemas": _SCHEMAS,
            "relations": relations,
            "columns": columns,
        }
    )


def bank_catalog() -> Catalog:
    return from_json(catalog_document())


TEST_RULES = """
version: 1
roles:
  dba:        {users: [postgres], unrestricted: true}
  supervisor: {users: ["spv_*"], max_rows_per_query: 1000}
  analyst:
    users: ["analyst_*"]
    statements: [select, explain, prepare, cursor, listen]
    copy_out: mask
  auditor:
    users: ["audit_*"]
    statements: [select, insert]
    copy_out: allow
  agent:
    users: ["agent_*", "ai_*"]
    statements: [select]
    max_rows_per_query: 50
    copy_out: deny
default_role: agent
labels:
  nik: ["*.*.nik", "*.*.no_ktp"]
  family_card: ["*.*.no_kk"]
  mother_maiden_name: ["*.*.nama_ibu_kandung"]
  income: ["*.*.penghasilan"]
  phone: ["*.*.phone", "*.*.no_hp"]
  email: ["*.*.email"]
policies:
  "*":
    nik: {mask: partial, keep_first: 6}
    family_card: {mask: redact}
    mother_maiden_name: deny
    income: {mask: round, to: 1000000}
    phone: {mask: partial, keep_last: 3}
    email: {mask: email}
  supervisor:
    mother_maiden_name: {mask: hash}
    income: allow
  analyst:
    nik: {mask: partial, keep_first: 6, filter: any}
    phone: {mask: partial, keep_last: 3, filter: deny}
  auditor:
    email: deny
"""


def load_test_rules(directory: Path) -> Rules:
    path = directory / "rules.yaml"
    path.write_text(TEST_RULES)
    return load_rules(path)


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Rules:
    return load_test_rules(tmp_path_factory.mktemp("rules"))


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return bank_catalog()


# -- the fixture files -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    file: str
    line: int
    title: str
    role: str
    expect: str
    sql: str
    search_path: tuple[str, ...] = SEARCH_PATH

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


_HEADER = re.compile(r"--\s*(case|role|expect|search_path):\s*(.*?)\s*$")


def read_cases(directory: Path = FIXTURES) -> list[Case]:
    """Every case of every *.sql file under `directory`, in file order."""
    cases: list[Case] = []
    for path in sorted(directory.glob("*.sql")):
        cases.extend(_read_file(path))
    return cases


def _read_file(path: Path) -> Iterator[Case]:
    headers: dict[str, str] = {}
    body: list[str] = []
    start = 0

    def flush() -> Case | None:
        if "case" not in headers:
            return None
        sql = "\n".join(body).strip()
        missing = {"role", "expect"} - set(headers)
        if missing or not sql:
            raise ValueError(f"{path.name}:{start}: case without {missing or 'SQL'}")
        path_header = headers.get("search_path")
        search_path = (
            tuple(p.strip() for p in path_header.split(",")) if path_header else SEARCH_PATH
        )
        return Case(
            path.name, start, headers["case"], headers["role"], headers["expect"], sql, search_path
        )

    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = _HEADER.match(line)
        if match and match.group(1) == "case":
            case = flush()
            if case is not None:
                yield case
            headers, body, start = {}, [], number
        if match:
            headers[match.group(1)] = match.group(2)
        elif headers:
            body.append(line)
    case = flush()
    if case is not None:
        yield case


CASES = read_cases()


def _role_of(rules: Rules, name: str) -> object:
    return rules.role(name)


def _masked_names(judged: tuple[tuple[object, Decision], ...]) -> set[str]:
    from proxy.policy.analyze import StatementFacts

    names: set[str] = set()
    prepared: dict[str, StatementFacts] = {}
    for facts, decision in judged:
        assert isinstance(facts, StatementFacts)
        source = facts
        while source.outputs is None and source.inner is not None:
            source = source.inner
        if facts.node == "PrepareStmt" and facts.name and facts.inner is not None:
            prepared[facts.name] = facts.inner
        if facts.node == "DeclareCursorStmt" and facts.name and facts.inner is not None:
            prepared["cursor " + facts.name] = facts.inner
        if facts.node == "ExecuteStmt" and facts.name in prepared:
            source = prepared[facts.name]
        if facts.node == "FetchStmt" and ("cursor " + (facts.name or "")) in prepared:
            source = prepared["cursor " + (facts.name or "")]
        if isinstance(decision, Mask):
            outputs = source.outputs or ()
            for index in decision.columns:
                names.add(outputs[index].name if index < len(outputs) else f"#{index}")
    return names


def check_case(case: Case, rules: Rules, catalog: Catalog) -> None:
    from proxy.policy.decide import judge_sql_with_facts

    role = rules.role(case.role)
    judged = judge_sql_with_facts(case.sql, catalog, case.search_path, rules, role)
    words = case.expect.split()
    where = f"{case.id} ({case.title})"
    if words[0] == "refuse":
        assert isinstance(judged, Refuse), f"{where}: expected a refusal, got {judged}"
        assert judged.sqlstate == words[1], f"{where}: {judged}"
        if len(words) > 2:
            assert judged.reason == words[2], f"{where}: {judged}"
        assert judged.message.startswith("topeng: "), judged.message
        assert judged.hint, f"{where}: a refusal needs a hint"
        return
    assert not isinstance(judged, Refuse), f"{where}: refused: {judged}"
    decisions = [d for _, d in judged]
    if words[0] == "allow":
        assert all(d == ALLOW for d in decisions), f"{where}: {decisions}"
        return
    assert words[0] == "mask", f"{where}: unknown expectation {case.expect!r}"
    expected = {name.strip() for name in " ".join(words[1:]).split(",")}
    assert _masked_names(judged) == expected, f"{where}: {decisions}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fixture(case: Case, rules: Rules, catalog: Catalog) -> None:
    check_case(case, rules, catalog)


def test_enough_fixtures() -> None:
    assert len(CASES) >= 200
    assert len({c.id for c in CASES}) == len(CASES)


def test_masks_carry_the_label_and_parameters(rules: Rules, catalog: Catalog) -> None:
    from proxy.policy.decide import judge_sql

    result = judge_sql(
        "SELECT nik FROM bank.customers WHERE id = 1",
        catalog,
        SEARCH_PATH,
        rules,
        rules.role("agent"),
    )
    assert result == (
        Mask(
            {0: ColumnMask("nik", "partial", (("keep_first", 6), ("keep_last", 0), ("char", "*")))}
        ),
    )
