"""The schema catalog: what a relation OID and column number mean, and what a name resolves to.

Strategy: one SQL statement (`CATALOG_SQL`, one round trip, no parameters, safe for the simple
protocol) makes PostgreSQL describe the current database as a single JSON document; `from_json`
checks that document strictly and builds an immutable `Catalog`, built once per refresh and shared
by every session on that database. Sessions never query the catalog themselves: a RowDescription's
(table OID, column number) is a dictionary lookup, and a name in a query is resolved by
`Catalog.resolve` exactly as PostgreSQL resolves it, given the session's effective search_path.
Temporary tables belong to one session, so the shared document leaves every temporary schema out;
`SESSION_TEMP_SQL` describes the session's own temporary schema and
`Catalog.with_session_overlay` lays it over the shared catalog. `CatalogCache` decides when to
reload (sans-I/O: the caller runs the SQL over whatever connection it has and hands over the text).

The document (`"format": 1`), arrays being positional to keep it small:

    {"format": 1, "scope": "database" | "session", "database": "bank",
     "server_version_num": 150004,
     "schemas":   [[oid, name], ...],
     "relations": [[oid, schema_oid, name, relkind, parent_oid, root_oid, view_sql], ...],
     "columns":   [[attrelid, attnum, attname, type_oid, typmod, format_type, typname,
                    element_type_oid, element_format_type, typlen], ...]}

`schemas`, `relations` and `columns` are null when empty (that is what json_agg gives).
relkind is r, p, v, m, f, or S: sequences are included because `SELECT * FROM seq` works, so a
sequence earlier in the search_path shadows a table of the same name. parent_oid and root_oid are
set for partitions only (direct parent; `pg_partition_root`, so PostgreSQL 12 or later); children
of plain inheritance are independent tables here, as they are to RowDescription and to GRANT.
view_sql is `pg_get_viewdef(oid, true)` for views and materialized views outside `pg_catalog` and
`information_schema`; system views are left opaque (their definitions add ~150 KB and ~20 ms to
every refresh, and what they expose is a question of which system views a role may read at all).

Names inside the document do not depend on the loading session: the statement first sets
search_path to '' for its own transaction (`set_config(..., true)`; a CASE makes that happen
before anything else is evaluated), so `format_type` qualifies every type outside pg_catalog
(`public.mood`) and `pg_get_viewdef` every relation, function and operator outside it. Resolve
the names of a view_sql with `catalog.resolve(parts, ())`: pg_catalog, plus the session's
temporary schema in an overlay (a view over a temporary table is itself temporary).

Security: the statement runs over an ordinary user's connection, reads only catalogs every user
may read, and qualifies every function, operator, type and table with `pg_catalog`, so that a
session's own search_path (or a temporary table named pg_class) cannot change what it reports
to the sessions of other users. It is one statement, hence one snapshot. Run it only when the
connection is idle outside a transaction block (ReadyForQuery status `I`): inside one it would
see, and share with everyone, uncommitted DDL that may still roll back, and its search_path
setting would last until the block ends. The caller swallows its replies (any ParameterStatus
included); a view dropped while the statement runs can make pg_get_viewdef fail: retry later.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
from collections.abc import Awaitable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol

__all__ = [
    "CATALOG_FORMAT",
    "CATALOG_SQL",
    "DDL_TAG_PREFIXES",
    "SEARCH_PATH_SQL",
    "SESSION_TEMP_SQL",
    "SYSTEM_SCHEMAS",
    "CacheEntry",
    "Catalog",
    "CatalogCache",
    "CatalogError",
    "Column",
    "RelKind",
    "Relation",
    "from_json",
    "is_ddl_tag",
    "load_catalog",
    "load_search_path",
    "load_session_overlay",
]

CATALOG_FORMAT: Final = 1

RelKind = Literal["table", "partitioned", "view", "matview", "foreign", "sequence"]
_KINDS: Final[Mapping[str, RelKind]] = {
    "r": "table",
    "p": "partitioned",
    "v": "view",
    "m": "matview",
    "f": "foreign",
    "S": "sequence",
}
SYSTEM_SCHEMAS: Final = frozenset({"pg_catalog", "information_schema"})
_TEMP_SCHEMA: Final = re.compile(r"pg_temp_[0-9]+")

_EQ: Final = "OPERATOR(pg_catalog.=)"


def _document_sql(scope: str, schema_filter: str) -> str:
    """The catalog statement for the schemas `schema_filter` (over `n`, a pg_namespace) keeps."""
    return f"""SELECT CASE WHEN pg_catalog.set_config('search_path', '', true) IS NOT NULL
