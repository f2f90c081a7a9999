"""Role resolution against the real server, through a real Topeng process.

A session's role is observed by its effect only:
- `SET work_mem` is refused for every restricted role with a message naming the role, and
  runs for an unrestricted one (`role_of`);
- the NIK a user sees: raw for an unrestricted role, 6 digits kept for agent and for the
  default role, 2 kept for supervisor (`nik_of`).

Users and PostgreSQL roles (prefix rt_) are created by the module fixture and dropped after.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from harness import PgServer, TopengProcess

StartTopeng = Callable[..., TopengProcess]
PASSWORD = "rt-secret"

RULES = """\
version: 1
roles:
  admins:     {users: [postgres], member_of: [rt_admins], unrestricted: true}
  supervisor: {users: ["rt_spv_*"], member_of: [rt_supervisors]}
  agent:      {users: ["rt_agent_*"], member_of: [rt_agents]}
  outsider:   {max_rows_per_query: 5}
default_role: outsider
labels:
  nik: ["*.*.nik"]
policies:
  "*":
    nik: {mask: partial, keep_first: 6}
  supervisor:
    nik: {mask: partial, keep_first: 2}
"""

GROUPS = ("rt_admins", "rt_supervisors", "rt_agents", "rt_mid", "rt_top")
USERS = {
    # user: (extra CREATE ROLE options, groups granted)
    "rt_agent_glob": ("", ()),
    "rt_spv_glob": ("", ()),
    "rt_direct": ("", ("rt_agents",)),
    "rt_inherit": ("", ("rt_mid",)),  # rt_mid is a member of rt_agents
    "rt_deep": ("", ("rt_top",)),  # rt_top -> rt_mid -> rt_agents
    "rt_noinherit": ("NOINHERIT", ("rt_agents",)),
    "rt_noinherit_chain": ("NOINHERIT", ("rt_mid",)),
    "rt_plain": ("", ()),
    "rt_agent_but_spv": ("", ("rt_supervisors",)),  # agent glob, supervisor membership
    "rt_spv_but_agent": ("", ("rt_agents",)),  # supervisor glob, agent membership
    "rt_two_groups": ("", ("rt_agents", "rt_supervisors")),
    "rt_admin_member": ("", ("rt_admins",)),
    "rt_changing": ("", ("rt_agents",)),
    "rt_setter": ("NOINHERIT", ("rt_agents", "rt_vault")),
}


def _setup_sql(database: str) -> str:
    names = (*USERS, *GROUPS, "rt_vault")
    lines = [f"DROP ROLE IF EXISTS {', '.join(names)};"]
    lines += [f"CREATE ROLE {g} NOLOGIN;" for g in (*GROUPS, "rt_vault")]
    lines += ["GRANT rt_agents TO rt_mid;", "GRANT rt_mid TO rt_top;"]
    for user, (options, groups) in USERS.items():
        lines.append(f"CREATE ROLE {user} LOGIN {options} PASSWORD '{PASSWORD}';")
        lines += [f"GRANT {g} TO {user};" for g in groups]
        lines.append(f"GRANT USAGE ON SCHEMA bank TO {user};")
        lines.append(f"GRANT SELECT ON bank.customers TO {user};")
    # a NOLOGIN role holding a privilege its NOINHERIT member only gets by becoming it
    lines.append("GRANT USAGE ON SCHEMA bank TO rt_vault;")
    lines.append("GRANT SELECT ON bank.accounts, bank.customers TO rt_vault;")
    return "\n".join(lines) + "\n"


def _teardown_sql() -> str:
    names = ", ".join((*USERS, *GROUPS, "rt_vault"))
    return f"DROP OWNED BY {names};\nDROP ROLE {names};\n"


@pytest.fixture(scope="module")
def rt_roles(pg: PgServer) -> Iterator[None]:
    pg.execute(_setup_sql(pg.database))
    try:
        yield
    finally:
        pg.execute(_teardown_sql())


@pytest.fixture
def proxy(start_topeng: StartTopeng, rt_roles: None, tmp_path: Path) -> TopengProcess:
    rules = tmp_path / "roles.yaml"
    rules.write_text(RULES)
    return start_topeng(rules=rules)


@pytest.fixture(scope="module")
def raw_nik(pg: PgServer) -> str:
    return pg.execute("SELECT nik FROM bank.customers WHERE id = 1;").strip()


@contextlib.asynccontextmanager
async def session(
    proxy: TopengProcess, user: str, **kwargs: object
) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(proxy.dsn(user, PASSWORD), **kwargs)  # type: ignore[arg-type]
    try:
        yield conn
    finally:
        await conn.close()


async def role_of(conn: asyncpg.Connection) -> str:
    """The Topeng role applied to this session, or `unrestricted`."""
    try:
        await conn.execute("SET work_mem = '4MB'")
    except asyncpg.InsufficientPrivilegeError as exc:
        found = re.fullmatch(
            r"topeng: setting parameter work_mem is not permitted for role (\S+)", exc.message
        )
        assert found is not None, exc.message
        return found.group(1)
    await conn.execute("RESET work_mem")
    return "unrestricted"


async def nik_of(conn: asyncpg.Connection) -> str:
    value = await conn.fetchval("SELECT nik FROM bank.customers WHERE id = 1")
    assert isinstance(value, str)
    return value


def kept(nik: str, raw: str) -> int:
    """How many leading characters of the raw NIK are shown (16 = unmasked)."""
    assert len(nik) == len(raw) == 16
    if nik == raw:
        return 16
    shown = len(nik.rstrip("*"))
    assert nik[:shown] == raw[:shown] and set(nik[shown:]) == {"*"}, (nik, raw)
    return shown


EXPECTED = [
    ("rt_agent_glob", "agent", 6),  # users glob
    ("rt_spv_glob", "supervisor", 2),  # users glob
    ("rt_direct", "agent", 6),  # GRANT rt_agents TO user
    ("rt_inherit", "agent", 6),  # user -> rt_mid -> rt_agents
    ("rt_deep", "agent", 6),  # user -> rt_top -> rt_mid -> rt_agents
    ("rt_noinherit", "agent", 6),  # NOINHERIT still a member (pg_has_role MEMBER)
    ("rt_noinherit_chain", "agent", 6),
    ("rt_plain", "outsider", 6),  # matches nothing: default_role
    ("rt_agent_but_spv", "supervisor", 2),  # supervisor is written first: membership wins
    ("rt_spv_but_agent", "supervisor", 2),  # supervisor glob, first match
    ("rt_two_groups", "supervisor", 2),  # member of both: the first role written
    ("rt_admin_member", "unrestricted", 16),  # membership of an unrestricted role's group
]


@pytest.mark.parametrize(("user", "role", "shown"), EXPECTED, ids=[e[0] for e in EXPECTED])
async def test_role_resolution(
    proxy: TopengProcess, raw_nik: str, user: str, role: str, shown: int
) -> None:
    async with session(proxy, user) as conn:
        assert await role_of(conn) == role
        assert kept(await nik_of(conn), raw_nik) == shown


async def test_postgres_glob_is_unrestricted(
    proxy: TopengProcess, pg: PgServer, raw_nik: str
) -> None:
    conn = await asyncpg.connect(proxy.dsn(pg.superuser, pg.superuser_password))
    try:
        assert await role_of(conn) == "unrestricted"
        assert await nik_of(conn) == raw_nik
    finally:
        await conn.close()


async def test_membership_change_is_picked_up_by_the_next_session(
    proxy: TopengProcess, pg: PgServer, raw_nik: str
) -> None:
    try:
        async with session(proxy, "rt_changing") as before:
            assert await role_of(before) == "agent"
            pg.execute("REVOKE rt_agents FROM rt_changing; GRANT rt_supervisors TO rt_changing;")
            async with session(proxy, "rt_changing") as after:
                assert await role_of(after) == "supervisor"
                assert kept(await nik_of(after), raw_nik) == 2
            # the open session keeps the role it started with
            assert await role_of(before) == "agent"
            assert kept(await nik_of(before), raw_nik) == 6
            pg.execute("REVOKE rt_supervisors FROM rt_changing;")
            async with session(proxy, "rt_changing") as revoked:
                assert await role_of(revoked) == "outsider"
    finally:
        pg.execute("REVOKE rt_supervisors FROM rt_changing; GRANT rt_agents TO rt_changing;")


@pytest.mark.parametrize(
    ("statement", "refusal"),
    [
        ("SET ROLE rt_agents", "SET ROLE is not permitted for role agent"),
        ("SET ROLE postgres", "SET ROLE is not permitted for role agent"),
        ("SET LOCAL ROLE rt_agents", "SET ROLE is not permitted for role agent"),
        (
            "SET SESSION AUTHORIZATION postgres",
            "SET SESSION AUTHORIZATION is not permitted for role agent",
        ),
        (
            "SET SESSION AUTHORIZATION rt_admin_member",
            "SET SESSION AUTHORIZATION is not permitted for role agent",
        ),
        ("SELECT set_config('role', 'rt_agents', false)", "function set_config is not permitted"),
    ],
)
async def test_set_role_is_refused_and_changes_nothing(
    proxy: TopengProcess, raw_nik: str, statement: str, refusal: str
) -> None:
    async with session(proxy, "rt_direct") as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as caught:
            await conn.execute(statement)
        assert refusal in caught.value.message
        assert await conn.fetchval("SELECT current_user") == "rt_direct"
        assert await role_of(conn) == "agent"
        assert kept(await nik_of(conn), raw_nik) == 6


async def test_set_role_inside_a_transaction_is_refused(proxy: TopengProcess, raw_nik: str) -> None:
    async with session(proxy, "rt_direct") as conn:
        async with conn.transaction():
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("SET ROLE rt_agents")
        assert await role_of(conn) == "agent"
        assert kept(await nik_of(conn), raw_nik) == 6


@pytest.mark.parametrize(
    "settings",
    [{"options": "-c role=rt_vault"}, {"role": "rt_vault"}],
    ids=["options", "parameter"],
)
async def test_startup_role_does_not_change_topengs_role(
    proxy: TopengProcess, raw_nik: str, settings: dict[str, str]
) -> None:
    # rt_setter is an agent (member of rt_agents); its startup packet asks PostgreSQL to run the
    # session as another role it is a member of. Topeng decides from the authenticated user.
    # Topeng refuses such a startup packet for a restricted role outright.
    with pytest.raises(asyncpg.PostgresError) as caught:
        async with session(proxy, "rt_setter", server_settings=settings) as conn:
            # Reached only if the connection was accepted: then nothing may have changed.
            assert await role_of(conn) == "agent"
            assert kept(await nik_of(conn), raw_nik) == 6
    assert caught.value.sqlstate == "42501" and "startup parameter" in str(caught.value)


@pytest.mark.parametrize(
    "settings",
    [{"options": "-c role=rt_vault"}, {"role": "rt_vault"}],
    ids=["options", "parameter"],
)
async def test_startup_role_is_refused_for_restricted_roles(
    proxy: TopengProcess, settings: dict[str, str]
) -> None:
    # Either Topeng refuses the connection, or the session runs as the authenticated user.
    try:
        conn = await asyncpg.connect(
            proxy.dsn("rt_setter", PASSWORD),
            server_settings=settings,  # type: ignore[arg-type]
        )
    except asyncpg.PostgresError as exc:
        assert exc.sqlstate == "42501" and "topeng" in str(exc)
        return
    try:
        # rt_setter is NOINHERIT: only as rt_vault may it read bank.accounts
        assert await conn.fetchval("SELECT current_user") == "rt_setter"
    finally:
        await conn.close()
