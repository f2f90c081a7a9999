"""`topeng serve` configuration: one table of options, three sources, one immutable snapshot.

Every option has a command-line flag (`--max-client-connections`), an environment variable
(`TOPENG_MAX_CLIENT_CONNECTIONS`) and a `topeng.yaml` key (`max_client_connections`). A flag
beats the environment, which beats the file, which beats the default. All mistakes are reported
at once, each naming where the bad value came from.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml


class ConfigError(Exception):
    """The configuration is not usable; str() lists every problem, one per line."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class Address:
    """Where to listen or connect: TCP host and port, or a Unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[Address, ...] = (Address("127.0.0.1", 6432),)
    upstream: Address = Address("127.0.0.1", 5432)
    upstream_tls: str = "disable"
    upstream_tls_ca: str = ""
    rules: str = ""
    metrics_listen: Address | None = Address("127.0.0.1", 9187)
    tls_cert: str = ""
    tls_key: str = ""
    tls_mode: str = ""  # disable | allow | require; "" means allow with a cert, else disable
    workers: int = 1
    audit_log: str = ""
    audit_max_bytes: int = 0  # rotate the audit log file past this size; 0: never (logrotate)
    audit_keep: int = 5  # rotated audit files kept: PATH.1 .. PATH.N
    audit_key_file: str = ""  # key for the HMACs of statement constants in the audit log
    max_client_connections: int = 5000
    startup_timeout: float = 60.0
    connect_timeout: float = 10.0
    idle_timeout: float = 0.0
    shutdown_grace: float = 30.0
    max_message_size: int = 256 * 1024 * 1024
    catalog_refresh: float = 300.0
    track_all: bool = False
    log_level: str = "info"

    @property
    def client_tls(self) -> str:
        if self.tls_mode:
            return self.tls_mode
        return "allow" if self.tls_cert else "disable"


@dataclass(frozen=True, slots=True)
class Option:
    name: str
    help: str
    parse: Callable[[str], Any]
    metavar: str = "VALUE"
    flag_only: bool = False


def parse_address(text: str, *, default_host: str = "127.0.0.1") -> Address:
    """`host:port`, `[v6]:port`, `:port`, or an absolute Unix socket path."""
    text = text.strip()
    if text.startswith("/"):
        return Address(path=text)
    match = re.fullmatch(r"\[(?P<h6>[^\]]+)\]:(?P<p6>\d+)|(?P<h>[^:]*):(?P<p>\d+)", text)
    if not match:
        raise ValueError(f"expected HOST:PORT or a socket path, got {text!r}")
    host = match.group("h6") or match.group("h") or default_host
    port = int(match.group("p6") or match.group("p"))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return Address(host, port)


def parse_listen(text: str) -> tuple[Address, ...]:
    parts = [p for p in re.split(r"[,\s]+", text) if p]
    if not parts:
        raise ValueError("expected at least one address")
    return tuple(parse_address(p) for p in parts)


def parse_upstream(text: str) -> Address:
    """`postgresql://HOST:PORT`, `postgresql://%2Fsocket%2Fdir:PORT`, or HOST:PORT.

    The upstream carries no credentials and no database: the client's own pass through.
    """
    if "://" not in text:
        return parse_address(text)
    url = urlsplit(text)
    if url.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"expected a postgresql:// URL, got scheme {url.scheme!r}")
    if url.username or url.password:
        raise ValueError(
            "the upstream URL must carry no user or password: clients' own credentials pass through"
        )
    if url.path not in ("", "/"):
        raise ValueError("the upstream URL must name no database: the client's own is used")
    host = unquote(url.hostname or "") if url.hostname else ""
    netloc_host = unquote(url.netloc.rsplit(":", 1)[0]) if url.netloc else ""
    port = url.port or 5432
    if netloc_host.startswith("/"):
        return Address(path=f"{netloc_host.rstrip('/')}/.s.PGSQL.{port}")
    return Address(host or "127.0.0.1", port)


def parse_optional_address(text: str) -> Address | None:
    if text.strip().lower() in ("", "off", "none", "disable"):
        return None
    return parse_address(text)


def parse_seconds(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|h)?\s*", text)
    if not match:
        raise ValueError(f"expected a duration such as 30s, 500ms or 2min, got {text!r}")
    value = float(match.group(1))
    scale = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, None: 1.0}[match.group(2)]
    return value * scale


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*(B|kB|KB|MB|GB)?\s*", text)
    if not match:
        raise ValueError(f"expected a size such as 64MB, got {text!r}")
    scale = {None: 1, "B": 1, "kB": 1024, "KB": 1024, "MB": 1024**2, "GB": 1024**3}
    return int(match.group(1)) * scale[match.group(2)]


def parse_positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected a positive whole number, got {value}")
    return value


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


OPTIONS: tuple[Option, ...] = (
    Option(
        "listen",
        "addresses to listen on, comma-separated HOST:PORT or socket paths",
        parse_listen,
        "HOST:PORT",
    ),
    Option(
        "upstream",
        "the PostgreSQL server: postgresql://HOST:PORT (no credentials)",
        parse_upstream,
        "URL",
    ),
    Option(
        "upstream_tls",
        "TLS to the server: disable, prefer, require, verify-full",
        one_of("disable", "prefer", "require", "verify-full"),
        "MODE",
    ),
    Option("upstream_tls_ca", "CA file for upstream_tls verify-full", str, "FILE"),
    Option("rules", "rules file or directory (required)", str, "PATH"),
    Option(
        "metrics_listen",
        "HOST:PORT for /metrics, /healthz and /readyz; 'off' to disable",
        parse_optional_address,
        "HOST:PORT",
    ),
    Option("tls_cert", "certificate for client-facing TLS", str, "FILE"),
    Option("tls_key", "private key for client-facing TLS", str, "FILE"),
    Option(
        "tls_mode",
        "client-facing TLS: disable, allow, require (default: allow with a cert)",
        one_of("disable", "allow", "require"),
        "MODE",
    ),
    Option("workers", "processes sharing the listen port (SO_REUSEPORT)", parse_positive_int, "N"),
    Option("audit_log", "audit log file, or - for standard output", str, "PATH"),
    Option(
        "audit_max_bytes",
        "rotate the audit log file past this size to PATH.1 .. PATH.N (0: never)",
        parse_size,
        "SIZE",
    ),
    Option(
        "audit_keep", "rotated audit log files kept (PATH.1 .. PATH.N)", parse_positive_int, "N"
    ),
    Option(
        "audit_key_file",
        "secret key file: the audit log records keyed hashes (HMAC) of statement constants",
        str,
        "FILE",
    ),
    Option(
        "max_client_connections",
        "client connections accepted at once per process",
        parse_positive_int,
        "N",
    ),
    Option(
        "startup_timeout",
        "time a client has to connect and authenticate",
        parse_seconds,
        "DURATION",
    ),
    Option("connect_timeout", "time to connect to the server", parse_seconds, "DURATION"),
    Option("idle_timeout", "close sessions idle this long (0: never)", parse_seconds, "DURATION"),
    Option("shutdown_grace", "on SIGTERM, time sessions get to finish", parse_seconds, "DURATION"),
    Option("max_message_size", "largest protocol message accepted", parse_size, "SIZE"),
    Option(
        "catalog_refresh", "reload each database's schema this often", parse_seconds, "DURATION"
    ),
    Option(
        "track_all",
        "track every session's protocol, unrestricted ones too (diagnostics)",
        parse_bool,
        "BOOL",
    ),
    Option(
        "log_level",
        "debug, info, warning or error",
        one_of("debug", "info", "warning", "error"),
        "LEVEL",
    ),
)

_FIELDS = {f.name for f in fields(Config)}
assert _FIELDS == {o.name for o in OPTIONS}, "every Config field needs an Option"


def env_name(option: str) -> str:
    return "TOPENG_" + option.upper()


def flag_name(option: str) -> str:
    return "--" + option.replace("_", "-")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="topeng.yaml with any of the options")
    for opt in OPTIONS:
        if opt.parse is parse_bool:
            parser.add_argument(
                flag_name(opt.name),
                dest=opt.name,
                action="store_const",
                const="true",
                help=f"{opt.help} [{env_name(opt.name)}]",
            )
        else:
            parser.add_argument(
                flag_name(opt.name),
                dest=opt.name,
                metavar=opt.metavar,
                help=f"{opt.help} [{env_name(opt.name)}]",
            )


def load_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """Merge flags, environment and config file over the defaults; validate everything."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    raw: dict[str, tuple[str, str]] = {}  # option -> (text, where it came from)
    config_path = getattr(args, "config", None) or environ.get("TOPENG_CONFIG")
    if config_path:
        raw.update(_read_config_file(config_path, problems))
    for opt in OPTIONS:
        if env_name(opt.name) in environ:
            raw[opt.name] = (environ[env_name(opt.name)], f"environment {env_name(opt.name)}")
    for opt in OPTIONS:
        value = getattr(args, opt.name, None)
        if value is not None:
            raw[opt.name] = (value, f"flag {flag_name(opt.name)}")
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        if opt.name not in raw:
            continue
        text, where = raw[opt.name]
        try:
            values[opt.name] = opt.parse(text)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    config = Config(**values)
    problems.extend(_check(config))
    if problems:
        raise ConfigError(problems)
    return config


