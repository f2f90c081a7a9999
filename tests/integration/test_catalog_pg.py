"""The catalog against a real PostgreSQL: what it reports; names resolve as the server does.

Each run works in a fresh database with a random name, dropped at the end. The server is
TOPENG_CATALOG_TEST_DSN (a superuser URL) when set, else the harness's `pg`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import psycopg
import pytest
from sqlglot.schema import MappingSchema

from proxy.policy.catalog import (
    CATALOG_SQL,
    Catalog,
    CatalogCache,
    from_json,
    load_catalog,
    load_search_path,
    load_session_overlay,
)

SCHEMA_SQL = (
    Path(__file__).resolve().parents[1] / "fixtures" / "catalog" / "schema.sql"
).read_text()


@dataclass(frozen=True)
class Database:
    dsn: str  # superuser, in the fresh database
    name: str

    def as_user(self, user: str, password: str) -> str:
        parts = urlsplit(self.dsn)
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}"
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))


def _with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + quote(name, safe="")))


@pytest.fixture(scope="module")
def server_dsn(request: pytest.FixtureRequest) -> str:
    dsn = os.environ.get("TOPENG_CATALOG_TEST_DSN")
    if dsn:
        return dsn
    pg: Any = request.getfixturevalue("pg")
    return str(pg.superuser_dsn)


@pytest.fixture(scope="module")
async def database(server_dsn: str) -> AsyncIterator[Database]:
    name = "topeng_catalog_" + secrets.token_hex(6)
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        db = Database(_with_database(server_dsn, name), name)
        conn = await asyncpg.connect(db.dsn)
        try:
            await conn.execute(SCHEMA_SQL)
        finally:
            await conn.close()
        yield db
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def conn(database: Database) -> AsyncIterator[Any]:
    connection = await asyncpg.connect(database.dsn)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def catalog(conn: Any) -> Catalog:
    return await load_catalog(conn)


def _get(catalog: Catalog, schema: str, name: str) -> Any:
    relation = catalog.find(schema, name)
    assert relation is not None, f"{schema}.{name} is not in the catalog"
    return relation


async def test_relations_and_columns(catalog: Catalog, conn: Any, database: Database) -> None:
    assert catalog.database == database.name
    assert catalog.server_version_num == int(await conn.fetchval("SHOW server_version_num"))
    kinds = {
        ("public", "customers"): "table",
        ("bank", "customers"): "table",
        ("public", "customer_accounts"): "view",
        ("public", "balances"): "matview",
        ("public", "events"): "partitioned",
        ("public", "events_2024"): "partitioned",
        ("public", "events_2024_jawa"): "table",
        ("public", "remote_customers"): "foreign",
        ("public", "Mixed Case"): "table",
        ("public", "customers_id_seq"): "sequence",
    }
    for (schema, name), kind in kinds.items():
        assert _get(catalog, schema, name).kind == kind
    # every column and OID agrees with pg_attribute (types named as with an empty search_path)
    await conn.execute("SET search_path = ''")
    rows = await conn.fetch(
        "SELECT a.attrelid::int8 AS oid, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod)"
        " AS type FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname IN ('public', 'bank') AND c.relkind IN ('r','p','v','m','f','S')"
        " AND a.attnum > 0 AND NOT a.attisdropped"
    )
    assert len(rows) == len(list(catalog.column_infos()))
    for row in rows:
        column = catalog.column(row["oid"], row["attnum"])
        assert column is not None and (column.name, column.type_name) == (
            row["attname"],
            row["type"],
        )
    customers = _get(catalog, "public", "customers")
    assert [(c.attnum, c.name) for c in customers.columns] == [(1, "id"), (3, "nik"), (4, "tags")]
    nik, tags = customers.column(3), customers.column(4)
    assert nik.type_name == "character(16)" and nik.typname == "bpchar" and nik.typmod == 20
    assert tags.type_name == "character varying(20)[]" and tags.element_type_oid == 1043
    assert tags.base_type_name == "character varying(20)" and tags.typlen == -1
    assert customers.column(2) is None  # dropped
    mood, moods = _get(catalog, "bank", "moods").columns[1:]
    assert (mood.type_name, moods.type_name, moods.base_type_name) == (
        "public.mood",
        "public.mood[]",
        "public.mood",
    )
    mixed = _get(catalog, "public", "Mixed Case")
    assert [c.name for c in mixed.columns] == ["Nik", "a.b"]


async def test_views_partitions_and_system_relations(catalog: Catalog) -> None:
    view = _get(catalog, "public", "customer_accounts")
    assert "JOIN public.accounts" in view.view_sql and "FROM public.customers" in view.view_sql
    assert [c.name for c in view.columns] == ["id", "nik", "balance"]
    assert "sum(" in _get(catalog, "public", "balances").view_sql
    events = _get(catalog, "public", "events")
    sub = _get(catalog, "public", "events_2024")
    jawa = _get(catalog, "public", "events_2024_jawa")
    assert (jawa.parent_oid, jawa.root_oid) == (sub.oid, events.oid) and jawa.root is events
    assert sub.root is events and _get(catalog, "public", "events_2025").root is events
    assert events.root is events and not events.is_partition
    child = _get(catalog, "public", "inherits_child")  # plain inheritance: not a partition
    assert child.parent_oid is None and child.root is child
    pg_stats = _get(catalog, "pg_catalog", "pg_stats")
    assert pg_stats.kind == "view" and pg_stats.view_sql is None and pg_stats.column(1)
    assert _get(catalog, "information_schema", "columns").columns
    assert not any(s.startswith(("pg_temp", "pg_toast")) for s in catalog.schemas.values())


async def test_row_description_oids_match(catalog: Catalog, database: Database) -> None:
    """RowDescription's table OID and column number are what the catalog says they are."""
    queries = {
        "SELECT nik, id FROM public.customers": [("customers", "nik"), ("customers", "id")],
        "SELECT c.nik AS x FROM customer_accounts c": [("customer_accounts", "nik")],
        'SELECT "a.b", "Nik" FROM "Mixed Case"': [("Mixed Case", "a.b"), ("Mixed Case", "Nik")],
        "SELECT region FROM events": [("events", "region")],
        "SELECT region FROM events_2024_jawa": [("events_2024_jawa", "region")],
        "SELECT total FROM balances": [("balances", "total")],
    }
    with psycopg.connect(database.dsn, autocommit=True) as pconn:
        pconn.execute("SET search_path = public")
        for sql, expected in queries.items():
            result = pconn.execute(sql).pgresult
            assert result is not None
            found = []
            for i in range(result.nfields):
                column = catalog.column(result.ftable(i), result.ftablecol(i))
                relation = catalog.relation(result.ftable(i))
                assert column is not None and relation is not None, sql
                found.append((relation.name, column.name))
            assert found == expected, sql


