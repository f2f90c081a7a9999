"""The catalog model from hand-written documents: lookups, name resolution, overlays, the cache."""

from __future__ import annotations

import dataclasses
import json
import re
from types import EllipsisType
from typing import Any

import pytest
import sqlglot
from sqlglot.optimizer.qualify import qualify
from sqlglot.schema import MappingSchema

from proxy.policy.catalog import (
    CATALOG_SQL,
    SESSION_TEMP_SQL,
    Catalog,
    CatalogCache,
    CatalogError,
    from_json,
    is_ddl_tag,
    load_catalog,
    load_search_path,
    load_session_overlay,
)

PG_CATALOG, PUBLIC, BANK, INFO, TEMP = 11, 2200, 16400, 13000, 16900
INT4, TEXT, BPCHAR, INT4_ARRAY = 23, 25, 1042, 1007


def col(
    relid: int,
    attnum: int,
    name: str,
    type_oid: int = INT4,
    fmt: str = "integer",
    typname: str = "int4",
    elem: tuple[int, str] | None = None,
    typmod: int = -1,
    typlen: int = 4,
) -> list[Any]:
    return [relid, attnum, name, type_oid, typmod, fmt, typname, *(elem or (None, None)), typlen]


def rel(
    oid: int,
    schema: int,
    name: str,
    kind: str = "r",
    parent: int | None = None,
    root: int | None = None,
    view: str | None = None,
) -> list[Any]:
    return [oid, schema, name, kind, parent, root, view]


def document(
    relations: list[list[Any]] | None,
    columns: list[list[Any]] | None,
    schemas: list[list[Any]] | None | EllipsisType = ...,
    *,
    scope: str = "database",
    database: str = "bank",
) -> str:
    if isinstance(schemas, EllipsisType):
        schemas = [[PG_CATALOG, "pg_catalog"], [PUBLIC, "public"], [BANK, "bank"]]
        schemas.append([INFO, "information_schema"])
    return json.dumps(
        {
            "format": 1,
            "scope": scope,
            "database": database,
            "server_version_num": 150004,
            "schemas": schemas,
            "relations": relations,
            "columns": columns,
        }
    )


RELATIONS = [
    rel(1259, PG_CATALOG, "pg_class"),
    rel(12000, PG_CATALOG, "pg_stats", "v"),
    rel(13100, INFO, "columns", "v"),
    rel(16500, PUBLIC, "customers"),
    rel(16501, BANK, "customers"),
    rel(16502, PUBLIC, "Customers"),  # created as "Customers": a different table
    rel(16503, PUBLIC, "pg_class"),  # shadows pg_catalog.pg_class only if listed first
    rel(16510, BANK, "events", "p"),
    rel(16511, BANK, "events_2024", "p", parent=16510, root=16510),
    rel(16512, BANK, "events_2024_jawa", parent=16511, root=16510),
    rel(16513, BANK, "events_2025", parent=16510, root=16510),
    rel(16520, BANK, "customer_view", "v", view=" SELECT id, nik FROM bank.customers;"),
    rel(16521, BANK, "balances", "m", view=" SELECT 1 AS total;"),
    rel(16522, BANK, "remote", "f"),
    rel(16523, BANK, "customers_id_seq", "S"),
    rel(16524, PUBLIC, "empty"),
]
COLUMNS = [
    col(1259, 1, "oid", 26, "oid", "oid"),
    col(12000, 1, "schemaname", 19, "name", "name", typlen=64),
    col(13100, 1, "column_name", 13000, "information_schema.sql_identifier", "sql_identifier"),
    col(16500, 1, "id"),
    col(16500, 3, "nik", BPCHAR, "character(16)", "bpchar", typmod=20, typlen=-1),  # 2 dropped
    col(16501, 2, "nik", BPCHAR, "character(16)", "bpchar", typmod=20, typlen=-1),
    col(16501, 1, "id"),  # out of order on purpose
    col(16501, 3, "tags", INT4_ARRAY, "integer[]", "_int4", (INT4, "integer"), typlen=-1),
    col(16502, 1, "Nik", TEXT, "text", "text", typlen=-1),
    col(16502, 2, "a.b"),
    col(16503, 1, "x"),
    *(col(oid, 1, "at", 1082, "date", "date") for oid in (16510, 16511, 16512, 16513)),
    col(16520, 1, "id"),
    col(16520, 2, "nik", BPCHAR, "character(16)", "bpchar", typmod=20, typlen=-1),
    col(16521, 1, "total", 1700, "numeric", "numeric", typlen=-1),
    col(16522, 1, "nik", TEXT, "text", "text", typlen=-1),
    col(16523, 1, "last_value", 20, "bigint", "int8", typlen=8),
]
DOC = document(RELATIONS, COLUMNS)
PATH = ("pg_catalog", "bank", "public")  # what current_schemas(true) gives without temp tables


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return from_json(DOC)


