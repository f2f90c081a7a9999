"""Rules: load a YAML file or a directory of them, validate, and return an immutable snapshot.

Strategy: three passes. (1) Read every source file into position-carrying nodes
(`proxy.policy.yamlsrc`) and split each document's top-level keys into one shared pool, so a
role, a label, a (role, label) policy or a single-valued top-level key written twice, in one file
or in two, is reported with both places. (2) Validate each pooled entry on its own: types, known
keys (with a did-you-mean), mask names and parameters, globs that can never match. (3) Check the
cross-references (`default_role`, roles and labels named by policies), which only makes sense
when every file could be read. Every problem is collected; `load_rules` raises `RulesError` with
all of them, sorted by file, line and column, or returns a `Rules` snapshot built from frozen
dataclasses, tuples, frozensets and `MappingProxyType`s that nothing can change afterwards.
Problems that do not make the rules unsafe to use (a label no policy mentions, `hash` without a
configured key) are kept as `Rules.warnings`; `topeng check` prints them.

The format itself is documented for DBAs in docs/rules.md and for editors in
rules/topeng-rules.schema.json; keep the three in agreement.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from proxy.policy.yamlsrc import Pos, YamlSourceError, YMap, YNode, YScalar, YSeq, parse_yaml

__all__ = [
    "ALWAYS_PERMITTED",
    "FAKE_KINDS",
    "FILTER_MODES",
    "MASKS",
    "STATEMENT_KINDS",
    "HashKeySpec",
    "Label",
    "LabelPolicy",
    "Role",
    "RuleIssue",
    "Rules",
    "RulesError",
    "load_rules",
]

STATEMENT_KINDS: Final = (
    "select",
    "insert",
    "update",
    "delete",
    "copy_in",
    "copy_out",
    "ddl",
    "transaction",
    "set",
    "show",
    "explain",
    "call",
    "do",
    "listen",
    "prepare",
    "cursor",
)
"""Statement kinds a role's `statements` may name (the analyzer classifies into these)."""

ALWAYS_PERMITTED: Final = frozenset({"transaction", "set", "show"})
"""Kinds every role may run: drivers send them on connect and around every transaction."""

DEFAULT_STATEMENTS: Final = frozenset({"select"})
FILTER_MODES: Final = ("equality", "any", "deny")
FAKE_KINDS: Final = ("name", "address", "city", "phone", "email")
ROUND_UNITS: Final = ("month", "year")
PG_NAME_MAX_BYTES: Final = 63  # NAMEDATALEN - 1: longer role names are truncated by PostgreSQL

