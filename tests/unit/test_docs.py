"""The README is the front door: every option of `topeng serve` is documented there."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import OPTIONS, env_name, flag_name

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("option", [o.name for o in OPTIONS])
def test_every_option_is_in_the_readme(option: str) -> None:
    assert f"`{flag_name(option)}" in README, f"README lacks the flag {flag_name(option)}"
    assert env_name(option) in README, f"README lacks the variable {env_name(option)}"


@pytest.mark.parametrize("command", ["serve", "check", "explain", "audit", "demo"])
def test_every_command_is_in_the_readme(command: str) -> None:
    assert f"topeng {command}" in README