def temp_doc(temp_oid: int = TEMP, name: str = "pg_temp_3") -> str:
    return document(
        [rel(17000, temp_oid, "customers"), rel(17001, temp_oid, "scratch")],
        [col(17000, 1, "id"), col(17001, 1, "note", TEXT, "text", "text", typlen=-1)],
        [[temp_oid, name]],
        scope="session",
    )


# -- lookups -------------------------------------------------------------------------------------


def test_relation_and_column_lookups(catalog: Catalog) -> None:
    customers = catalog.relation(16501)
    assert customers is not None
    assert (customers.schema, customers.name, customers.kind) == ("bank", "customers", "table")
    assert [c.attnum for c in customers.columns] == [1, 2, 3]  # ordered by attnum
    nik = catalog.column(16501, 2)
    assert nik is not None
    assert (nik.name, nik.type_name, nik.typname, nik.typmod) == (
        "nik",
        "character(16)",
        "bpchar",
        20,
    )
    tags = catalog.column(16501, 3)
    assert tags is not None and tags.element_type_oid == INT4
    assert tags.base_type_name == "integer" and nik.base_type_name == "character(16)"
    assert catalog.column(16500, 2) is None  # dropped
    assert catalog.column(16500, 3) is not None
    assert catalog.column(16500, 0) is None and catalog.column(16500, -1) is None  # system
    assert catalog.column(99999, 1) is None and catalog.relation(99999) is None
    assert catalog.relations_by_oid[16522].kind == "foreign"
    assert catalog.relations_by_oid[16523].kind == "sequence"
    assert catalog.relations_by_oid[16524].columns == ()
    assert (catalog.database, catalog.server_version_num) == ("bank", 150004)
    assert catalog.schemas[BANK] == "bank"


def test_views_keep_their_definition(catalog: Catalog) -> None:
    view = catalog.find("bank", "customer_view")
    matview = catalog.find("bank", "balances")
    assert view is not None and view.kind == "view" and "bank.customers" in (view.view_sql or "")
    assert matview is not None and matview.kind == "matview" and matview.view_sql
    pg_stats = catalog.find("pg_catalog", "pg_stats")
    assert pg_stats is not None and pg_stats.is_system and pg_stats.view_sql is None


def test_partitions_map_to_their_root(catalog: Catalog) -> None:
    events = catalog.find("bank", "events")
    jawa = catalog.find("bank", "events_2024_jawa")
    assert events is not None and jawa is not None
    assert jawa.parent_oid == 16511 and jawa.root_oid == 16510
    assert jawa.root is events and jawa.is_partition
    assert catalog.relations_by_oid[16513].root is events
    assert catalog.relations_by_oid[16511].root is events  # a partitioned partition
    assert events.root is events and not events.is_partition
    customers = catalog.relations_by_oid[16501]
    assert customers.root is customers


def test_catalog_is_immutable(catalog: Catalog) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        catalog.database = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        catalog.relations_by_oid[1] = catalog.relations_by_oid[1259]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        catalog.relations_by_oid[1259].name = "x"  # type: ignore[misc]


# -- name resolution -----------------------------------------------------------------------------


def oid_of(catalog: Catalog, parts: tuple[str, ...], path: tuple[str, ...] = PATH) -> int | None:
    relation = catalog.resolve(parts, path)
    return None if relation is None else relation.oid


@pytest.mark.parametrize(
    ("parts", "path", "oid"),
    [
        (("customers",), ("pg_catalog", "bank", "public"), 16501),  # first schema that has it
        (("customers",), ("pg_catalog", "public", "bank"), 16500),
        (("customers",), ("pg_catalog",), None),
        (("customers",), ("nosuchschema", "public"), 16500),
        (("Customers",), PATH, 16502),  # exact comparison: the caller folds unquoted names
        (("CUSTOMERS",), PATH, None),
        (("pg_class",), ("public",), 1259),  # pg_catalog unlisted: searched first
        (("pg_class",), (), 1259),
        (("pg_class",), ("public", "pg_catalog"), 16503),  # listed: searched where listed
        (("pg_stats",), ("public",), 12000),
        (("events_2024_jawa",), PATH, 16512),
        (("customers_id_seq",), PATH, 16523),
        (("bank", "customers"), ("public",), 16501),
        (("public", "customers"), PATH, 16500),
        (("public", "Customers"), PATH, 16502),
        (("Public", "customers"), PATH, None),
        (("information_schema", "columns"), PATH, 13100),
        (("bank", "public", "customers"), PATH, 16500),  # db.schema.name
        (("other", "public", "customers"), PATH, None),  # another database: PostgreSQL errors
        (("x", "bank", "public", "customers"), PATH, None),
        ((), PATH, None),
    ],
)
def test_resolve(
    catalog: Catalog, parts: tuple[str, ...], path: tuple[str, ...], oid: int | None
) -> None:
    assert oid_of(catalog, parts, path) == oid


