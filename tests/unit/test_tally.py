"""Tallied metrics: what reaches prometheus_client after a flush equals direct updates."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram

from proxy.observe import tally

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1, 1, 10)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


@given(
    st.lists(
        st.one_of(
            st.floats(min_value=0, max_value=100, allow_nan=False),
            st.sampled_from(BUCKETS),  # exactly on a bound: that bucket, as observe() does
        ),
        max_size=60,
    ),
    st.lists(st.integers(min_value=0, max_value=59), max_size=5),
)
def test_a_tallied_histogram_equals_one_observed_directly(
    values: list[float], flush_at: list[int]
) -> None:
    direct_reg, tallied_reg = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("h", "h", ["role"], buckets=BUCKETS, registry=direct_reg)
    tallied = Histogram("h", "h", ["role"], buckets=BUCKETS, registry=tallied_reg)
    d = direct.labels("agent")
    t = tally.HistogramTally(tallied.labels("agent"))
    for i, v in enumerate(values):
        d.observe(v)
        t.observe(v)
        if i in flush_at:
            t.flush()
    t.flush()
    want, got = samples(direct_reg), samples(tallied_reg)
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-9, abs_tol=1e-9), key


def test_nothing_reaches_prometheus_before_a_flush() -> None:
    registry = CollectorRegistry()
    c = Counter("c", "c", ["decision"], registry=registry)
    h = Histogram("d", "d", buckets=BUCKETS, registry=registry)
    ct = tally.counter(c.labels("masked"))
    ht = tally.histogram(h)
    assert tally.counter(c.labels("masked")) is ct, "one tally per child"
    ct.inc()
    ct.inc(2)
    ht.observe(0.003)
    assert samples(registry)[("c_total", (("decision", "masked"),))] == 0
    assert samples(registry)[("d_count", ())] == 0
    tally.flush_all()
    assert samples(registry)[("c_total", (("decision", "masked"),))] == 3
    assert samples(registry)[("d_count", ())] == 1
    assert samples(registry)[("d_bucket", (("le", "0.005"),))] == 1
    assert samples(registry)[("d_bucket", (("le", "0.0025"),))] == 0
    tally.flush_all()  # flushed figures are not added twice
    assert samples(registry)[("c_total", (("decision", "masked"),))] == 3


def test_without_direct_access_values_are_observed_at_flush() -> None:
    registry = CollectorRegistry()
    h = Histogram("x", "x", buckets=BUCKETS, registry=registry)

    class Plain:  # a histogram child without prometheus_client's internals
        def observe(self, v: float) -> None:
            h.observe(v)

    t = tally.HistogramTally(Plain())
    t.observe(0.5)
    t.observe(20)
    assert samples(registry)[("x_count", ())] == 0
    t.flush()
    assert samples(registry)[("x_count", ())] == 2
    assert samples(registry)[("x_sum", ())] == 20.5
