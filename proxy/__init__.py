"""Topeng: a PostgreSQL wire-protocol proxy that masks customer data in transit."""

from __future__ import annotations

__version__ = "0.1.0"
