"""The pure parts of proxy.sampledata: NIK/KK structure and deterministic generation."""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.sampledata import REGIONS, _generate, make_kk, make_nik, parse_nik


def test_make_nik_man() -> None:
    assert make_nik("317101", date(1990, 8, 17), "L", 1) == "3171011708900001"


def test_make_nik_woman_adds_40_to_the_day() -> None:
    assert make_nik("317101", date(1990, 8, 17), "P", 42) == "3171015708900042"
    assert make_nik("510301", date(2001, 1, 31), "P", 9999) == "5103017101019999"


def test_parse_nik() -> None:
    info = parse_nik("3171015708900042", max_year=2026)
    assert info.region == "317101"
    assert info.province_code == "31"
    assert info.regency_code == "3171"
    assert info.birth_date == date(1990, 8, 17)
    assert info.gender == "P"
    assert info.serial == 42


@pytest.mark.parametrize(
    ("yy", "max_year", "year"),
    [("06", 2026, 2006), ("26", 2026, 2026), ("27", 2026, 1927), ("50", 2026, 1950)],
)
def test_parse_nik_two_digit_year(yy: str, max_year: int, year: int) -> None:
    assert parse_nik(f"3273011503{yy}0001", max_year=max_year).birth_date == date(year, 3, 15)


@pytest.mark.parametrize(
    "nik",
    [
        "317101170890001",  # 15 digits
        "31710117089000011",  # 17 digits
        "31710117089O0001",  # a letter
        "3171013208900001",  # day 32
        "3171017208900001",  # day 72 (women: 41..71)
        "3171014008900001",  # day 0 for a woman
        "3171011713900001",  # month 13
        "3171013002900001",  # 30 February
        "3171011708900000",  # serial 0000
        "３１７１０１１７０８９００００１",  # full-width digits are not ASCII digits
    ],
)
def test_parse_nik_rejects(nik: str) -> None:
    with pytest.raises(ValueError):
        parse_nik(nik, max_year=2026)


@pytest.mark.parametrize(
    ("region", "gender", "serial"),
    [("31710", "L", 1), ("3171011", "L", 1), ("317101", "X", 1), ("317101", "L", 0),
     ("317101", "L", 10000)],
)  # fmt: skip
def test_make_nik_rejects(region: str, gender: str, serial: int) -> None:
    with pytest.raises(ValueError):
        make_nik(region, date(1990, 1, 1), gender, serial)


@given(
    region=st.from_regex(r"\A[0-9]{6}\Z"),
    birth=st.dates(min_value=date(1927, 1, 1), max_value=date(2026, 12, 31)),
    gender=st.sampled_from("LP"),
    serial=st.integers(1, 9999),
)
def test_nik_round_trip(region: str, birth: date, gender: str, serial: int) -> None:
    nik = make_nik(region, birth, gender, serial)
    assert len(nik) == 16 and nik.isdigit()
    info = parse_nik(nik, max_year=2026)
    assert (info.region, info.birth_date, info.gender, info.serial) == (
        region, birth, gender, serial,
    )  # fmt: skip


def test_make_kk() -> None:
    assert make_kk("327301", date(2015, 3, 9), 7) == "3273010903150007"


def _rows(blob: bytes) -> list[list[str]]:
    return [line.split("\t") for line in blob.decode().splitlines()]


def test_generation_is_deterministic_and_prefix_stable() -> None:
    a = _generate(300, 7)
    b = _generate(300, 7)
    assert a.customers.getvalue() == b.customers.getvalue()
    assert a.transactions.getvalue() == b.transactions.getvalue()
    # the first N customers do not depend on how many follow
    shorter = _generate(100, 7)
    assert _rows(shorter.customers.getvalue()) == _rows(a.customers.getvalue())[:100]
    assert _generate(300, 8).customers.getvalue() != a.customers.getvalue()


def test_generated_customers_are_consistent() -> None:
    tables = _generate(2_000, 20261128)
    cities = {r.code: (r.city, r.province) for r in REGIONS}
    niks = set()
    for row in _rows(tables.customers.getvalue()):
        assert len(row) == 14
        _id, _name, nik, no_kk, mother, birth, gender, income, _hp, _mail, addr, city, prov, _ = row
        info = parse_nik(nik, max_year=2026)
        assert info.birth_date == date.fromisoformat(birth)
        assert info.gender == gender
        assert cities[nik[:4]] == (city, prov)
        assert len(no_kk) == 16 and no_kk[:6] == nik[:6]
        assert mother
        assert 3_000_000 <= float(income) <= 50_000_000
        assert addr.startswith("Jl. ") and "RT " in addr
        niks.add(nik)
    assert len(niks) == 2_000
    accounts = _rows(tables.accounts.getvalue())
    assert 1.2 < len(accounts) / 2_000 < 1.8
    assert len({a[2] for a in accounts}) == len(accounts)  # account numbers are unique