def test_effective_search_path(catalog: Catalog) -> None:
    assert catalog.search_path(("bank", "public")) == ("pg_catalog", "bank", "public")
    assert catalog.search_path(("bank", "pg_catalog")) == ("bank", "pg_catalog")
    assert catalog.search_path(("pg_temp", "public")) == ("pg_catalog", "public")  # no temp yet
    overlay = catalog.with_session_overlay(temp_doc())
    assert overlay.search_path(("public",)) == ("pg_temp_3", "pg_catalog", "public")
    assert overlay.search_path(("public", "pg_temp")) == ("pg_catalog", "public", "pg_temp_3")


# -- the session's temporary schema --------------------------------------------------------------


def test_temp_table_shadows_public_one(catalog: Catalog) -> None:
    overlay = catalog.with_session_overlay(temp_doc())
    temp_first = ("pg_temp_3", "pg_catalog", "bank", "public")
    assert oid_of(overlay, ("customers",), temp_first) == 17000
    assert oid_of(overlay, ("customers",), ("public",)) == 17000  # implicit: temp first
    assert oid_of(overlay, ("customers",), ("pg_catalog", "bank", "pg_temp_3")) == 16501
    assert oid_of(overlay, ("customers",), ("bank", "pg_temp")) == 16501
    assert oid_of(overlay, ("pg_temp", "customers"), PATH) == 17000
    assert oid_of(overlay, ("pg_temp_3", "scratch"), PATH) == 17001
    assert oid_of(overlay, ("bank", "customers"), temp_first) == 16501
    assert oid_of(catalog, ("pg_temp", "customers"), PATH) is None  # shared: no temp schema
    assert oid_of(catalog, ("customers",), temp_first) == 16501
    temp_column = overlay.column(17001, 1)
    assert temp_column is not None and temp_column.name == "note"
    assert overlay.column(16501, 2) is catalog.column(16501, 2)  # shared part is shared
    assert overlay.temp_schema == "pg_temp_3" and overlay.shared is catalog
    assert 17000 not in catalog.relations_by_oid  # the shared catalog is untouched


def test_overlay_fingerprints_and_replacement(catalog: Catalog) -> None:
    first = catalog.with_session_overlay(temp_doc())
    again = catalog.with_session_overlay(temp_doc())
    assert first.fingerprint == again.fingerprint != catalog.fingerprint
    replaced = first.with_session_overlay(
        document([rel(17005, TEMP, "other")], None, [[TEMP, "pg_temp_3"]], scope="session")
    )
    assert replaced.shared is catalog and 17000 not in replaced.relations_by_oid
    assert replaced.fingerprint not in (first.fingerprint, catalog.fingerprint)
    no_temp = document(None, None, None, scope="session")
    assert catalog.with_session_overlay(no_temp) is catalog
    assert first.with_session_overlay(no_temp) is catalog
    empty_schema = document(None, None, [[TEMP, "pg_temp_3"]], scope="session")
    assert first.with_session_overlay(empty_schema) is catalog


def test_temp_partitions_link_to_their_root(catalog: Catalog) -> None:
    doc = document(
        [rel(17010, TEMP, "t", "p"), rel(17011, TEMP, "t1", parent=17010, root=17010)],
        [col(17010, 1, "a"), col(17011, 1, "a")],
        [[TEMP, "pg_temp_3"]],
        scope="session",
    )
    overlay = catalog.with_session_overlay(doc)
    assert overlay.relations_by_oid[17011].root is overlay.relations_by_oid[17010]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (DOC, "scope 'database', expected 'session'"),
        (temp_doc().replace('"bank"', '"other"'), "database 'other'"),
        (document(None, None, [[TEMP, "public"]], scope="session"), "does not belong"),
        (
            document(
                [rel(17000, TEMP, "a"), rel(17001, TEMP + 1, "b")],
                None,
                [[TEMP, "pg_temp_3"], [TEMP + 1, "pg_temp_4"]],
                scope="session",
            ),
            "2 temporary schemas",
        ),
    ],
)
def test_bad_session_documents(catalog: Catalog, doc: str, message: str) -> None:
    with pytest.raises(CatalogError, match=re.escape(message)):
        catalog.with_session_overlay(doc)


