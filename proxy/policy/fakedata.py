"""Deterministic, realistic Indonesian fake data for the `fake` mask.

Strategy: every generator takes a digest (the keyed HMAC of the real value, computed by the
mask) and reads its choices from it, so the same real value always gets the same fake one
(joins and GROUP BY on a faked column still line up) while nothing of the real value shows.
Choices come from fixed word lists that look like the people, streets and cities of
Indonesia. `fake(kind, digest, max_chars)` respects a column's length limit: it first tries
shorter variants (no house number, one name instead of two) and cuts only as a last resort.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Final

__all__ = ["FAKE_KINDS", "fake"]

FAKE_KINDS: Final = ("name", "address", "city", "phone", "email")

_GIVEN: Final = (
    "Agus",
    "Budi",
    "Dedi",
    "Eko",
    "Fajar",
    "Hendra",
    "Irfan",
    "Joko",
    "Rizky",
    "Slamet",
    "Taufik",
    "Wahyu",
    "Yusuf",
    "Bambang",
    "Arif",
    "Dimas",
    "Gilang",
    "Hadi",
    "Putra",
    "Rudi",
    "Andi",
    "Bayu",
    "Iwan",
    "Reza",
    "Sigit",
    "Teguh",
    "Anton",
    "Yoga",
    "Rahmat",
    "Heru",
    "Siti",
    "Sri",
    "Dewi",
    "Ayu",
    "Indah",
    "Lestari",
    "Rina",
    "Wulan",
    "Fitri",
    "Nur",
    "Putri",
    "Ratna",
    "Yuni",
    "Intan",
    "Mega",
    "Novi",
    "Rahmawati",
    "Sari",
    "Tika",
    "Anisa",
    "Dian",
    "Eka",
    "Kartika",
    "Maya",
    "Nadia",
    "Rini",
    "Suci",
    "Wati",
    "Yanti",
    "Lina",
)
_FAMILY: Final = (
    "Santoso",
    "Wijaya",
    "Saputra",
    "Hidayat",
    "Kurniawan",
    "Setiawan",
    "Pratama",
    "Nugroho",
    "Susanto",
    "Gunawan",
    "Siregar",
    "Nasution",
    "Harahap",
    "Simanjuntak",
    "Sinaga",
    "Lubis",
    "Hutapea",
    "Tanjung",
    "Wibowo",
    "Purnomo",
    "Permana",
    "Suryadi",
    "Rahman",
    "Hakim",
    "Halim",
    "Sutanto",
    "Kusuma",
    "Firmansyah",
    "Ramadhan",
    "Syahputra",
    "Lestari",
    "Utami",
    "Rahayu",
    "Handayani",
    "Wahyuni",
    "Safitri",
    "Puspita",
    "Maharani",
    "Anggraini",
    "Sembiring",
)
_STREETS: Final = (
    "Sudirman",
    "Thamrin",
    "Gatot Subroto",
    "Diponegoro",
    "Ahmad Yani",
    "Merdeka",
    "Pahlawan",
    "Gajah Mada",
    "Hayam Wuruk",
    "Imam Bonjol",
    "Pemuda",
    "Veteran",
    "Kartini",
    "Cendrawasih",
    "Melati",
    "Mawar",
    "Kenanga",
    "Anggrek",
    "Flamboyan",
    "Siliwangi",
    "Pattimura",
    "Teuku Umar",
    "Hasanuddin",
    "Sisingamangaraja",
    "Dr. Sutomo",
    "Raya Bogor",
    "Asia Afrika",
    "Braga",
    "Malioboro",
    "Pandanaran",
)
_CITIES: Final = (
    "Jakarta Selatan",
    "Jakarta Timur",
    "Jakarta Barat",
    "Bandung",
    "Surabaya",
    "Medan",
    "Semarang",
    "Makassar",
    "Palembang",
    "Tangerang",
    "Bekasi",
    "Depok",
    "Bogor",
    "Malang",
    "Yogyakarta",
    "Denpasar",
    "Padang",
    "Pekanbaru",
    "Balikpapan",
    "Pontianak",
    "Manado",
    "Banjarmasin",
    "Samarinda",
    "Cirebon",
    "Solo",
    "Batam",
    "Jambi",
    "Kupang",
    "Mataram",
    "Ambon",
)
_PHONE_PREFIXES: Final = (
    "811",
    "812",
    "813",
    "821",
    "822",
    "823",
    "852",
    "853",
    "851",
    "855",
    "856",
    "857",
    "858",
    "814",
    "815",
    "816",
    "817",
    "818",
    "819",
    "859",
    "877",
    "878",
    "831",
    "838",
    "881",
    "882",
    "895",
    "896",
    "897",
    "898",
)
_MAIL_DOMAINS: Final = (
    "gmail.com",
    "yahoo.co.id",
    "yahoo.com",
    "outlook.com",
    "hotmail.com",
    "ymail.com",
    "mail.com",
    "icloud.com",
)


class _Picker:
    """Reads choices from a digest, extending it with SHA-256 when it runs out."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, digest: bytes) -> None:
        self._buf = digest
        self._pos = 0

    def below(self, n: int) -> int:
        if self._pos + 4 > len(self._buf):
            self._buf += hashlib.sha256(self._buf).digest()
        v = int.from_bytes(self._buf[self._pos : self._pos + 4], "big")
        self._pos += 4
        return v % n

    def pick(self, seq: Sequence[str]) -> str:
        return seq[self.below(len(seq))]


def _name(p: _Picker) -> list[str]:
    given, family = p.pick(_GIVEN), p.pick(_FAMILY)
    return [f"{given} {family}", given]


def _address(p: _Picker) -> list[str]:
    street = p.pick(_STREETS)
    number, rt, rw = p.below(250) + 1, p.below(15) + 1, p.below(12) + 1
    return [
        f"Jl. {street} No. {number}, RT {rt:03d}/RW {rw:03d}",
        f"Jl. {street} No. {number}",
        f"Jl. {street}",
    ]


def _city(p: _Picker) -> list[str]:
    return [p.pick(_CITIES)]


def _phone(p: _Picker) -> list[str]:
    prefix = p.pick(_PHONE_PREFIXES)
    rest = "".join(str(p.below(10)) for _ in range(8))
    return [f"+62{prefix}{rest}", f"0{prefix}{rest}", f"0{prefix}{rest[:6]}"]


def _email(p: _Picker) -> list[str]:
    given, family = p.pick(_GIVEN).lower(), p.pick(_FAMILY).lower()
    number = p.below(1000)
    domain = p.pick(_MAIL_DOMAINS)
    return [
        f"{given}.{family}{number}@{domain}",
        f"{given}{number}@{domain}",
        f"{given[0]}{number}@{domain}",
    ]


_GENERATORS: Final[dict[str, Callable[[_Picker], list[str]]]] = {
    "name": _name,
    "address": _address,
    "city": _city,
    "phone": _phone,
    "email": _email,
}


def fake(kind: str, digest: bytes, max_chars: int | None = None) -> str:
    """A fake value of `kind` (one of FAKE_KINDS) chosen by `digest`, at most `max_chars` long.

    The first variant that fits is returned; if none fits, the shortest one cut to the limit.
    """
    variants = _GENERATORS[kind](_Picker(digest))
    if max_chars is None:
        return variants[0]
    for v in variants:
        if len(v) <= max_chars:
            return v
    return min(variants, key=len)[:max_chars]
