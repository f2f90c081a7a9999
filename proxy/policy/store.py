"""The rules in force, and swapping in new ones without a restart.

Strategy: the current `Rules` snapshot is immutable and replaced whole, so a statement is always
judged by one complete rule set. A reload (SIGHUP, or a change of the files on disk) loads and
validates the new files first; on any error the old rules stay in force and the error is logged
with file and line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from proxy.observe import metrics
from proxy.policy.roles import RoleMatch, needs_membership, resolve_role
from proxy.policy.rules import Rules, RulesError, load_rules

log = logging.getLogger("topeng.rules")


def _source_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(
            p
            for p in path.iterdir()
            if p.suffix in (".yaml", ".yml") and not p.name.startswith(".")
        )
    return [path]


def _fingerprint(path: Path) -> tuple[tuple[str, int, int], ...]:
    out = []
    for p in _source_files(path):
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(out)


def check_hash_key(rules: Rules) -> None:
    """The hash key the rules name must be readable now, not when a session needs it."""
    if rules.hash_key is not None:
        rules.hash_key.read()  # LookupError / OSError say what is missing


class RulesStore:
    """Holds the current rules; `reload()` swaps in valid new ones atomically."""

    def __init__(self, path: str | os.PathLike[str], *, poll_interval: float = 2.0) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.current: Rules = load_rules(self.path)  # raises RulesError at startup
        check_hash_key(self.current)
        # The `hash` mask's key when the rules name none: made here, before `--workers` forks,
        # so every worker of this instance hashes alike (instances and restarts still differ).
        self.random_hash_key = secrets.token_bytes(32)
        self._seen = _fingerprint(self.path)
        self.on_change: list[Callable[[Rules], None]] = []
        self.on_reload: list[Callable[[bool, str], None]] = []  # (ok, detail) of every reload
        metrics.RULES_LAST_RELOAD_SUCCESS.set(1)

    def reload(self) -> bool:
        """Load the files again; True if new rules are in force, False if the old ones stay."""
        self._seen = _fingerprint(self.path)
        try:
            rules = load_rules(self.path)
            check_hash_key(rules)
        except RulesError as exc:
            metrics.RULES_RELOADS.labels("error").inc()
            metrics.RULES_LAST_RELOAD_SUCCESS.set(0)
            log.error("rules reload failed; the previous rules stay in force:\n%s", exc)
            self._reloaded(False, str(exc))
            return False
        except (OSError, LookupError) as exc:
            metrics.RULES_RELOADS.labels("error").inc()
            metrics.RULES_LAST_RELOAD_SUCCESS.set(0)
            log.error("rules reload failed (%s); the previous rules stay in force", exc)
            self._reloaded(False, str(exc))
            return False
        self.current = rules
        metrics.RULES_RELOADS.labels("ok").inc()
        metrics.RULES_LAST_RELOAD_SUCCESS.set(1)
        log.info("rules reloaded from %s", self.path)
        for callback in self.on_change:
            callback(rules)
        self._reloaded(True, str(self.path))
        return True

    def _reloaded(self, ok: bool, detail: str) -> None:
        for callback in self.on_reload:
            callback(ok, detail)

    def request_reload(self) -> None:
        self.reload()

    def changed_on_disk(self) -> bool:
        return _fingerprint(self.path) != self._seen

    async def watch(self) -> None:
        """Reload whenever the files change on disk."""
        while True:
            await asyncio.sleep(self.poll_interval)
            if self.changed_on_disk():
                self.reload()

    @staticmethod
    def needs_membership(rules: Rules, user: str) -> bool:
        return needs_membership(rules, user)

    @staticmethod
    def resolve(rules: Rules, user: str, memberships: frozenset[str] | None) -> RoleMatch:
        return resolve_role(rules, user, memberships)