# -- documents -----------------------------------------------------------------------------------


def test_empty_and_bytes_documents() -> None:
    empty = from_json(document(None, None, None).encode())
    assert empty.relations_by_oid == {} and empty.schemas == {}
    assert empty.resolve(("pg_class",), ()) is None


def test_fingerprint_follows_the_content(catalog: Catalog) -> None:
    assert from_json(DOC).fingerprint == catalog.fingerprint
    assert from_json(DOC.encode()).fingerprint == catalog.fingerprint
    changed = document(RELATIONS, [*COLUMNS, col(16500, 4, "phone", TEXT, "text", "text")])
    assert from_json(changed).fingerprint != catalog.fingerprint
    assert re.fullmatch(r"[0-9a-f]{32}", catalog.fingerprint)


def edit(path: tuple[str | int, ...], value: object) -> str:
    """DOC with the value at `path` replaced."""
    top = json.loads(DOC)
    target = top
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(top)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("", "not JSON"),
        ("{", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        ("[]", "expected a JSON object"),
        (edit(("format",), 2), "format 2, expected 1"),
        (edit(("scope",), "session"), "scope 'session', expected 'database'"),
        (edit(("database",), None), "database must be a string"),
        (edit(("server_version_num",), "15"), "server_version_num"),
        (edit(("relations",), {}), "relations: expected an array or null"),
        (edit(("relations", 0), [1259, 11, "pg_class"]), "relations[0]: expected [int, int"),
        (edit(("relations", 0, 0), "1259"), "relations[0]: expected"),
        (edit(("relations", 0, 0), True), "relations[0]: expected"),
        (edit(("relations", 0, 0), 1259.0), "relations[0]: expected"),
        (edit(("columns", 3, 2), None), "columns[3]: expected"),
        (edit(("schemas", 0), "pg_catalog"), "schemas[0]: expected [int, string]"),
        (edit(("relations", 0, 3), "i"), "relkind 'i'"),
        (edit(("relations", 0, 1), 4242), "schema oid 4242 is not in schemas"),
        (edit(("relations", 1, 0), 1259), "listed twice"),
        (edit(("schemas", 1, 0), PG_CATALOG), "schema oid 11 listed twice"),
        (edit(("schemas", 1, 1), "pg_temp_7"), "'pg_temp_7' does not belong"),
        (edit(("columns", 0, 0), 4242), "relation oid 4242 is not in relations"),
        (edit(("columns", 4, 1), 1), "a column number appears twice"),
        (edit(("relations", 8, 5), None), "needs both its parent and its root"),
        (edit(("relations", 8, 4), 4242), "parent 4242 or root 16510 is not in the catalog"),
        (edit(("relations", 9, 5), 16511), "partition root 16511 is itself a partition"),
    ],
)
def test_malformed_documents(doc: str | bytes, message: str) -> None:
    with pytest.raises(CatalogError, match=re.escape(message)):
        from_json(doc)


# -- what other parts of Topeng consume ----------------------------------------------------------


def test_schema_for_sqlglot(catalog: Catalog) -> None:
    schema: Any = catalog.schema_for_sqlglot()
    assert schema["bank"]["customers"] == {
        "id": "integer",
        "nik": "character(16)",
        "tags": "integer[]",
    }
    assert schema["public"]["Customers"] == {"Nik": "text", "a.b": "integer"}
    assert schema["bank"]["customer_view"] == {"id": "integer", "nik": "character(16)"}
    assert schema["public"]["empty"] == {}
    mapping = MappingSchema(schema, dialect="postgres", normalize=False)
    query = sqlglot.parse_one(
        'SELECT * FROM bank.customer_view, public."Customers"', read="postgres"
    )
    sql = qualify(query, schema=mapping, dialect="postgres").sql("postgres")
    assert '"customer_view"."nik" AS "nik"' in sql and '."Nik" AS "Nik"' in sql
    assert '"public"."Customers"' in sql
    schema["bank"].clear()
    fresh: Any = catalog.schema_for_sqlglot()
    assert fresh["bank"]  # a fresh dict on every call


