"""Sample data of an Indonesian bank: customers, accounts, transactions, and the demo users.

Strategy: one seeded `random.Random` drives everything, so the same seed yields the same rows
byte for byte. Rows are rendered as COPY text in memory and loaded with `COPY ... FROM STDIN`
into bare tables; keys, constraints and indexes are added afterwards (faster than checking
them row by row), then ANALYZE.

A NIK (Nomor Induk Kependudukan) has 16 digits: a 6-digit region code (2 province, 2 regency,
2 district), the birth date as DDMMYY with 40 added to DD for women, and a 4-digit serial. A KK
(Kartu Keluarga, family card) number is the region code, the issue date as DDMMYY and a serial.
"""

from __future__ import annotations

import asyncio
import bisect
import io
import itertools
import math
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, TypeVar

__all__ = [
    "DEMO_USERS",
    "DEMO_USER_ROLES",
    "REGIONS",
    "NikInfo",
    "Region",
    "load_sample",
    "load_sample_sync",
    "make_kk",
    "make_nik",
    "parse_nik",
]

#: LOGIN users created by `load_sample`, with their passwords.
DEMO_USERS: dict[str, str] = {
    "dba_ani": "ani-dba-secret",
    "spv_budi": "budi-spv-secret",
    "agent_citra": "citra-agent-secret",
    "ai_helper": "ai-helper-secret",
}

#: The Topeng role each demo user gets under rules/bank.yaml, and why.
DEMO_USER_ROLES: dict[str, str] = {
    "dba_ani": "dba (unrestricted: user name matches dba_*)",
    "spv_budi": "supervisor (spv_*, member of supervisors)",
    "agent_citra": "agent (agent_*, member of agents)",
    "ai_helper": "agent (ai_*: an AI tool)",
}

DEFAULT_SEED = 20261128
_T = TypeVar("_T")
_EPOCH_DATE = date(2026, 11, 28)  # "today" of the sample world: nothing depends on the clock


# -- NIK and KK --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NikInfo:
    region: str  # 6 digits: province, regency, district
    birth_date: date
    gender: str  # "L" (laki-laki) or "P" (perempuan)
    serial: int

    @property
    def province_code(self) -> str:
        return self.region[:2]

    @property
    def regency_code(self) -> str:
        return self.region[:4]


def _check_region(region: str) -> None:
    if len(region) != 6 or not region.isdigit() or not region.isascii():
        raise ValueError(f"region code must be 6 digits, not {region!r}")


def make_nik(region: str, birth_date: date, gender: str, serial: int) -> str:
    """The 16-digit NIK of a person: region, DDMMYY (DD+40 for women), serial 0001-9999."""
    _check_region(region)
    if gender not in ("L", "P"):
        raise ValueError(f"gender must be 'L' or 'P', not {gender!r}")
    if not 1 <= serial <= 9999:
        raise ValueError(f"serial must be 1..9999, not {serial}")
    day = birth_date.day + (40 if gender == "P" else 0)
    return f"{region}{day:02d}{birth_date.month:02d}{birth_date.year % 100:02d}{serial:04d}"


def make_kk(region: str, issued: date, serial: int) -> str:
    """A 16-digit family card number: region, issue date as DDMMYY, serial 0001-9999."""
    _check_region(region)
    if not 1 <= serial <= 9999:
        raise ValueError(f"serial must be 1..9999, not {serial}")
    return f"{region}{issued.day:02d}{issued.month:02d}{issued.year % 100:02d}{serial:04d}"