PolicyKind = Literal["allow", "deny", "mask"]
FilterMode = Literal["equality", "any", "deny"]

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|h|d)\s*")
_DURATION_MS: Final = {"ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_GLOB_CHARS = frozenset("*?[")


# --------------------------------------------------------------------------------------------
# The snapshot


@dataclass(frozen=True, slots=True, order=True)
class RuleIssue:
    """One problem in the rules, printed as `path:line:column: message`."""

    path: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.message}"


class RulesError(Exception):
    """The rules cannot be used; `errors` holds every problem found, sorted."""

    def __init__(self, errors: list[RuleIssue]) -> None:
        self.errors = sorted(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


@dataclass(frozen=True, slots=True)
class Role:
    """A role as written, with defaults filled in.

    `statements` are the kinds the role may run besides `ALWAYS_PERMITTED`; for a restricted
    role it defaults to `{select}`, and it contains `copy_out` / `copy_in` exactly when the
    `copy_out` / `copy_in` keys permit them. An unrestricted role permits every kind, has no
    limits and is never masked.
    """

    name: str
    users: tuple[str, ...] = ()
    member_of: tuple[str, ...] = ()
    unrestricted: bool = False
    statements: frozenset[str] = DEFAULT_STATEMENTS
    max_rows_per_query: int | None = None
    max_rows_per_minute: int | None = None
    max_rows_per_hour: int | None = None
    max_queries_per_minute: int | None = None
    on_row_limit: Literal["error", "truncate"] = "error"
    copy_out: Literal["deny", "allow", "mask"] = "deny"
    copy_in: Literal["deny", "allow"] = "deny"
    statement_timeout_ms: int | None = None
    require_where: tuple[str, ...] = ()
    pos: Pos | None = field(default=None, compare=False, repr=False)

    @property
    def permitted_statements(self) -> frozenset[str]:
        """Every statement kind this role may run."""
        if self.unrestricted:
            return frozenset(STATEMENT_KINDS)
        return self.statements | ALWAYS_PERMITTED

    def permits(self, kind: str) -> bool:
        return kind in self.permitted_statements


@dataclass(frozen=True, slots=True)
class Label:
    """A name for sensitive data and the `schema.table.column` globs that carry it.

    Each glob part is matched on its own (so `*` never crosses a dot), case-sensitively, against
    catalog names as PostgreSQL stores them (unquoted identifiers are already lower case).
    """

    name: str
    globs: tuple[str, ...]
    pos: Pos | None = field(default=None, compare=False, repr=False)
    _compiled: tuple[tuple[re.Pattern[str], ...], ...] = field(
        default=(), compare=False, repr=False
    )

    def matches(self, schema: str, table: str, column: str) -> bool:
        compiled = self._compiled or tuple(_compile_parts(g) for g in self.globs)
        for parts in compiled:
            if len(parts) != 3:
                continue
            if (
                parts[0].fullmatch(schema)
                and parts[1].fullmatch(table)
                and parts[2].fullmatch(column)
            ):
                return True
        return False


@dataclass(frozen=True, slots=True)
class LabelPolicy:
    """What one role sees of one label: `allow`, `deny`, or `mask` with a mask and parameters.

    `params` holds every parameter of the mask with its default filled in (see docs/rules.md).
    `filter` says how a masked column may appear in predicates; `max_lookups_per_minute` caps how
    many statements a minute may filter on it.
    """

    kind: PolicyKind
    mask: str | None = None
    param_items: tuple[tuple[str, object], ...] = ()
    filter: FilterMode = "equality"
    max_lookups_per_minute: int | None = None
    pos: Pos | None = field(default=None, compare=False, repr=False)

    @property
    def params(self) -> Mapping[str, object]:
        return MappingProxyType(dict(self.param_items))


ALLOW: Final = LabelPolicy("allow")
DENY: Final = LabelPolicy("deny")


@dataclass(frozen=True, slots=True)
class HashKeySpec:
    """Where the secret key of the `hash` mask comes from: an environment variable or a file."""

    env: str | None = None
    file: Path | None = None
    pos: Pos | None = field(default=None, compare=False, repr=False)

    def read(self) -> bytes:
        """The key; raises LookupError (a missing variable) or OSError (an unreadable file)."""
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise LookupError(f"hash_key: environment variable {self.env} is not set")
            return value.encode()
        if self.file is None:  # pragma: no cover - the loader guarantees one of the two
            raise LookupError("hash_key: neither env nor file is set")
        key = self.file.read_bytes().strip()
        if not key:
            raise LookupError(f"hash_key: file {self.file} is empty")
        return key


@dataclass(frozen=True, slots=True, eq=False)
class Rules:
    """An immutable, validated rules snapshot."""

    roles: tuple[Role, ...]
    default_role: str
    labels: tuple[Label, ...]
    policies: Mapping[str, Mapping[str, LabelPolicy]]
    sources: tuple[Path, ...]
    limits_backend: str = "memory"
    hash_key: HashKeySpec | None = None
    version: int = 1
    warnings: tuple[RuleIssue, ...] = ()
    labels_pos: Pos | None = None
    _role_index: Mapping[str, Role] = field(default_factory=lambda: MappingProxyType({}))
    _label_index: Mapping[str, Label] = field(default_factory=lambda: MappingProxyType({}))
    # Memo of labels_for_column: the snapshot never changes, so neither do its answers.
    _column_labels: dict[tuple[str, str, str], tuple[str, ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def role(self, name: str) -> Role:
        """The role called `name`; KeyError if there is none."""
        return self._role_index[name]

    def label(self, name: str) -> Label:
        """The label called `name`; KeyError if there is none."""
        return self._label_index[name]

    def policy_for(self, role_name: str, label_name: str) -> LabelPolicy:
        """The role's own entry for the label, else the `"*"` entry, else allow.

        Unrestricted roles are always allowed. KeyError for an unknown role or label.
        """
        role = self._role_index[role_name]
        if label_name not in self._label_index:
            raise KeyError(label_name)
        if role.unrestricted:
            return ALLOW
        own = self.policies.get(role_name, {}).get(label_name)
        if own is not None:
            return own
        return self.policies.get("*", {}).get(label_name, ALLOW)

    def labels_for_column(self, schema: str, table: str, column: str) -> tuple[str, ...]:
        """Names of the labels whose globs match this column, in the order written."""
        key = (schema, table, column)
        found = self._column_labels.get(key)
        if found is None:
            if len(self._column_labels) > 100_000:  # a schema of that size: keep it bounded
                self._column_labels.clear()
            found = tuple(lb.name for lb in self.labels if lb.matches(schema, table, column))
            self._column_labels[key] = found
        return found


# --------------------------------------------------------------------------------------------
# Masks and their parameters


class _Bad(Exception):
    """A value of the wrong shape; `expected` completes "... must be <expected>"."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


Checker = Callable[[YNode], object]


def _int_min(minimum: int) -> Checker:
    expected = "an integer >= 0" if minimum == 0 else f"an integer >= {minimum}"

    def check(node: YNode) -> object:
        if isinstance(node, YScalar) and type(node.value) is int and node.value >= minimum:
            return node.value
        raise _Bad(expected)

    return check


def _one_char(node: YNode) -> object:
    if isinstance(node, YScalar) and isinstance(node.value, str) and len(node.value) == 1:
        return node.value
    raise _Bad("a single character, e.g. '*'")


def _round_to(node: YNode) -> object:
    if isinstance(node, YScalar):
        v = node.value
        if isinstance(v, int | float) and not isinstance(v, bool) and v > 0:
            return v
        if isinstance(v, str) and v in ROUND_UNITS:
            return v
    raise _Bad("a positive number (for numeric columns), or 'month' or 'year' (for dates)")


def _fake_kind(node: YNode) -> object:
    if isinstance(node, YScalar) and isinstance(node.value, str) and node.value in FAKE_KINDS:
        return node.value
    raise _Bad("one of " + ", ".join(FAKE_KINDS))


def _constant_value(node: YNode) -> object:
    if isinstance(node, YScalar) and (
        node.value is None or isinstance(node.value, str | int | float | bool | date | datetime)
    ):
        return node.value
    raise _Bad("a single value (a string, number, boolean, date or null)")


@dataclass(frozen=True, slots=True)
class MaskSpec:
    """A mask's parameters: name -> (checker, default); a default of _REQUIRED means required."""

    params: Mapping[str, tuple[Checker, object]]
    summary: str


_REQUIRED: Final = object()
_INFER: Final = object()

MASKS: Final[Mapping[str, MaskSpec]] = MappingProxyType(
    {
        "partial": MaskSpec(
            MappingProxyType(
                {
                    "keep_first": (_int_min(0), 0),
                    "keep_last": (_int_min(0), 0),
                    "char": (_one_char, "*"),
                }
            ),
            "keep the first/last characters, replace the rest",
        ),
        "redact": MaskSpec(MappingProxyType({"char": (_one_char, "*")}), "replace every char"),
        "null": MaskSpec(MappingProxyType({}), "NULL"),
        "hash": MaskSpec(MappingProxyType({}), "keyed hash, same length and type"),
        "email": MaskSpec(MappingProxyType({}), "hide the local part of an e-mail address"),
        "round": MaskSpec(MappingProxyType({"to": (_round_to, _REQUIRED)}), "round down"),
        "fake": MaskSpec(MappingProxyType({"kind": (_fake_kind, _INFER)}), "plausible fake"),
        "constant": MaskSpec(
            MappingProxyType({"value": (_constant_value, _REQUIRED)}), "a fixed value"
        ),
    }
)
"""Every mask name and its parameters; keep in step with docs/rules.md and the JSON Schema."""

_POLICY_KEYS: Final = ("mask", "filter", "max_lookups_per_minute")

_FAKE_HINTS: Final = (
    ("email", "email"),
    ("mail", "email"),
    ("phone", "phone"),
    ("hp", "phone"),
    ("telp", "phone"),
    ("mobile", "phone"),
    ("address", "address"),
    ("alamat", "address"),
    ("city", "city"),
    ("kota", "city"),
    ("name", "name"),
    ("nama", "name"),
)


def infer_fake_kind(label: str) -> str | None:
    """The fake kind a label's name suggests (`phone` for `phone`, `no_hp`), or None."""
    words = [w for w in re.split(r"[^a-z0-9]+", label.lower()) if w]
    for hint, kind in _FAKE_HINTS:
        if hint in words or (len(hint) > 3 and hint in label.lower()):
            return kind
    return None


# --------------------------------------------------------------------------------------------
# Loading


_TOP_KEYS: Final = (
    "version",
    "roles",
    "default_role",
    "labels",
    "policies",
    "limits",
    "hash_key",
)
_SINGLE_TOP_KEYS: Final = ("default_role", "limits", "hash_key")
_ROLE_KEYS: Final = (
    "users",
    "member_of",
    "unrestricted",
    "statements",
    "max_rows_per_query",
    "max_rows_per_minute",
    "max_rows_per_hour",
    "max_queries_per_minute",
    "on_row_limit",
    "copy_out",
    "copy_in",
    "statement_timeout",
    "require_where",
)
_RESTRICTING_KEYS: Final = _ROLE_KEYS[3:]


def load_rules(path: str | Path) -> Rules:
    """Load and validate the rules at `path` (a file, or a directory of *.yaml / *.yml files).

    Raises RulesError listing every problem. Paths in messages are as given by the caller.
    """
    return _Loader(path).load()


def _suggest(word: str, choices: Iterable[str]) -> str:
    options = list(choices)
    folded = [o for o in options if o.lower() == word.lower()]
    if folded:
        return f"did you mean '{folded[0]}'?"
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    if not options:
        return "there are none"
    return "expected one of: " + ", ".join(options)


def _show(node: YNode) -> str:
    if isinstance(node, YMap):
        return "a mapping"
    if isinstance(node, YSeq):
        return "a list"
    v = node.value
    if v is None:
        return "nothing (null)"
    if isinstance(v, bool):
        return f"{str(v).lower()} (a boolean; quote it if you meant a string)"
    if isinstance(v, int):
        return f"{v} (an integer)"
    if isinstance(v, float):
        return f"{v} (a number)"
    if isinstance(v, str):
        return f"'{v}' (a string)"
    if isinstance(v, datetime | date):
        return f"{v.isoformat()} (a date)"
    return repr(v)


def _glob_min_bytes(glob: str) -> int:
    """The fewest bytes a name matching this fnmatch glob can have."""
    total, i = 0, 0
    while i < len(glob):
        ch = glob[i]
        if ch == "*":
            i += 1
        elif ch == "?":
            total, i = total + 1, i + 1
        elif ch == "[" and (end := glob.find("]", i + 2)) != -1:
            total, i = total + 1, end + 1
        else:
            total, i = total + len(ch.encode()), i + 1
    return total


def _compile_parts(glob: str) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(fnmatch.translate(part)) for part in glob.split("."))


@dataclass
class _Entry:
    """A pooled top-level item: a role, a label, or a (role, label) policy."""

    key: YScalar
    value: YNode
    name: str


class _Loader:
    def __init__(self, path: str | Path) -> None:
        self.given = str(path)
        self.errors: list[RuleIssue] = []
        self.warnings: list[RuleIssue] = []
        self.complete = True
        self.sources: list[tuple[str, Path]] = []
        self.first_root: Pos = Pos(self.given, 1, 1)
        self.labels_pos: Pos | None = None
        self.roles: dict[str, _Entry] = {}
        self.labels: dict[str, _Entry] = {}
        self.policies: dict[tuple[str, str], _Entry] = {}
        self.policy_roles: dict[str, YScalar] = {}
        self.singles: dict[str, tuple[YScalar, YNode]] = {}
        self.unrestricted: set[str] = set()  # roles written unrestricted: true, valid or not

    # -- reporting

    def error(self, pos: Pos, message: str) -> None:
        self.errors.append(RuleIssue(pos.path, pos.line, pos.column, message))

    def warn(self, pos: Pos, message: str) -> None:
        self.warnings.append(RuleIssue(pos.path, pos.line, pos.column, message))

    def bad_value(self, node: YNode, what: str, expected: str) -> None:
        self.error(node.pos, f"{what} must be {expected}; got {_show(node)}")

    # -- pass 1: files into the pool

    def load(self) -> Rules:
        for display, real in self._source_files():
            self._read(display, real)
        if not self.errors and not self.sources:
            self.error(self.first_root, "no rules found; expected a file with 'version: 1'")
        rules = self._build()
        if self.errors or rules is None:
            raise RulesError(self.errors)
        return rules

    def _source_files(self) -> list[tuple[str, Path]]:
        real = Path(self.given)
        if real.is_dir():
            names = sorted(
                p.name
                for p in real.iterdir()
                if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
            )
            if not names:
                self.error(
                    Pos(self.given, 1, 1),
                    "directory holds no *.yaml or *.yml files; expected rules files",
                )
                self.complete = False
            return [(os.path.join(self.given, n), real / n) for n in names]
        return [(self.given, real)]

    def _read(self, display: str, real: Path) -> None:
        try:
            text = real.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.error(Pos(display, 1, 1), "no such file or directory; expected a rules file")
            self.complete = False
            return
        except UnicodeDecodeError as exc:
            self.error(Pos(display, 1, 1), f"not UTF-8 text ({exc.reason}); expected YAML")
            self.complete = False
            return
        except OSError as exc:
            self.error(Pos(display, 1, 1), f"cannot read rules file: {exc.strerror}")
            self.complete = False
            return
        if not self.sources:
            self.first_root = Pos(display, 1, 1)
        self.sources.append((display, real))
        try:
            root = parse_yaml(text, display)
        except YamlSourceError as exc:
            self.error(exc.pos, exc.message)
            self.complete = False
            return
        if root is None:
            if display == self.given:  # a single file, not one of a directory
                self.error(
                    Pos(display, 1, 1),
                    "the file is empty; expected rules starting with 'version: 1'",
                )
                self.complete = False
            return  # in a directory, an empty file (or only comments) adds nothing
        if not isinstance(root, YMap):
            self.error(root.pos, f"the top level must be a mapping of keys; got {_show(root)}")
            self.complete = False
            return
        self._top(root, display)

    def _keys(
        self, mapping: YMap, where: str, known: tuple[str, ...]
    ) -> Iterator[tuple[str, YScalar, YNode]]:
        """Known string keys of `mapping`; reports non-string, unknown and repeated keys."""
        seen: dict[str, Pos] = {}
        for key, value in mapping.entries:
            if not (isinstance(key, YScalar) and isinstance(key.value, str)):
                self.error(key.pos, f"keys {where} must be strings; got {_show(key)}")
                continue
            name = key.value
            if name not in known:
                self.error(key.pos, f"unknown key '{name}' {where}; {_suggest(name, known)}")
                continue
            if name in seen:
                self.error(key.pos, f"key '{name}' defined twice {where}; first at {seen[name]}")
                continue
            seen[name] = key.pos
            yield name, key, value

    def _named(self, mapping: YMap, what: str) -> Iterator[tuple[str, YScalar, YNode]]:
        """Entries of a name -> definition mapping (roles, labels, policies)."""
        for key, value in mapping.entries:
            if not (isinstance(key, YScalar) and isinstance(key.value, str)):
                self.error(key.pos, f"{what} names must be strings; got {_show(key)}")
                continue
            yield key.value, key, value

    def _top(self, root: YMap, display: str) -> None:
        has_version = False
        for name, key, value in self._keys(root, "at the top level", _TOP_KEYS):
            if name == "version":
                has_version = True
                if not (isinstance(value, YScalar) and type(value.value) is int):
                    self.bad_value(value, "version", "the integer 1")
                elif value.value != 1:
                    self.error(value.pos, f"unsupported version {value.value}; expected 1")
            elif name in _SINGLE_TOP_KEYS:
                first = self.singles.get(name)
                if first is not None:
                    self.error(
                        key.pos,
                        f"key '{name}' defined twice at the top level; first at {first[0].pos}",
                    )
                else:
                    self.singles[name] = (key, value)
            elif not isinstance(value, YMap):
                if not (isinstance(value, YScalar) and value.value is None):
                    self.bad_value(value, name, "a mapping")
            elif name == "roles":
                for rname, rkey, body in self._named(value, "role"):
                    self._pool(self.roles, rname, rkey, body, f"role '{rname}'")
            elif name == "labels":
                if self.labels_pos is None:
                    self.labels_pos = key.pos
                for lname, lkey, globs in self._named(value, "label"):
                    self._pool(self.labels, lname, lkey, globs, f"label '{lname}'")
            elif name == "policies":
                self._pool_policies(value)
        if not has_version:
            self.error(
                root.pos, "missing required key 'version'; expected 'version: 1' in every file"
            )

    def _pool(
        self, pool: dict[str, _Entry], name: str, key: YScalar, value: YNode, what: str
    ) -> None:
        first = pool.get(name)
        if first is not None:
            self.error(key.pos, f"{what} defined twice; first at {first.key.pos}")
            return
        pool[name] = _Entry(key, value, name)

    def _pool_policies(self, policies: YMap) -> None:
        for rname, rkey, body in self._named(policies, "policy role"):
            self.policy_roles.setdefault(rname, rkey)
            if isinstance(body, YScalar) and body.value is None:
                continue
            if not isinstance(body, YMap):
                self.bad_value(body, f"policies of role '{rname}'", "a mapping of label -> policy")
                continue
            for lname, lkey, value in self._named(body, "label"):
                what = f"policy of role '{rname}' for label '{lname}'"
                first = self.policies.get((rname, lname))
                if first is not None:
                    self.error(lkey.pos, f"{what} defined twice; first at {first.key.pos}")
                    continue
                self.policies[(rname, lname)] = _Entry(lkey, value, lname)

    # -- pass 2 and 3: validate and build

    def _build(self) -> Rules | None:
        roles = [r for e in self.roles.values() if (r := self._role(e)) is not None]
        role_index = {r.name: r for r in roles}
        labels = [lb for e in self.labels.values() if (lb := self._label(e)) is not None]
        label_index = {lb.name: lb for lb in labels}
        policies = self._policies(role_index, label_index)
        default_role = self._default_role(role_index)
        limits_backend = self._limits()
        hash_key = self._hash_key()
        if self.complete:
            self._missing_top_keys()
        self._warn_unused(labels, policies, hash_key)
        if self.errors or default_role is None:
            return None
        return Rules(
            roles=tuple(roles),
            default_role=default_role,
            labels=tuple(labels),
            policies=MappingProxyType({r: MappingProxyType(dict(p)) for r, p in policies.items()}),
            sources=tuple(Path(d) for d, _ in self.sources),
            limits_backend=limits_backend,
            hash_key=hash_key,
            warnings=tuple(sorted(self.warnings)),
            labels_pos=self.labels_pos or self.first_root,
            _role_index=MappingProxyType(role_index),
            _label_index=MappingProxyType(label_index),
        )

    def _missing_top_keys(self) -> None:
        if not self.roles:
            self.error(
                self.first_root,
                "no roles defined; expected a 'roles' mapping with at least one role",
            )
        if "default_role" not in self.singles:
            self.error(
                self.first_root,
                "missing required key 'default_role'; expected the role of users that match "
                "no role (fail closed)",
            )

    # -- strings and lists

    def _string(self, node: YNode, what: str) -> str | None:
        if isinstance(node, YScalar) and isinstance(node.value, str):
            return node.value
        self.bad_value(node, what, "a string")
        return None

    def _strings(self, node: YNode, what: str, example: str) -> list[tuple[str, YScalar]]:
        if not isinstance(node, YSeq):
            self.bad_value(node, what, f"a list of strings, e.g. [{example}]")
            return []
        out: list[tuple[str, YScalar]] = []
        for item in node.items:
            if isinstance(item, YScalar) and isinstance(item.value, str):
                out.append((item.value, item))
            else:
                self.bad_value(item, f"each entry of {what}", "a string")
        return out

    def _choice(self, node: YNode, noun: str, where: str, choices: tuple[str, ...]) -> str | None:
        if isinstance(node, YScalar) and isinstance(node.value, str):
            if node.value in choices:
                return node.value
            self.error(
                node.pos,
                f"unknown {noun} '{node.value}' {where}; {_suggest(node.value, choices)}",
            )
            return None
        self.bad_value(node, f"{noun} {where}", "one of " + ", ".join(choices))
        return None

    def _positive(self, node: YNode, what: str) -> int | None:
        if isinstance(node, YScalar) and type(node.value) is int and node.value > 0:
            return node.value
        self.bad_value(node, what, "an integer greater than 0")
        return None

    def _pg_name(self, name: str, node: YScalar, noun: str, where: str) -> bool:
        if not name:
            self.error(
                node.pos, f"empty {noun} {where} can never match; expected a PostgreSQL role name"
            )
            return False
        if "\x00" in name:
            self.error(node.pos, f"{noun} {name!r} {where} contains NUL and can never match")
            return False
        if _glob_min_bytes(name) > PG_NAME_MAX_BYTES:
            self.error(
                node.pos,
                f"{noun} '{name}' {where} can never match: PostgreSQL role names have at most "
                f"{PG_NAME_MAX_BYTES} bytes",
            )
            return False
        if name != name.strip():
            self.warn(node.pos, f"{noun} '{name}' {where} has leading or trailing spaces")
        return True

    # -- roles

    def _role(self, entry: _Entry) -> Role | None:
        name, where = entry.name, f"in role '{entry.name}'"
        ok = True
        if name == "*":
            self.error(entry.key.pos, "'*' is not a role name; it is used only under policies")
            ok = False
        elif not _NAME_RE.fullmatch(name):
            self.error(
                entry.key.pos,
                f"invalid role name '{name}'; expected letters, digits, '_' and '-', "
                "starting with a letter or '_'",
            )
            ok = False
        body = entry.value
        if not isinstance(body, YMap):
            self.bad_value(body, f"role '{name}'", 'a mapping, e.g. {users: ["agent_*"]}')
            return None
        n_errors = len(self.errors)
        values: dict[str, Any] = {}
        keys: dict[str, YScalar] = {}
        for key_name, key, value in self._keys(body, where, _ROLE_KEYS):
            keys[key_name] = key
            parsed = self._role_value(key_name, value, where)
            if parsed is not None:
                values[key_name] = parsed
        unrestricted = values.get("unrestricted") is True
        if unrestricted:
            self.unrestricted.add(name)
            for key_name in _RESTRICTING_KEYS:
                if key_name in keys:
                    self.error(
                        keys[key_name].pos,
                        f"'{key_name}' has no effect on unrestricted role '{name}'; remove it "
                        "or set unrestricted: false",
                    )
        statements = self._statements(values, keys, name, unrestricted)
        if "on_row_limit" in values and "max_rows_per_query" not in values and not unrestricted:
            self.warn(
                keys["on_row_limit"].pos,
                f"on_row_limit has no effect in role '{name}' without max_rows_per_query",
            )
        if not values.get("users") and not values.get("member_of"):
            if name != self.default_role_name():
                self.warn(
                    entry.key.pos,
                    f"role '{name}' has neither users nor member_of, so no user can match it",
                )
        if not ok or len(self.errors) != n_errors:
            return None
        if unrestricted:
            copy_out: Any = "allow"
            copy_in: Any = "allow"
        else:
            copy_out = values.get("copy_out", "mask" if "copy_out" in statements else "deny")
            copy_in = values.get("copy_in", "allow" if "copy_in" in statements else "deny")
        return Role(
            name=name,
            users=tuple(values.get("users", ())),
            member_of=tuple(values.get("member_of", ())),
            unrestricted=unrestricted,
            statements=statements,
            max_rows_per_query=values.get("max_rows_per_query"),
            max_rows_per_minute=values.get("max_rows_per_minute"),
            max_rows_per_hour=values.get("max_rows_per_hour"),
            max_queries_per_minute=values.get("max_queries_per_minute"),
            on_row_limit=values.get("on_row_limit", "error"),
            copy_out=copy_out,
            copy_in=copy_in,
            statement_timeout_ms=values.get("statement_timeout"),
            require_where=tuple(values.get("require_where", ())),
            pos=entry.key.pos,
        )

    def _statements(
        self, values: dict[str, Any], keys: dict[str, YScalar], name: str, unrestricted: bool
    ) -> frozenset[str]:
        if unrestricted:
            return frozenset(STATEMENT_KINDS)
        written = values.get("statements")
        kinds = set(written) if isinstance(written, list) else set(DEFAULT_STATEMENTS)
        for kind, key in (("copy_out", "copy_out"), ("copy_in", "copy_in")):
            setting = values.get(key)
            if setting == "deny" and kind in kinds:
                self.error(
                    keys[key].pos,
                    f"{key}: deny in role '{name}' contradicts '{kind}' in its statements; "
                    "expected one or the other",
                )
            elif setting is not None and setting != "deny":
                kinds.add(kind)
        return frozenset(kinds)

    def _role_value(self, key: str, value: YNode, where: str) -> object | None:
        what = f"{key} {where}"
        if key == "users":
            globs = self._strings(value, what, '"agent_*"')
            return [g for g, node in globs if self._pg_name(g, node, "users glob", where)]
        if key == "member_of":
            names = self._strings(value, what, "agents")
            out = []
            for n, node in names:
                if self._pg_name(n, node, "member_of name", where):
                    out.append(n)
                    if _GLOB_CHARS & set(n):
                        self.warn(
                            node.pos,
                            f"member_of name '{n}' {where} is matched exactly, not as a glob",
                        )
            return out
        if key == "unrestricted":
            if isinstance(value, YScalar) and isinstance(value.value, bool):
                return value.value
            self.bad_value(value, what, "true or false")
            return None
        if key == "statements":
            kinds = []
            for kind, node in self._strings(value, what, "select"):
                if kind in STATEMENT_KINDS:
                    kinds.append(kind)
                else:
                    self.error(
                        node.pos,
                        f"unknown statement kind '{kind}' {where}; "
                        f"{_suggest(kind, STATEMENT_KINDS)}",
                    )
            return kinds
        if key.startswith("max_"):
            return self._positive(value, what)
        if key == "on_row_limit":
            return self._choice(value, "on_row_limit", where, ("error", "truncate"))
        if key == "copy_out":
            return self._choice(value, "copy_out", where, ("deny", "allow", "mask"))
        if key == "copy_in":
            return self._choice(value, "copy_in", where, ("deny", "allow"))
        if key == "statement_timeout":
            return self._duration(value, what)
        if key == "require_where":
            out = []
            for glob, node in self._strings(value, what, '"bank.customers"'):
                parts = glob.split(".")
                if len(parts) != 2 or not all(parts):
                    self.error(
                        node.pos,
                        f"require_where glob '{glob}' {where} must be 'schema.table' "
                        "(two non-empty dot-separated parts)",
                    )
                else:
                    out.append(glob)
            return out
        raise AssertionError(key)  # pragma: no cover - _ROLE_KEYS and this function agree

    def _duration(self, node: YNode, what: str) -> int | None:
        expected = "a duration like '30s', '500ms' or '2min', or an integer of milliseconds > 0"
        if isinstance(node, YScalar):
            v = node.value
            if type(v) is int and v > 0:
                return v
            if isinstance(v, str) and (m := _DURATION_RE.fullmatch(v)):
                ms = round(float(m.group(1)) * _DURATION_MS[m.group(2)])
                if ms >= 1:
                    return ms
        self.bad_value(node, what, expected)
        return None

    # -- labels

    def _label(self, entry: _Entry) -> Label | None:
        name, where = entry.name, f"in label '{entry.name}'"
        ok = True
        if not _NAME_RE.fullmatch(name):
            self.error(
                entry.key.pos,
                f"invalid label name '{name}'; expected letters, digits, '_' and '-', "
                "starting with a letter or '_'",
            )
            ok = False
        if not isinstance(entry.value, YSeq):
            self.bad_value(entry.value, f"label '{name}'", 'a list of globs, e.g. ["*.*.nik"]')
            return None
        globs: list[str] = []
        for glob, node in self._strings(entry.value, f"label '{name}'", '"*.*.nik"'):
            parts = glob.split(".")
            if not glob:
                self.error(
                    node.pos,
                    f"empty glob {where} can never match; expected "
                    "'schema.table.column', e.g. '*.*.nik'",
                )
                ok = False
            elif len(parts) != 3:
                self.error(
                    node.pos,
                    f"glob '{glob}' {where} has {len(parts)} dot-separated parts; expected 3: "
                    "'schema.table.column', e.g. '*.*.nik'",
                )
                ok = False
            elif not all(parts):
                self.error(
                    node.pos,
                    f"glob '{glob}' {where} has an empty part and can never match; expected "
                    "'schema.table.column', e.g. '*.*.nik'",
                )
                ok = False
            else:
                if glob != glob.lower():
                    self.warn(
                        node.pos,
                        f"glob '{glob}' {where} has upper-case letters; PostgreSQL folds "
                        "unquoted names to lower case, so it matches only quoted identifiers",
                    )
                globs.append(glob)
        if not entry.value.items:
            self.warn(entry.value.pos, f"label '{name}' has no globs and matches no column")
        if not ok:
            return None
        return Label(
            name=name,
            globs=tuple(globs),
            pos=entry.key.pos,
            _compiled=tuple(_compile_parts(g) for g in globs),
        )

    # -- policies

    def _policies(
        self, roles: dict[str, Role], labels: dict[str, Label]
    ) -> dict[str, dict[str, LabelPolicy]]:
        out: dict[str, dict[str, LabelPolicy]] = {}
        check_refs = self.complete
        for rname, rkey in self.policy_roles.items():
            if rname == "*":
                continue
            if rname not in self.roles:
                if check_refs:
                    known = ("*", *self.roles)
                    self.error(
                        rkey.pos, f"policies name unknown role '{rname}'; {_suggest(rname, known)}"
                    )
            elif rname in self.unrestricted:
                self.error(
                    rkey.pos,
                    f"policies for unrestricted role '{rname}' have no effect; remove them or "
                    "set unrestricted: false",
                )
        for (rname, lname), entry in self.policies.items():
            what = f"in the policy of role '{rname}' for label '{lname}'"
            if lname not in self.labels:
                if check_refs:
                    self.error(
                        entry.key.pos,
                        f"policy of role '{rname}' names unknown label '{lname}'; "
                        f"{_suggest(lname, tuple(self.labels))}",
                    )
                continue
            policy = self._policy(entry.value, what, rname, lname)
            if policy is not None:
                out.setdefault(rname, {})[lname] = policy
        return out

    def _policy(self, node: YNode, what: str, role: str, label: str) -> LabelPolicy | None:
        if isinstance(node, YScalar) and node.value in ("allow", "deny"):
            return LabelPolicy("allow" if node.value == "allow" else "deny", pos=node.pos)
        if not isinstance(node, YMap):
            self.error(
                node.pos,
                f"the policy of role '{role}' for label '{label}' must be allow, deny or a "
                f"mapping like {{mask: redact}}; got {_show(node)}",
            )
            return None
        mask_node = next(
            (v for k, v in node.entries if isinstance(k, YScalar) and k.value == "mask"), None
        )
        if mask_node is None:
            self.error(
                node.pos,
                f"missing key 'mask' {what}; expected e.g. {{mask: partial, keep_first: 6}}",
            )
            return None
        if isinstance(mask_node, YScalar) and mask_node.value is None:
            mask_node = YScalar("null", mask_node.pos)  # `mask: null` is YAML's null
        mask = self._choice(mask_node, "mask", what, tuple(MASKS))
        if mask is None:
            return None
        spec = MASKS[mask]
        known = tuple(spec.params) + _POLICY_KEYS
        n_errors = len(self.errors)
        params: dict[str, object] = {}
        filter_mode: str = "equality"
        lookups: int | None = None
        written: set[str] = set()
        for key_name, _key, value in self._mask_keys(node, what, mask, known):
            written.add(key_name)
            if key_name == "mask":
                continue
            if key_name == "filter":
                filter_mode = self._choice(value, "filter", what, FILTER_MODES) or filter_mode
            elif key_name == "max_lookups_per_minute":
                lookups = self._positive(value, f"max_lookups_per_minute {what}")
            else:
                try:
                    params[key_name] = spec.params[key_name][0](value)
                except _Bad as bad:
                    self.bad_value(value, f"{key_name} {what}", bad.expected)
        for pname, (_, default) in spec.params.items():
            if pname in written:
                continue
            if default is _REQUIRED:
                self.error(
                    node.pos,
                    f"mask '{mask}' needs parameter '{pname}' {what}; expected e.g. "
                    + (
                        "{mask: round, to: 1000000}"
                        if pname == "to"
                        else "{mask: constant, value: 'hidden'}"
                    ),
                )
            elif default is _INFER:
                kind = infer_fake_kind(label)
                if kind is None:
                    self.error(
                        node.pos,
                        f"mask 'fake' cannot tell what to fake from the label's name {what}; "
                        "set kind: one of " + ", ".join(FAKE_KINDS),
                    )
                else:
                    params[pname] = kind
            else:
                params[pname] = default
        if len(self.errors) != n_errors:
            return None
        if mask == "partial" and params["keep_first"] == 0 and params["keep_last"] == 0:
            self.warn(node.pos, f"mask 'partial' keeps nothing {what}; this is mask 'redact'")
        return LabelPolicy(
            "mask",
            mask=mask,
            param_items=tuple((k, params[k]) for k in spec.params if k in params),
            filter=filter_mode,  # type: ignore[arg-type]
            max_lookups_per_minute=lookups,
            pos=node.pos,
        )

    def _mask_keys(
        self, node: YMap, what: str, mask: str, known: tuple[str, ...]
    ) -> Iterator[tuple[str, YScalar, YNode]]:
        """Like _keys, with a message that names the mask's parameters."""
        seen: dict[str, Pos] = {}
        for key, value in node.entries:
            if not (isinstance(key, YScalar) and isinstance(key.value, str)):
                self.error(key.pos, f"keys {what} must be strings; got {_show(key)}")
                continue
            name = key.value
            if name not in known:
                hint = _suggest(name, [k for k in known if k != "mask"])
                self.error(key.pos, f"unknown parameter '{name}' for mask '{mask}' {what}; {hint}")
                continue
            if name in seen:
                self.error(key.pos, f"key '{name}' defined twice {what}; first at {seen[name]}")
                continue
            seen[name] = key.pos
            yield name, key, value

    # -- single top-level keys

    def _default_role(self, roles: dict[str, Role]) -> str | None:
        item = self.singles.get("default_role")
        if item is None:
            return None
        name = self._string(item[1], "default_role")
        if name is None:
            return None
        if name not in self.roles:
            if self.complete and self.roles:
                self.error(
                    item[1].pos,
                    f"default_role '{name}' is not a role; {_suggest(name, tuple(self.roles))}",
                )
            return None
        if name in self.unrestricted:
            self.error(
                item[1].pos,
                f"default_role '{name}' is unrestricted, so users that match no role would see "
                "everything; expected a restricted role (fail closed)",
            )
            return None
        return name

    def _limits(self) -> str:
        item = self.singles.get("limits")
        if item is None:
            return "memory"
        node = item[1]
        if not isinstance(node, YMap):
            self.bad_value(node, "limits", "a mapping, e.g. {backend: memory}")
            return "memory"
        backend = "memory"
        for _, _, value in self._keys(node, "in limits", ("backend",)):
            text = self._string(value, "backend in limits")
            if text is None:
                continue
            if text == "memory" or re.match(r"(rediss?|unix)://.", text):
                backend = text
            else:
                self.bad_value(
                    value, "backend in limits", "'memory' or a URL like 'redis://host:6379/0'"
                )
        return backend

    def _hash_key(self) -> HashKeySpec | None:
        item = self.singles.get("hash_key")
        if item is None:
            return None
        node = item[1]
        expected = "a mapping with one key: {env: VARIABLE} or {file: PATH}"
        if not isinstance(node, YMap):
            self.bad_value(node, "hash_key", expected)
            return None
        found = list(self._keys(node, "in hash_key", ("env", "file")))
        if len(found) != 1:
            if not found and not node.entries:
                self.bad_value(node, "hash_key", expected)
            elif len(found) > 1:
                self.error(node.pos, "hash_key has both env and file; expected exactly one of them")
            return None
        key_name, _, value = found[0]
        text = self._string(value, f"{key_name} in hash_key")
        if text is None:
            return None
        if key_name == "env":
            if not _ENV_RE.fullmatch(text):
                self.bad_value(value, "env in hash_key", "an environment variable name")
                return None
            return HashKeySpec(env=text, pos=node.pos)
        if not text:
            self.bad_value(value, "file in hash_key", "a file path")
            return None
        file = Path(text)
        if not file.is_absolute():
            file = Path(os.path.dirname(value.pos.path)) / file
        return HashKeySpec(file=file, pos=node.pos)

    # -- warnings

    def _warn_unused(
        self,
        labels: list[Label],
        policies: dict[str, dict[str, LabelPolicy]],
        hash_key: HashKeySpec | None,
    ) -> None:
        used = {lname for _, lname in self.policies}
        for label in labels:
            if label.name not in used and label.pos is not None:
                self.warn(
                    label.pos,
                    f"label '{label.name}' has no policy in any role, so every role sees it "
                    "unmasked",
                )
        if hash_key is None:
            for by_label in policies.values():
                for policy in by_label.values():
                    if policy.mask == "hash" and policy.pos is not None:
                        self.warn(
                            policy.pos,
                            "mask 'hash' without hash_key uses a random key per process, so "
                            "hashes differ between restarts and instances; set hash_key",
                        )

    def default_role_name(self) -> str | None:
        item = self.singles.get("default_role")
        if item is None or not isinstance(item[1], YScalar):
            return None
        value = item[1].value
        return value if isinstance(value, str) else None