THEN pg_catalog.json_build_object(
  'format', {CATALOG_FORMAT}, 'scope', '{scope}', 'database', pg_catalog.current_database(),
  'server_version_num', pg_catalog.current_setting('server_version_num')::pg_catalog.int4,
  'schemas', (SELECT pg_catalog.json_agg(
      pg_catalog.json_build_array(n.oid::pg_catalog.int8, n.nspname) ORDER BY n.oid)
    FROM pg_catalog.pg_namespace n WHERE {schema_filter}),
  'relations', (SELECT pg_catalog.json_agg(pg_catalog.json_build_array(
      c.oid::pg_catalog.int8, c.relnamespace::pg_catalog.int8, c.relname, c.relkind,
      i.inhparent::pg_catalog.int8,
      CASE WHEN c.relispartition THEN pg_catalog.pg_partition_root(c.oid)::pg_catalog.int8 END,
      CASE WHEN c.relkind {_EQ} ANY ('{{v,m}}')
        AND n.nspname OPERATOR(pg_catalog.<>) ALL ('{{pg_catalog,information_schema}}')
        THEN pg_catalog.pg_get_viewdef(c.oid, true) END) ORDER BY c.oid)
    FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_namespace n ON n.oid {_EQ} c.relnamespace
    LEFT JOIN pg_catalog.pg_inherits i ON c.relispartition AND i.inhrelid {_EQ} c.oid
    WHERE c.relkind {_EQ} ANY ('{{r,p,v,m,f,S}}') AND {schema_filter}),
  'columns', (SELECT pg_catalog.json_agg(pg_catalog.json_build_array(
      a.attrelid::pg_catalog.int8, a.attnum, a.attname, a.atttypid::pg_catalog.int8, a.atttypmod,
      pg_catalog.format_type(a.atttypid, a.atttypmod), t.typname,
      e.oid::pg_catalog.int8, pg_catalog.format_type(e.oid, a.atttypmod), t.typlen)
      ORDER BY a.attrelid, a.attnum)
    FROM pg_catalog.pg_attribute a
    JOIN pg_catalog.pg_class c ON c.oid {_EQ} a.attrelid
    JOIN pg_catalog.pg_namespace n ON n.oid {_EQ} c.relnamespace
    JOIN pg_catalog.pg_type t ON t.oid {_EQ} a.atttypid
    LEFT JOIN pg_catalog.pg_type e ON t.typcategory {_EQ} 'A' AND e.oid {_EQ} t.typelem
    WHERE a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
      AND c.relkind {_EQ} ANY ('{{r,p,v,m,f,S}}') AND {schema_filter})
)::pg_catalog.text END"""


CATALOG_SQL: Final = _document_sql(
    # every schema but pg_toast and the temporary ones (pg_temp_N, pg_toast_temp_N) of any
    # session; names beginning with pg_ are reserved, so no user schema is caught by this
    "database",
    "n.nspname OPERATOR(pg_catalog.!~) '^pg_(toast|temp_)'",
)
"""The shared catalog of the current database: one row, one text column (a JSON document)."""

SESSION_TEMP_SQL: Final = _document_sql("session", f"n.oid {_EQ} pg_catalog.pg_my_temp_schema()")
"""The relations of this session's own temporary schema, in the same format (empty if none)."""

SEARCH_PATH_SQL: Final = "SELECT pg_catalog.current_schemas(true)"
"""The effective search_path `Catalog.resolve` wants: implicit schemas included, in order."""


class CatalogError(ValueError):
    """A catalog document is malformed or inconsistent."""