def parse_nik(nik: str, *, max_year: int | None = None) -> NikInfo:
    """Split a NIK into its parts. Raises ValueError if it cannot be a NIK.

    A NIK stores a 2-digit year: it is read as the latest year not after `max_year`
    (default: this year), so with max_year=2026, "06" is 2006 and "50" is 1950.
    """
    if len(nik) != 16 or not nik.isdigit() or not nik.isascii():
        raise ValueError(f"a NIK has 16 digits: {nik!r}")
    region = nik[:6]
    day, month, yy, serial = int(nik[6:8]), int(nik[8:10]), int(nik[10:12]), int(nik[12:])
    if day > 40:
        gender, day = "P", day - 40
    else:
        gender = "L"
    if max_year is None:
        max_year = date.today().year
    year = (max_year // 100) * 100 + yy
    if year > max_year:
        year -= 100
    try:
        birth = date(year, month, day)
    except ValueError:
        raise ValueError(f"NIK {nik} has no valid birth date") from None
    if serial == 0:
        raise ValueError(f"NIK {nik} has serial 0000")
    return NikInfo(region=region, birth_date=birth, gender=gender, serial=serial)


# -- the world's vocabulary --------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    code: str  # 4 digits: province + regency/city
    city: str
    province: str
    districts: int  # district codes 01..districts exist
    weight: int  # relative share of customers


REGIONS: tuple[Region, ...] = (
    Region("3171", "Jakarta Selatan", "DKI Jakarta", 10, 22),
    Region("3172", "Jakarta Timur", "DKI Jakarta", 10, 24),
    Region("3173", "Jakarta Pusat", "DKI Jakarta", 8, 9),
    Region("3174", "Jakarta Barat", "DKI Jakarta", 8, 20),
    Region("3175", "Jakarta Utara", "DKI Jakarta", 6, 14),
    Region("3201", "Kabupaten Bogor", "Jawa Barat", 40, 18),
    Region("3271", "Kota Bogor", "Jawa Barat", 6, 6),
    Region("3273", "Kota Bandung", "Jawa Barat", 30, 18),
    Region("3275", "Kota Bekasi", "Jawa Barat", 12, 16),
    Region("3276", "Kota Depok", "Jawa Barat", 11, 12),
    Region("3374", "Kota Semarang", "Jawa Tengah", 16, 12),
    Region("3372", "Kota Surakarta", "Jawa Tengah", 5, 4),
    Region("3471", "Kota Yogyakarta", "DI Yogyakarta", 14, 4),
    Region("3404", "Kabupaten Sleman", "DI Yogyakarta", 17, 7),
    Region("3578", "Kota Surabaya", "Jawa Timur", 31, 20),
    Region("3573", "Kota Malang", "Jawa Timur", 5, 6),
    Region("3515", "Kabupaten Sidoarjo", "Jawa Timur", 18, 10),
    Region("3671", "Kota Tangerang", "Banten", 13, 12),
    Region("3674", "Kota Tangerang Selatan", "Banten", 7, 10),
    Region("5171", "Kota Denpasar", "Bali", 4, 5),
    Region("5103", "Kabupaten Badung", "Bali", 6, 4),
    Region("1275", "Kota Medan", "Sumatera Utara", 21, 14),
    Region("1371", "Kota Padang", "Sumatera Barat", 11, 5),
    Region("1671", "Kota Palembang", "Sumatera Selatan", 18, 8),
    Region("2171", "Kota Batam", "Kepulauan Riau", 12, 6),
    Region("6471", "Kota Balikpapan", "Kalimantan Timur", 6, 4),
    Region("6472", "Kota Samarinda", "Kalimantan Timur", 10, 4),
    Region("7371", "Kota Makassar", "Sulawesi Selatan", 15, 9),
)

_MALE = (
    "Budi Agus Andi Ahmad Muhammad Rizky Dedi Eko Hendra Joko Bambang Wahyu Fajar Dimas Yusuf "
    "Arif Hadi Teguh Slamet Rudi Irfan Reza Bayu Ilham Aditya Doni Yoga Hendro Sigit Taufik "
    "Fikri Rahmat Agung Dwi Gilang Hafiz Iqbal Kevin Lukman Nanda Rangga Surya Tri Wawan Yudi "
    "Bagus Danu Firman Galih Heru Imam Johan Krisna Ridwan Satria Zainal Farhan Raka Dafa"
).split()
_FEMALE = (
    "Siti Sri Dewi Ani Citra Rina Wulan Fitri Putri Ayu Indah Nur Lestari Ratna Yuni Dian Nia "
    "Maya Intan Nadia Anisa Kartika Sari Novi Eka Fitria Mega Rini Tika Wati Yulia Zahra Aisyah "
    "Bunga Cahya Desi Elsa Febri Gita Hana Ika Julia Kirana Laras Melati Nabila Okta Puspa "
    "Rahma Salsabila Tiara Vina Widya Yanti Zaskia Amelia Annisa Dinda"
).split()
_FAMILY = (
    "Santoso Wijaya Pratama Saputra Hidayat Setiawan Kurniawan Nugroho Wibowo Susanto Gunawan "
    "Halim Tanjung Rahman Hakim Firmansyah Ramadhan Kusuma Permana Mahendra Suryadi Utomo "
    "Prasetyo Handoko Sulistyo Hartono Salim Syahputra Maulana Hermawan Purnomo Wijayakusuma "
    "Siswanto Sutrisno Darmawan Irawan Budiman Effendi Iskandar Sanjaya Wirawan Yulianto"
).split()
_FAMILY_F = (
    "Lestari Rahayu Susanti Anggraini Puspita Maharani Safitri Oktaviani Permatasari Handayani "
    "Wulandari Kusumawati Rahmawati Purnamasari Pertiwi Fitriani Yuliani Marlina Novitasari "
    "Hartati Setiawati Kurniasih Ningsih Astuti Utami Wijaya Santoso Hidayati"
).split()
_BATAK = (
    "Siregar Nasution Harahap Lubis Simanjuntak Sinaga Hutapea Sihombing Purba Hasibuan "
    "Pangaribuan Tambunan Manurung Simatupang Situmorang Sitompul Panjaitan Napitupulu Silalahi"
).split()
_BALI_ORDER = ("Putu", "Wayan", "Gede", "Made", "Kadek", "Nyoman", "Komang", "Ketut")
_BALI_MALE = "Agus Ari Budi Darma Eka Indra Juliana Krisna Putra Surya Wira Yoga Adi".split()
_BALI_FEMALE = "Ayu Dewi Eka Indah Kartika Lestari Ratih Sari Sekar Sri Widya Yuni".split()
_STREETS = (
    "Sudirman",
    "M.H. Thamrin",
    "Gatot Subroto",
    "Diponegoro",
    "Ahmad Yani",
    "Pemuda",
    "Merdeka",
    "Gajah Mada",
    "Hayam Wuruk",
    "Pahlawan",
    "Kartini",
    "Veteran",
    "Cendrawasih",
    "Melati",
    "Mawar",
    "Anggrek",
    "Kenanga",
    "Flamboyan",
    "Pattimura",
    "Imam Bonjol",
    "Teuku Umar",
    "Cut Nyak Dien",
    "Sisingamangaraja",
    "Pangeran Antasari",
    "Raya Kebayoran",
    "Kebon Jeruk",
    "Kemang Raya",
    "Dr. Sutomo",
    "Hasanuddin",
    "Sam Ratulangi",
    "Panglima Polim",
    "Kramat Raya",
)
_PHONE_PREFIXES = (
    "811 812 813 821 822 823 851 852 853 814 815 816 855 856 857 858 817 818 819 859 877 878 "
    "831 832 838 895 896 897 898 899 881 882 887 888"
).split()
_MAIL_DOMAINS = ("gmail.com", "gmail.com", "gmail.com", "yahoo.co.id", "yahoo.com",
                 "outlook.com", "hotmail.com", "ymail.com", "icloud.com")  # fmt: skip
_PRODUCTS = (("Tabungan", 55), ("TabunganKu", 12), ("Tabungan Haji", 5), ("Giro", 10),
             ("Deposito", 12), ("Tabungan Bisnis", 6))  # fmt: skip
_STATUSES = (("aktif", 86), ("dormant", 9), ("ditutup", 5))
_MERCHANTS = ("PLN", "PDAM", "Telkomsel", "Indihome", "BPJS Kesehatan", "Tokopedia", "Shopee",
              "GoPay", "OVO", "DANA", "Pertamina", "Alfamart", "Indomaret")  # fmt: skip


# -- generation --------------------------------------------------------------------------------


def _copy_text(value: str) -> str:
    # Our vocabulary never needs COPY escapes; guard anyway so a future word cannot corrupt rows.
    if "\t" in value or "\n" in value or "\\" in value or "\r" in value:
        raise ValueError(f"sample value needs COPY escaping: {value!r}")
    return value


@dataclass
class _Tables:
    customers: io.BytesIO
    accounts: io.BytesIO
    transactions: io.BytesIO
    counts: dict[str, int]


class _Dice:
    """Fast draws from one seeded Random (random.randrange and friends are ~5x slower)."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed).random

    def below(self, n: int) -> int:
        return int(self.random() * n)

    def between(self, lo: int, hi: int) -> int:  # inclusive, like randint
        return lo + int(self.random() * (hi - lo + 1))

    def pick(self, seq: Sequence[_T]) -> _T:
        return seq[int(self.random() * len(seq))]

    def weighted(self, seq: Sequence[_T], cumulative: Sequence[float]) -> _T:
        return seq[bisect.bisect(cumulative, self.random() * cumulative[-1])]

    def lognormal(self, mu: float, sigma: float) -> float:
        # Box-Muller on our own draws, so only `random()` is ever called on the generator
        u1 = 1.0 - self.random()
        u2 = self.random()
        return math.exp(mu + sigma * math.sqrt(-2.0 * math.log(u1)) * math.cos(2 * math.pi * u2))

    def exponential(self, mean: float) -> float:
        return -math.log(1.0 - self.random()) * mean


def _name(dice: _Dice, gender: str, province: str) -> str:
    if province == "Bali" and dice.random() < 0.8:
        order = dice.pick(_BALI_ORDER)
        if gender == "L":
            return f"I {order} {dice.pick(_BALI_MALE)}"
        return f"Ni {dice.pick(('Luh', 'Putu', 'Made', 'Kadek'))} {dice.pick(_BALI_FEMALE)}"
    given = dice.pick(_MALE if gender == "L" else _FEMALE)
    if province == "Sumatera Utara" and dice.random() < 0.7:
        return f"{given} {dice.pick(_BATAK)}"
    r = dice.random()
    if r < 0.08:
        return given  # a single name, common in Java
    family = dice.pick(_FAMILY if gender == "L" else _FAMILY_F)
    if r < 0.25:
        middle = dice.pick(_MALE if gender == "L" else _FEMALE)
        if middle != given:
            return f"{given} {middle} {family}"
    return f"{given} {family}"


def _mother_name(dice: _Dice, province: str) -> str:
    if province == "Bali" and dice.random() < 0.8:
        return f"Ni {dice.pick(('Luh', 'Nyoman', 'Made', 'Ketut'))} {dice.pick(_BALI_FEMALE)}"
    given = dice.pick(_FEMALE)
    if dice.random() < 0.35:
        return given
    return f"{given} {dice.pick(_BATAK if province == 'Sumatera Utara' else _FAMILY_F)}"


def _email(dice: _Dice, name: str, birth: date) -> str:
    parts = [p.lower() for p in name.split() if p not in ("I", "Ni")]
    style = dice.below(5)
    if style == 0:
        local = ".".join(parts[:2])
    elif style == 1:
        local = f"{parts[0]}{birth.year % 100:02d}"
    elif style == 2:
        local = f"{parts[0]}.{parts[-1]}{dice.between(1, 999)}"
    elif style == 3:
        local = f"{parts[0][0]}{parts[-1]}"
    else:
        local = f"{parts[-1]}_{parts[0]}{birth.year}"
    return f"{local}@{dice.pick(_MAIL_DOMAINS)}"


def _phone(dice: _Dice) -> str:
    digits = dice.pick((7, 8, 8, 9))
    low = 10 ** (digits - 1)
    return f"+62{dice.pick(_PHONE_PREFIXES)}{low + dice.below(9 * low)}"


def _income(dice: _Dice) -> str:
    # Log-normal around IDR 7.5 million a month, clipped to 3-50 million, to the thousand.
    value = min(max(dice.lognormal(15.83, 0.6), 3_000_000.0), 50_000_000.0)
    return f"{round(value, -3):.2f}"


def _timestamp(dice: _Dice, day: date) -> str:
    seconds = dice.between(6 * 3600, 23 * 3600 - 1)
    hour, rest = divmod(seconds, 3600)
    return f"{day.isoformat()} {hour:02d}:{rest // 60:02d}:{rest % 60:02d}+07"


def _cumulative(weights: Sequence[int]) -> list[float]:
    return [float(w) for w in itertools.accumulate(weights)]


_REGION_CUM = _cumulative([r.weight for r in REGIONS])
_PRODUCT_NAMES = tuple(p for p, _ in _PRODUCTS)
_PRODUCT_CUM = _cumulative([w for _, w in _PRODUCTS])
_STATUS_NAMES = tuple(s for s, _ in _STATUSES)
_STATUS_CUM = _cumulative([w for _, w in _STATUSES])
_TXN_KINDS = ("setor", "tarik", "transfer_masuk", "transfer_keluar", "pembayaran", "pembayaran")


def _ddmmyy(day: int, when: date) -> str:
    return f"{day:02d}{when.month:02d}{when.year % 100:02d}"


def _generate(customers: int, seed: int) -> _Tables:
    dice = _Dice(seed)
    rnd = dice.random
    cust: list[str] = []
    acct: list[str] = []
    txn: list[str] = []
    nik_serials: dict[str, int] = {}
    kk_serials: dict[str, int] = {}
    birth_lo = date(1950, 1, 1).toordinal()
    birth_hi = date(2006, 12, 31).toordinal()
    kk_floor = date(2005, 1, 1).toordinal()
    customer_floor = date(2010, 1, 1).toordinal()
    epoch = _EPOCH_DATE.toordinal()
    account_id = 0
    txn_id = 0
    for cid in range(1, customers + 1):
        region = dice.weighted(REGIONS, _REGION_CUM)
        district = f"{region.code}{dice.between(1, region.districts):02d}"
        gender = "L" if rnd() < 0.5 else "P"
        birth = date.fromordinal(dice.between(birth_lo, birth_hi))
        # NIK and KK: region, DDMMYY, then the next free serial for that prefix (as make_nik)
        prefix = district + _ddmmyy(birth.day + (40 if gender == "P" else 0), birth)
        serial = nik_serials[prefix] = nik_serials.get(prefix, 0) + 1
        nik = f"{prefix}{serial:04d}"
        adult = birth.toordinal() + 17 * 365 + 5
        issued = date.fromordinal(dice.between(max(adult, kk_floor), epoch - 30))
        prefix = district + _ddmmyy(issued.day, issued)
        serial = kk_serials[prefix] = kk_serials.get(prefix, 0) + 1
        no_kk = f"{prefix}{serial:04d}"
        name = _name(dice, gender, region.province)
        mother = _mother_name(dice, region.province)
        created = dice.between(max(adult, customer_floor), epoch - 1)
        phone = _phone(dice) if rnd() < 0.97 else "\\N"
        email = _email(dice, name, birth) if rnd() < 0.85 else "\\N"
        address = (
            f"Jl. {dice.pick(_STREETS)} No. {dice.between(1, 250)}, "
            f"RT {dice.between(1, 15):03d}/RW {dice.between(1, 12):03d}"
        )
        cust.append(
            f"{cid}\t{_copy_text(name)}\t{nik}\t{no_kk}\t{_copy_text(mother)}"
            f"\t{birth.isoformat()}\t{gender}\t{_income(dice)}\t{phone}\t{email}\t{address}"
            f"\t{region.city}\t{region.province}"
            f"\t{_timestamp(dice, date.fromordinal(created))}\n"
        )
        n_accounts = 1 if rnd() < 0.6 else (2 if rnd() < 0.75 else 3)
        for _ in range(n_accounts):
            account_id += 1
            opened = dice.between(created, epoch)
            product = dice.weighted(_PRODUCT_NAMES, _PRODUCT_CUM)
            status = dice.weighted(_STATUS_NAMES, _STATUS_CUM)
            scale = 200_000_000.0 if product in ("Deposito", "Giro") else 15_000_000.0
            balance = 0.0 if status == "ditutup" else dice.exponential(scale)
            number = f"{dice.between(100, 998)}{account_id:07d}"
            acct.append(
                f"{account_id}\t{cid}\t{number}\t{product}\t{balance:.2f}"
                f"\t{date.fromordinal(opened).isoformat()}\t{status}\n"
            )
            for _ in range(dice.below(5) if status == "aktif" else 0):
                txn_id += 1
                day = date.fromordinal(dice.between(opened, epoch))
                kind = dice.pick(_TXN_KINDS)
                if kind == "setor":
                    amount, what = dice.between(100, 19_999) * 1000, "Setoran tunai"
                elif kind == "tarik":
                    amount = -dice.between(1, 49) * 100_000
                    what = f"Tarik tunai ATM {region.city}"
                elif kind == "transfer_masuk":
                    amount = dice.between(50, 29_999) * 1000
                    what = f"Transfer dari {_name(dice, dice.pick('LP'), region.province).upper()}"
                elif kind == "transfer_keluar":
                    amount = -dice.between(10, 9_999) * 1000
                    what = f"Transfer ke {_name(dice, dice.pick('LP'), region.province).upper()}"
                else:
                    amount = -dice.between(10, 1_999) * 1000
                    what = f"Pembayaran {dice.pick(_MERCHANTS)}"
                txn.append(
                    f"{txn_id}\t{account_id}\t{amount}.00\t{kind}\t{_copy_text(what)}"
                    f"\t{_timestamp(dice, day)}\n"
                )
    return _Tables(
        customers=io.BytesIO("".join(cust).encode()),
        accounts=io.BytesIO("".join(acct).encode()),
        transactions=io.BytesIO("".join(txn).encode()),
        counts={"customers": customers, "accounts": account_id, "transactions": txn_id},
    )


# -- loading -----------------------------------------------------------------------------------

_SCHEMA = """
DROP SCHEMA IF EXISTS bank CASCADE;
CREATE SCHEMA bank;
CREATE TABLE bank.customers (
    id bigint NOT NULL,
    full_name text NOT NULL,
    nik char(16) NOT NULL,
    no_kk char(16) NOT NULL,
    nama_ibu_kandung text NOT NULL,
    birth_date date NOT NULL,
    gender char(1) NOT NULL CHECK (gender IN ('L', 'P')),
    penghasilan numeric(15,2) NOT NULL,
    no_hp text,
    email text,
    address text,
    city text,
    province text,
    created_at timestamptz NOT NULL
);
CREATE TABLE bank.accounts (
    id bigint NOT NULL,
    customer_id bigint,
    account_number varchar(16),
    product text,
    balance numeric(15,2),
    opened_at date,
    status text
);
CREATE TABLE bank.transactions (
    id bigint NOT NULL,
    account_id bigint,
    amount numeric(15,2),
    kind text,
    description text,
    created_at timestamptz
);
COMMENT ON TABLE bank.customers IS 'Sample customers (generated by topeng, not real people)';
"""

_CONSTRAINTS = """
ALTER TABLE bank.customers ADD PRIMARY KEY (id), ADD CONSTRAINT customers_nik_key UNIQUE (nik);
ALTER TABLE bank.accounts ADD PRIMARY KEY (id),
    ADD CONSTRAINT accounts_account_number_key UNIQUE (account_number),
    ADD CONSTRAINT accounts_customer_id_fkey FOREIGN KEY (customer_id)
        REFERENCES bank.customers (id);
ALTER TABLE bank.transactions ADD PRIMARY KEY (id),
    ADD CONSTRAINT transactions_account_id_fkey FOREIGN KEY (account_id)
        REFERENCES bank.accounts (id);
CREATE INDEX accounts_customer_id_idx ON bank.accounts (customer_id);
CREATE INDEX transactions_account_id_idx ON bank.transactions (account_id);
"""

_COLUMNS: dict[str, Sequence[str]] = {
    "customers": ("id", "full_name", "nik", "no_kk", "nama_ibu_kandung", "birth_date", "gender",
                  "penghasilan", "no_hp", "email", "address", "city", "province", "created_at"),
    "accounts": ("id", "customer_id", "account_number", "product", "balance", "opened_at",
                 "status"),
    "transactions": ("id", "account_id", "amount", "kind", "description", "created_at"),
}  # fmt: skip


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _users_sql() -> str:
    """Roles are cluster-wide: create them if missing, (re)set passwords, grant on this db."""
    stmts = [
        "SET password_encryption = 'scram-sha-256'",
        "DO $$ BEGIN "
        "IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'supervisors') "
        "THEN CREATE ROLE supervisors NOLOGIN; END IF; "
        "IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'agents') "
        "THEN CREATE ROLE agents NOLOGIN; END IF; END $$",
    ]
    for user, password in DEMO_USERS.items():
        stmts.append(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_literal(user)}) "
            f"THEN CREATE ROLE {_ident(user)} LOGIN; END IF; END $$"
        )
        stmts.append(f"ALTER ROLE {_ident(user)} LOGIN PASSWORD {_literal(password)}")
    stmts += [
        "GRANT supervisors TO spv_budi",
        "GRANT agents TO agent_citra",
        "GRANT USAGE ON SCHEMA bank TO supervisors, agents, dba_ani, ai_helper",
        "GRANT SELECT ON ALL TABLES IN SCHEMA bank TO supervisors, agents, ai_helper",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA bank TO dba_ani",
    ]
    return ";\n".join(stmts) + ";\n"


async def load_sample(
    dsn: str, *, customers: int = 100_000, seed: int = DEFAULT_SEED
) -> dict[str, int]:
    """(Re)create schema `bank` in the database of `dsn` (a superuser DSN) and fill it.

    Also creates the NOLOGIN groups `supervisors` and `agents` and the `DEMO_USERS`, and sets
    the database's search_path to `bank, public`. Returns the row count of each table.
    """
    if customers < 1:
        raise ValueError("customers must be at least 1")
    # generating 100,000 customers takes seconds of CPU: keep the event loop responsive
    tables = await asyncio.get_running_loop().run_in_executor(None, _generate, customers, seed)
    return await _load(dsn, tables)


def load_sample_sync(
    dsn: str, *, customers: int = 100_000, seed: int = DEFAULT_SEED
) -> dict[str, int]:
    """`load_sample` for synchronous callers.

    Generates in the calling thread (so Ctrl-C interrupts it at once); loads with a private
    event loop, in a helper thread if this thread already runs one.
    """
    if customers < 1:
        raise ValueError("customers must be at least 1")
    tables = _generate(customers, seed)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_load(dsn, tables))
    result: list[dict[str, int]] = []
    errors: list[BaseException] = []

    def runner() -> None:
        try:
            result.append(asyncio.run(_load(dsn, tables)))
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)

    thread = threading.Thread(target=runner, name="topeng-load-sample")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


async def _load(dsn: str, tables: _Tables) -> dict[str, int]:
    import asyncpg

    conn: Any = await asyncpg.connect(dsn)
    try:
        await conn.execute(_SCHEMA)
        for table in ("customers", "accounts", "transactions"):
            buffer: io.BytesIO = getattr(tables, table)
            await conn.copy_to_table(
                table, schema_name="bank", source=buffer, columns=_COLUMNS[table], format="text"
            )
        await conn.execute(_CONSTRAINTS)
        await conn.execute(_users_sql())
        database: str = await conn.fetchval("SELECT current_database()")
        await conn.execute(f"ALTER DATABASE {_ident(database)} SET search_path TO bank, public")
        await conn.execute("ANALYZE bank.customers, bank.accounts, bank.transactions")
    finally:
        await conn.close()
    return tables.counts
