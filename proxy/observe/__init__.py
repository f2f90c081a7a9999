"""Metrics, the audit log and the HTTP endpoint that serves them."""