@dataclass(frozen=True, slots=True)
class Column:
    """One live column (attnum > 0, not dropped) of a relation."""

    attnum: int
    name: str
    type_oid: int
    typmod: int
    type_name: str  # format_type(atttypid, atttypmod): 'character varying(20)', 'integer[]'
    typname: str  # pg_type.typname: 'varchar', '_int4'
    element_type_oid: int | None  # arrays only
    element_type_name: str | None  # arrays only, format_type of the element: 'integer'
    typlen: int  # -1 varlena, -2 cstring, else bytes

    @property
    def base_type_name(self) -> str:
        """The element type of an array column, else the column's own type."""
        return self.type_name if self.element_type_name is None else self.element_type_name


@dataclass(frozen=True, slots=True)
class Relation:
    """A table, partitioned table, view, materialized view, foreign table or sequence."""

    oid: int
    schema: str
    name: str
    kind: RelKind
    columns: tuple[Column, ...]  # ordered by attnum
    parent_oid: int | None = None  # partitions only: the direct parent
    root_oid: int | None = None  # partitions only: the top of the partition tree
    view_sql: str | None = None  # views and matviews outside SYSTEM_SCHEMAS
    partition_root: Relation | None = field(default=None, repr=False, compare=False)
    _by_attnum: Mapping[int, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_attnum", {c.attnum: c for c in self.columns})

    @property
    def root(self) -> Relation:
        """The partition root of a partition; any other relation is its own root."""
        return self if self.partition_root is None else self.partition_root

    @property
    def is_partition(self) -> bool:
        return self.parent_oid is not None

    @property
    def is_system(self) -> bool:
        return self.schema in SYSTEM_SCHEMAS

    def column(self, attnum: int) -> Column | None:
        return self._by_attnum.get(attnum)


@dataclass(frozen=True, slots=True, eq=False)
class Catalog:
    """The relations of one database; immutable, so every session may share it.

    Build it with `from_json`; lay a session's temporary relations over it with
    `with_session_overlay`.
    """

    database: str
    server_version_num: int
    schemas: Mapping[int, str]  # oid -> name
    relations_by_oid: Mapping[int, Relation]
    fingerprint: str  # changes whenever the document does: key analysis caches with it
    temp_schema: str | None = None  # the session's pg_temp_N, in an overlay only
    shared: Catalog | None = field(default=None, repr=False)  # what an overlay lies over
    _by_name: Mapping[tuple[str, str], Relation] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        by_name = {(r.schema, r.name): r for r in self.relations_by_oid.values()}
        object.__setattr__(self, "_by_name", MappingProxyType(by_name))

    def relation(self, oid: int) -> Relation | None:
        return self.relations_by_oid.get(oid)

    def column(self, table_oid: int, attnum: int) -> Column | None:
        """What RowDescription's (table OID, column number) names, if it names a column."""
        relation = self.relations_by_oid.get(table_oid)
        return None if relation is None else relation.column(attnum)

    def find(self, schema: str, name: str) -> Relation | None:
        """`schema.name`, compared exactly; `pg_temp` means this session's temporary schema."""
        if schema == "pg_temp":
            if self.temp_schema is None:
                return None
            schema = self.temp_schema
        return self._by_name.get((schema, name))

    def search_path(self, search_path: tuple[str, ...]) -> tuple[str, ...]:
        """The schemas PostgreSQL searches for an unqualified relation name, in order.

        `search_path` should be `current_schemas(true)` (see `load_search_path`), which already
        is this list. For any other list, PostgreSQL's rules: `pg_temp` stands for the session's
        temporary schema; pg_catalog, unless listed, is searched first; the temporary schema,
        unless listed, before even that.
        """
        path = [self.temp_schema if s == "pg_temp" else s for s in search_path]
        schemas = [s for s in path if s is not None]
        if "pg_catalog" not in schemas:
            schemas.insert(0, "pg_catalog")
        if self.temp_schema is not None and self.temp_schema not in schemas:
            schemas.insert(0, self.temp_schema)
        return tuple(schemas)

    def resolve(self, name_parts: tuple[str, ...], search_path: tuple[str, ...]) -> Relation | None:
        """The relation a (case-folded, unquoted) name means, as PostgreSQL would resolve it.

        1 part: the first schema of `self.search_path(search_path)` that has it. 2 parts:
        schema.name. 3 parts: database.schema.name, None unless the database is this one.
        """
        if len(name_parts) == 1:
            for schema in self.search_path(search_path):
                relation = self._by_name.get((schema, name_parts[0]))
                if relation is not None:
                    return relation
            return None
        if len(name_parts) == 2:
            return self.find(name_parts[0], name_parts[1])
        if len(name_parts) == 3 and name_parts[0] == self.database:
            return self.find(name_parts[1], name_parts[2])
        return None

    def schema_for_sqlglot(self) -> dict[str, object]:
        """{schema: {relation: {column: format_type}}} for `sqlglot.schema.MappingSchema`.

        Typed as MappingSchema's parameter is; views, matviews and partitions are included.

        Names are exact catalog names, so build it with `normalize=False`:
        `MappingSchema(catalog.schema_for_sqlglot(), dialect="postgres", normalize=False)`
        (qualify still folds the query's unquoted identifiers). A fresh dict on every call:
        cache the MappingSchema by `fingerprint`.
        """
        schemas: dict[str, dict[str, dict[str, str]]] = {}
        for relation in self.relations_by_oid.values():
            tables = schemas.setdefault(relation.schema, {})
            tables[relation.name] = {c.name: c.type_name for c in relation.columns}
        return dict(schemas)

    def column_infos(self, *, system: bool = False) -> Iterator[tuple[str, str, str, str]]:
        """(schema, relation, column, format_type) of every column, as `topeng check` wants."""
        for relation in self.relations_by_oid.values():
            if system or not relation.is_system:
                for c in relation.columns:
                    yield relation.schema, relation.name, c.name, c.type_name

    def with_session_overlay(self, temp_doc: str | bytes) -> Catalog:
        """This catalog plus the relations of a session's temporary schema (`SESSION_TEMP_SQL`).

        Called on an overlay, it replaces that overlay's temporary relations.
        """
        shared = self if self.shared is None else self.shared
        doc = _parse(temp_doc, "session")
        if doc.database != shared.database:
            raise CatalogError(
                f"session document is of database {doc.database!r}, not {shared.database!r}"
            )
        if not doc.relations:
            return shared
        if len(doc.schemas) != 1:
            raise CatalogError(f"session document lists {len(doc.schemas)} temporary schemas")
        temp_schema = next(iter(doc.schemas.values()))
        known = {**shared.relations_by_oid, **doc.relations}
        relations = {**shared.relations_by_oid, **_link_roots(doc.relations, known)}
        return Catalog(
            database=shared.database,
            server_version_num=shared.server_version_num,
            schemas=MappingProxyType({**shared.schemas, **doc.schemas}),
            relations_by_oid=MappingProxyType(relations),
            fingerprint=_digest(f"{shared.fingerprint}\0{doc.digest}".encode()),
            temp_schema=temp_schema,
            shared=shared,
        )


def from_json(doc: str | bytes) -> Catalog:
    """The Catalog a `CATALOG_SQL` document describes; CatalogError if it is malformed."""
    parsed = _parse(doc, "database")
    return Catalog(
        database=parsed.database,
        server_version_num=parsed.server_version_num,
        schemas=MappingProxyType(parsed.schemas),
        relations_by_oid=MappingProxyType(_link_roots(parsed.relations, parsed.relations)),
        fingerprint=parsed.digest,
    )


# -- parsing -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Document:
    database: str
    server_version_num: int
    schemas: dict[int, str]
    relations: dict[int, Relation]  # partition_root not linked yet
    digest: str


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


_N: Final = type(None)
_SCHEMA_ROW: Final = ((int,), (str,))
_RELATION_ROW: Final = ((int,), (int,), (str,), (str,), (int, _N), (int, _N), (str, _N))
_COLUMN_ROW: Final = (
    *((int,), (int,), (str,), (int,), (int,), (str,), (str,)),
    *((int, _N), (str, _N), (int,)),
)


def _parse(doc: str | bytes, scope: str) -> _Document:
    raw = doc.encode() if isinstance(doc, str) else bytes(doc)
    try:
        top = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CatalogError(f"catalog document is not JSON: {exc}") from None
    if type(top) is not dict:
        raise CatalogError("catalog document: expected a JSON object")
    if top.get("format") != CATALOG_FORMAT:
        raise CatalogError(f"catalog document: format {top.get('format')!r}, expected 1")
    if top.get("scope") != scope:
        raise CatalogError(f"catalog document: scope {top.get('scope')!r}, expected {scope!r}")
    database = top.get("database")
    version = top.get("server_version_num")
    if type(database) is not str or type(version) is not int:
        raise CatalogError("catalog document: database must be a string, server_version_num an int")

    schemas: dict[int, str] = {}
    for i, (oid, name) in enumerate(_rows(top, "schemas", _SCHEMA_ROW)):
        if oid in schemas:
            raise CatalogError(f"schemas[{i}]: schema oid {oid} listed twice")
        if (scope == "session") != bool(_TEMP_SCHEMA.fullmatch(name)):
            raise CatalogError(f"schemas[{i}]: {name!r} does not belong in a {scope} document")
        schemas[oid] = name

    columns: dict[int, list[Column]] = {}
    for row in _rows(top, "columns", _COLUMN_ROW):
        columns.setdefault(row[0], []).append(Column(*row[1:]))

    relations: dict[int, Relation] = {}
    for i, (oid, schema_oid, name, relkind, parent, root, view_sql) in enumerate(
        _rows(top, "relations", _RELATION_ROW)
    ):
        where = f"relations[{i}] (oid {oid})"
        kind = _KINDS.get(relkind)
        if kind is None:
            raise CatalogError(f"{where}: relkind {relkind!r}, expected one of r p v m f S")
        if schema_oid not in schemas:
            raise CatalogError(f"{where}: schema oid {schema_oid} is not in schemas")
        if oid in relations:
            raise CatalogError(f"{where}: listed twice")
        if (parent is None) != (root is None):
            raise CatalogError(f"{where}: a partition needs both its parent and its root")
        cols = sorted(columns.pop(oid, ()), key=lambda c: c.attnum)
        if len({c.attnum for c in cols}) != len(cols):
            raise CatalogError(f"{where}: a column number appears twice")
        relations[oid] = Relation(
            oid, schemas[schema_oid], name, kind, tuple(cols), parent, root, view_sql
        )
    if columns:
        raise CatalogError(f"columns: relation oid {min(columns)} is not in relations")
    return _Document(database, version, schemas, relations, _digest(raw))


def _link_roots(
    relations: Mapping[int, Relation], known: Mapping[int, Relation]
) -> dict[int, Relation]:
    """`relations` with each partition's `partition_root` set from `known`; CatalogError if a
    partition's parent or root is not known."""
    linked = dict(relations)
    for oid, relation in relations.items():
        if relation.root_oid is None or relation.parent_oid is None:
            continue
        root = known.get(relation.root_oid)
        if root is None or relation.parent_oid not in known:
            raise CatalogError(
                f"partition {relation.schema}.{relation.name} (oid {oid}): its parent "
                f"{relation.parent_oid} or root {relation.root_oid} is not in the catalog"
            )
        if root.root_oid is not None:
            raise CatalogError(f"partition root {root.oid} is itself a partition")
        linked[oid] = replace(relation, partition_root=root)
    return linked


def _rows(top: dict[str, Any], key: str, shape: tuple[tuple[type, ...], ...]) -> list[list[Any]]:
    """`top[key]`: null (json_agg of nothing) or an array of rows, each typed as `shape` says."""
    rows = top.get(key, ...)
    if rows is None:
        return []
    if type(rows) is not list:
        raise CatalogError(f"{key}: expected an array or null")
    signatures = _signatures(shape)
    for i, row in enumerate(rows):
        if type(row) is not list or tuple(map(type, row)) not in signatures:
            raise CatalogError(f"{key}[{i}]: expected {_describe(shape)}, got {row!r}")
    return rows


@functools.cache
def _signatures(shape: tuple[tuple[type, ...], ...]) -> frozenset[tuple[type, ...]]:
    """Every tuple of value types a row of `shape` may have."""
    return frozenset(itertools.product(*shape))


def _describe(shape: tuple[tuple[type, ...], ...]) -> str:
    names = {int: "int", str: "string", _N: "null"}
    return "[" + ", ".join("|".join(names[t] for t in types) for types in shape) + "]"


# -- the cache -----------------------------------------------------------------------------------

DDL_TAG_PREFIXES: Final = ("CREATE", "ALTER", "DROP", "IMPORT FOREIGN SCHEMA", "DO", "CALL")
"""CommandComplete tags after which the catalog may have changed. DO and CALL may run anything.
CREATE TABLE AS and SELECT INTO complete as `SELECT n`: the caller must mark those from the
parsed statement kind, not from the tag."""


def is_ddl_tag(tag: str) -> bool:
    """Whether a CommandComplete tag means the schema may have changed."""
    return any(tag == p or tag.startswith(p + " ") for p in DDL_TAG_PREFIXES)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    catalog: Catalog
    loaded_at: float
    stale: bool = False


class CatalogCache:
    """The current Catalog of each upstream database, and when to reload it. Sans-I/O.

    A refresh: `epoch = cache.begin_refresh(db)`, run CATALOG_SQL, then
    `cache.put(db, from_json(text), now, epoch=epoch)`. DDL seen while the statement ran
    (`mark_stale`) leaves the new entry stale, so the next check reloads it again.
    """

    def __init__(self) -> None:
        self._entries: dict[str, CacheEntry] = {}
        self._epochs: dict[str, int] = {}

    def get(self, db: str) -> Catalog | None:
        entry = self._entries.get(db)
        return None if entry is None else entry.catalog

    def entry(self, db: str) -> CacheEntry | None:
        return self._entries.get(db)

    def needs_refresh(self, db: str, now: float, interval: float) -> bool:
        """Missing, stale, or loaded `interval` seconds ago or earlier."""
        entry = self._entries.get(db)
        return entry is None or entry.stale or now - entry.loaded_at >= interval

    def begin_refresh(self, db: str) -> int:
        """The DDL epoch to hand to `put` once the catalog statement has run."""
        return self._epochs.get(db, 0)

    def put(self, db: str, catalog: Catalog, now: float, *, epoch: int | None = None) -> None:
        stale = epoch is not None and epoch != self._epochs.get(db, 0)
        self._entries[db] = CacheEntry(catalog, now, stale)

    def mark_stale(self, db: str) -> None:
        """DDL was seen on `db`: reload before trusting the catalog again."""
        self._epochs[db] = self._epochs.get(db, 0) + 1
        entry = self._entries.get(db)
        if entry is not None and not entry.stale:
            self._entries[db] = CacheEntry(entry.catalog, entry.loaded_at, True)


# -- loading over asyncpg ------------------------------------------------------------------------


class _Connection(Protocol):
    """What we use of an asyncpg connection."""

    def fetchval(self, query: str) -> Awaitable[object]: ...


async def load_catalog(conn: _Connection) -> Catalog:
    """The shared Catalog of the database `conn` (an asyncpg connection) is connected to."""
    return from_json(_text(await conn.fetchval(CATALOG_SQL)))


async def load_session_overlay(conn: _Connection, catalog: Catalog) -> Catalog:
    """`catalog` with the temporary relations of the session of `conn` laid over it."""
    return catalog.with_session_overlay(_text(await conn.fetchval(SESSION_TEMP_SQL)))


async def load_search_path(conn: _Connection) -> tuple[str, ...]:
    """The session's effective search_path, `current_schemas(true)`, for `Catalog.resolve`."""
    value = await conn.fetchval(SEARCH_PATH_SQL)
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise CatalogError(f"current_schemas(true) returned {value!r}")
    return tuple(value)


def _text(value: object) -> str | bytes:
    if not isinstance(value, str | bytes):
        raise CatalogError(f"catalog statement returned {type(value).__name__}, not text")
    return value