async def _server_resolves(conn: Any, name: str) -> int | None:
    oid = await conn.fetchval("SELECT to_regclass($1)::oid::int8", name)
    return None if oid is None else int(oid)


async def test_temp_shadowing_and_search_path(conn: Any, catalog: Catalog) -> None:
    await conn.execute("CREATE TEMP TABLE customers (id int, note text)")
    overlay = await load_session_overlay(conn, catalog)
    assert overlay.temp_schema is not None and overlay.temp_schema.startswith("pg_temp_")
    shared = await load_catalog(conn)  # loaded on this very session: still no temp relations
    assert shared.fingerprint == catalog.fingerprint
    settings = [
        ("public", "customers"),
        ("bank, public", "customers"),
        ("public, pg_temp", "customers"),
        ("bank, pg_temp, public", "customers"),
        ("pg_catalog, pg_temp", "customers"),
        ("public, pg_catalog", "pg_class"),
        ("public", "pg_class"),
        ('public, "$user"', '"Mixed Case"'),
        ("bank", "remote_customers"),
        ("''", "customers"),
    ]
    seen = set()
    for search_path, name in settings:
        await conn.execute(f"SET search_path = {search_path}")
        path = await load_search_path(conn)
        assert path[0] == overlay.temp_schema or "pg_temp" in search_path
        parts = (name.strip('"'),)
        relation = overlay.resolve(parts, path)
        expected = await _server_resolves(conn, name)
        assert (relation.oid if relation else None) == expected, (search_path, name, path)
        seen.add(expected)
    assert len(seen) >= 5  # the settings above really resolve to different relations
    temp = overlay.resolve(("customers",), ("public",))
    assert temp is not None and temp.schema == overlay.temp_schema
    assert [c.name for c in temp.columns] == ["id", "note"]
    assert overlay.resolve(("pg_temp", "customers"), ()) is temp
    assert overlay.find("public", "customers") is catalog.find("public", "customers")
    await conn.execute("DROP TABLE pg_temp.customers")
    assert await load_session_overlay(conn, overlay) is catalog