def test_column_infos_for_topeng_check(catalog: Catalog) -> None:
    infos = list(catalog.column_infos())
    assert ("bank", "customers", "nik", "character(16)") in infos
    assert not any(schema in ("pg_catalog", "information_schema") for schema, *_ in infos)
    assert ("pg_catalog", "pg_class", "oid", "oid") in catalog.column_infos(system=True)


def test_catalog_cache() -> None:
    cache = CatalogCache()
    first, second = from_json(DOC), from_json(document(None, None, None))
    assert cache.get("bank") is None and cache.needs_refresh("bank", 0.0, 300.0)
    cache.put("bank", first, now=100.0)
    assert cache.get("bank") is first
    assert not cache.needs_refresh("bank", 399.0, 300.0)
    assert cache.needs_refresh("bank", 400.0, 300.0)
    assert cache.needs_refresh("other", 100.0, 300.0)
    cache.mark_stale("bank")
    entry = cache.entry("bank")
    assert entry is not None and entry.stale and entry.catalog is first
    assert cache.needs_refresh("bank", 101.0, 300.0)
    assert cache.get("bank") is first  # still usable while the reload runs
    epoch = cache.begin_refresh("bank")
    cache.put("bank", second, now=102.0, epoch=epoch)
    assert not cache.needs_refresh("bank", 103.0, 300.0) and cache.get("bank") is second
    epoch = cache.begin_refresh("bank")
    cache.mark_stale("bank")  # DDL while the catalog statement ran
    cache.put("bank", first, now=104.0, epoch=epoch)
    assert cache.needs_refresh("bank", 105.0, 300.0)
    cache.mark_stale("new")  # before any load: the first load is not affected
    cache.put("new", first, now=1.0)
    assert not cache.needs_refresh("new", 2.0, 300.0)


@pytest.mark.parametrize(
    ("tag", "ddl"),
    [
        ("CREATE TABLE", True),
        ("ALTER TABLE", True),
        ("DROP VIEW", True),
        ("CREATE MATERIALIZED VIEW", True),
        ("IMPORT FOREIGN SCHEMA", True),
        ("DO", True),
        ("CALL", True),
        ("SELECT 5", False),
        ("INSERT 0 1", False),
        ("DROPPED", False),
        ("DOUBLE", False),
        ("COMMIT", False),
    ],
)
def test_ddl_tags(tag: str, ddl: bool) -> None:
    assert is_ddl_tag(tag) is ddl


# -- the SQL and the loaders ---------------------------------------------------------------------


@pytest.mark.parametrize("sql", [CATALOG_SQL, SESSION_TEMP_SQL])
def test_sql_qualifies_everything(sql: str) -> None:
    """A session's own search_path must not change what the shared catalog says."""
    assert ";" not in sql and "$" not in sql  # one statement, no parameters
    keywords = {"SELECT", "ANY", "ALL", "OPERATOR"}
    code = re.sub(r"'[^']*'", "''", sql)  # without string literals
    calls = re.findall(r"(?<![.\w])(\w+)\s*\(", code)
    assert [c for c in calls if c.upper() not in keywords] == []
    bare = re.sub(r"OPERATOR\(pg_catalog\.[^)]+\)", "", code)
    assert re.findall(r"[=<>~!]", bare) == []
    casts = re.findall(r"::\s*([\w.]+)", sql)
    assert casts and all(c.startswith("pg_catalog.") for c in casts)
    tables = re.findall(r"(?:FROM|JOIN)\s+([\w.]+)", sql)
    assert tables and all(t.startswith("pg_catalog.") for t in tables)


class FakeConnection:
    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.queries: list[str] = []

    async def fetchval(self, query: str) -> object:
        self.queries.append(query)
        return self.answers.pop(0)


async def test_loaders_with_a_fake_connection() -> None:
    conn = FakeConnection(DOC, temp_doc(), ["pg_temp_3", "pg_catalog", "public"])
    catalog = await load_catalog(conn)
    overlay = await load_session_overlay(conn, catalog)
    path = await load_search_path(conn)
    assert conn.queries == [
        CATALOG_SQL,
        SESSION_TEMP_SQL,
        "SELECT pg_catalog.current_schemas(true)",
    ]
    assert path == ("pg_temp_3", "pg_catalog", "public")
    assert oid_of(overlay, ("customers",), path) == 17000
    with pytest.raises(CatalogError, match="returned NoneType"):
        await load_catalog(FakeConnection(None))
    with pytest.raises(CatalogError, match="current_schemas"):
        await load_search_path(FakeConnection("public"))