def _read_config_file(path: str, problems: list[str]) -> dict[str, tuple[str, str]]:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except OSError as exc:
        problems.append(f"{path}: cannot read config file: {exc.strerror}")
        return {}
    except yaml.YAMLError as exc:
        problems.append(f"{path}: not valid YAML: {exc}")
        return {}
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        problems.append(f"{path}: expected a mapping of option names to values")
        return {}
    out: dict[str, tuple[str, str]] = {}
    for key, value in doc.items():
        if key not in _FIELDS:
            import difflib

            near = difflib.get_close_matches(str(key), sorted(_FIELDS), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            problems.append(f"{path}: unknown option {key!r}{hint}")
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list):
            text = ",".join(str(v) for v in value)
        else:
            text = "" if value is None else str(value)
        out[key] = (text, f"{path}: {key}")
    return out


def _check(config: Config) -> list[str]:
    problems = []
    if not config.rules:
        problems.append(
            "no rules given (--rules, TOPENG_RULES or rules: in the config file): "
            "Topeng does not run without rules"
        )
    elif not Path(config.rules).exists():
        problems.append(f"rules: {config.rules}: no such file or directory")
    if bool(config.tls_cert) != bool(config.tls_key):
        problems.append("tls_cert and tls_key go together: give both or neither")
    if config.client_tls != "disable" and not config.tls_cert:
        problems.append(f"tls_mode {config.client_tls} needs tls_cert and tls_key")
    for name in ("tls_cert", "tls_key", "upstream_tls_ca", "audit_key_file"):
        value = getattr(config, name)
        if value and not Path(value).is_file():
            problems.append(f"{name}: {value}: no such file")
    if config.upstream_tls == "verify-full" and not config.upstream_tls_ca:
        problems.append("upstream_tls verify-full needs upstream_tls_ca")
    if config.workers > 1 and any(a.path for a in config.listen):
        problems.append("workers > 1 needs TCP listen addresses (SO_REUSEPORT)")
    if config.max_message_size < 16 * 1024:
        problems.append("max_message_size must be at least 16kB")
    return problems
