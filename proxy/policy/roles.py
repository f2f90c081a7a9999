"""Which role an authenticated user gets: pure functions over a `Rules` snapshot.

Strategy: roles are tried in the order written and the first match wins. A role matches when
one of its `users` globs matches the user name (`fnmatch`, case-sensitive, as PostgreSQL role
names are) or when the user is a member, direct or inherited, of one of its `member_of`
PostgreSQL roles. A user that matches nothing gets `default_role` (fail closed).

Membership costs the proxy a catalog query, so `needs_membership` says whether the answer can
change the outcome. Order makes this subtle: when an earlier role has `member_of`, a glob match
further down cannot be trusted until we know the user is not a member of that earlier role's
PostgreSQL roles. So walk the roles in order: a glob match before any `member_of` role decides
without membership; reaching a `member_of` role first means membership is needed.
`resolve_role` refuses to guess: given `memberships=None` where membership could decide, it
raises `MembershipNeeded` rather than treating the user as a member of nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from proxy.policy.rules import Role, Rules

__all__ = ["MembershipNeeded", "RoleMatch", "needs_membership", "resolve_role"]

_GLOB_CHARS = frozenset("*?[")


class MembershipNeeded(LookupError):
    """`resolve_role` was called without memberships where they could decide the role."""


@dataclass(frozen=True, slots=True)
class RoleMatch:
    """The resolved role and why, in words for the audit log and `topeng explain`.

    `how` is `users`, `member_of` or `default`; `matched` is the glob or the PostgreSQL role
    that decided (None for the default role).
    """

    role: Role
    reason: str
    how: Literal["users", "member_of", "default"]
    matched: str | None = None


def _glob_match(role: Role, user: str) -> str | None:
    for glob in role.users:
        if fnmatchcase(user, glob):
            return glob
    return None


def needs_membership(rules: Rules, user: str) -> bool:
    """True if the user's PostgreSQL role memberships could change which role `user` gets."""
    for role in rules.roles:
        if _glob_match(role, user) is not None:
            return False
        if role.member_of:
            return True
    return False


def resolve_role(rules: Rules, user: str, memberships: frozenset[str] | None) -> RoleMatch:
    """The first role (in the order written) that matches `user`, else `default_role`.

    `memberships` is every PostgreSQL role the user is a member of, directly or through
    inheritance; None means it was not looked up (allowed only where `needs_membership` is
    false, otherwise MembershipNeeded is raised).
    """
    for role in rules.roles:
        glob = _glob_match(role, user)
        if glob is not None:
            if any(ch in _GLOB_CHARS for ch in glob):
                why = f"user '{user}' matches users glob '{glob}' of role '{role.name}'"
            else:
                why = f"user '{user}' is listed in users of role '{role.name}'"
            return RoleMatch(role, why, "users", glob)
        if not role.member_of:
            continue
        if memberships is None:
            raise MembershipNeeded(
                f"role '{role.name}' matches by member_of; look up the memberships of '{user}'"
            )
        for pg_role in role.member_of:
            if pg_role in memberships:
                why = (
                    f"user '{user}' is a member of PostgreSQL role '{pg_role}' "
                    f"(member_of of role '{role.name}')"
                )
                return RoleMatch(role, why, "member_of", pg_role)
    default = rules.role(rules.default_role)
    why = f"no role matched user '{user}': default_role '{default.name}'"
    return RoleMatch(default, why, "default")
