"""Topeng's optional C modules (the masking loop, the relay thread): one rule for loading them.

A module is used when it was built (setuptools compiles them at install when a C compiler is
there) and `TOPENG_PURE_PYTHON` is not set in the environment; otherwise Topeng does the same
work in Python.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["load"]


def load(name: str) -> ModuleType | None:
    """The C module `name`, or None if it is not built or TOPENG_PURE_PYTHON is set."""
    if os.environ.get("TOPENG_PURE_PYTHON"):
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