async def test_three_part_names(conn: Any, catalog: Catalog, database: Database) -> None:
    relation = catalog.resolve((database.name, "public", "customers"), ())
    assert relation is not None and relation.oid == await _server_resolves(
        conn, f'"{database.name}".public.customers'
    )
    assert catalog.resolve(("postgres", "public", "customers"), ()) is None


async def test_ddl_then_reload(conn: Any, catalog: Catalog) -> None:
    cache = CatalogCache()
    cache.put(catalog.database, catalog, now=0.0)
    assert (await load_catalog(conn)).fingerprint == catalog.fingerprint  # deterministic
    await conn.execute("ALTER TABLE public.customers ADD COLUMN phone text")
    cache.mark_stale(catalog.database)
    assert cache.needs_refresh(catalog.database, 1.0, 300.0)
    epoch = cache.begin_refresh(catalog.database)
    reloaded = await load_catalog(conn)
    cache.put(catalog.database, reloaded, now=1.0, epoch=epoch)
    assert not cache.needs_refresh(catalog.database, 2.0, 300.0)
    assert reloaded.fingerprint != catalog.fingerprint
    phone = reloaded.column(_get(reloaded, "public", "customers").oid, 5)
    assert phone is not None and phone.name == "phone" and phone.type_name == "text"
    assert _get(catalog, "public", "customers").column(5) is None  # the old one is unchanged
    await conn.execute("ALTER TABLE public.customers DROP COLUMN phone")


async def test_ordinary_user_sees_the_same_catalog(database: Database, catalog: Catalog) -> None:
    user, password = "topeng_cat_" + secrets.token_hex(4), secrets.token_hex(12)
    admin = await asyncpg.connect(database.dsn)
    try:
        await admin.execute(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
        try:
            plain = await asyncpg.connect(database.as_user(user, password))
            try:
                await plain.execute("SET search_path = public, pg_catalog")
                assert (await load_catalog(plain)).fingerprint == catalog.fingerprint
            finally:
                await plain.close()
        finally:
            await admin.execute(f"DROP ROLE {user}")
    finally:
        await admin.close()


async def test_sqlglot_accepts_every_type(catalog: Catalog) -> None:
    mapping = MappingSchema(catalog.schema_for_sqlglot(), dialect="postgres", normalize=False)
    for schema, table, column, _ in catalog.column_infos(system=True):
        mapping.get_column_type(f'"{schema}"."{table}"', f'"{column}"')
    assert set(mapping.column_names('public."Mixed Case"')) == {"Nik", "a.b"}


async def test_catalog_statement_is_quick(conn: Any) -> None:
    """Not a benchmark: catches a statement that turns quadratic. Typical: 8-15 ms."""
    import time

    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        doc = await conn.fetchval(CATALOG_SQL)
        best = min(best, time.perf_counter() - started)
    assert best < 0.5
    assert from_json(doc).relations_by_oid
