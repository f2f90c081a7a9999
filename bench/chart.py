"""A PNG bar chart of Topeng's ratios, drawn with zlib and struct alone.

No plotting library is a dependency of Topeng, and the bench should not install one: the chart
is simple enough to draw by hand. A canvas of RGB pixels, filled rectangles and a 5x7 bitmap
font (upper case, digits, a little punctuation) are all it takes.

Per measure two horizontal bars: Topeng / pgbouncer (blue) and Topeng / direct (grey), the
median over rounds, a dark tick for each round, a black line at the target where the measure
has one, and the value with MET / NOT MET (green / red) to the right of the bar.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Bar", "Canvas", "bar_chart", "png"]

Color = tuple[int, int, int]

WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GRID: Color = (225, 225, 225)
AXIS: Color = (90, 90, 90)
BLUE: Color = (66, 120, 190)
GREY: Color = (160, 160, 160)
TICK: Color = (30, 30, 60)
GREEN: Color = (20, 140, 60)
RED: Color = (200, 30, 30)

_GLYPHS: dict[str, tuple[str, ...]] = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    " ": (".....",) * 7,
    ".": (".....", ".....", ".....", ".....", ".....", ".##..", ".##.."),
    ",": (".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."),
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    "/": (".....", "....#", "...#.", "..#..", ".#...", "#....", "....."),
    ":": (".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."),
    "(": ("...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."),
    ")": (".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."),
    ">": (".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#..."),
    "<": ("...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#."),
    "=": (".....", ".....", "#####", ".....", "#####", ".....", "....."),
    "%": ("##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"),
    "+": (".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."),
    "_": (".....", ".....", ".....", ".....", ".....", ".....", "#####"),
    "?": (".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."),
}
GLYPH_W, GLYPH_H = 5, 7


class Canvas:
    """RGB pixels, white to start with; drawing outside the canvas is clipped."""

    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def rect(self, x: int, y: int, w: int, h: int, color: Color) -> None:
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        if x0 >= x1 or y0 >= y1:
            return
        run = bytes(color) * (x1 - x0)
        for row in range(y0, y1):
            start = (row * self.width + x0) * 3
            self.pixels[start : start + len(run)] = run

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 2) -> int:
        """Draw `text` with its top-left corner at (x, y); returns the x after it."""
        for char in text.upper():
            glyph = _GLYPHS.get(char, _GLYPHS["?"])
            for gy, line in enumerate(glyph):
                for gx, bit in enumerate(line):
                    if bit == "#":
                        self.rect(x + gx * scale, y + gy * scale, scale, scale, color)
            x += (GLYPH_W + 1) * scale
        return x

    @staticmethod
    def text_width(text: str, scale: int = 2) -> int:
        return len(text) * (GLYPH_W + 1) * scale

    def png(self) -> bytes:
        return png(self.width, self.height, bytes(self.pixels))


def png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG of `rgb` (rows top to bottom, 3 bytes a pixel)."""
    if len(rgb) != width * height * 3:
        raise ValueError("pixel data does not match the size")
    stride = width * 3
    raw = b"".join(b"\x00" + rgb[r * stride : (r + 1) * stride] for r in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


@dataclass(frozen=True, slots=True)
class Bar:
    """One measure: its two median ratios, their rounds, and the target if it has one."""

    label: str
    vs_pgbouncer: float
    vs_direct: float
    rounds_pgbouncer: tuple[float, ...] = ()
    rounds_direct: tuple[float, ...] = ()
    target_baseline: str = ""  # "pgbouncer" | "direct" | ""
    target: float = math.nan


_LEFT = 16
_LABEL_W = 300
_PLOT_W = 560
_RIGHT_W = 190
_ROW_H = 46
_BAR_H = 14
_TOP = 70


def bar_chart(bars: Sequence[Bar], title: str, subtitle: str = "") -> bytes:
    """The PNG of the chart described in the module docstring."""
    values = [v for b in bars for v in (b.vs_pgbouncer, b.vs_direct, b.target) if _finite(v)]
    values += [v for b in bars for v in (*b.rounds_pgbouncer, *b.rounds_direct) if _finite(v)]
    top = max([1.25, *values]) * 1.05
    step = 0.25 if top <= 2.5 else 0.5 if top <= 5 else 1.0
    xmax = math.ceil(top / step) * step
    width = _LEFT + _LABEL_W + _PLOT_W + _RIGHT_W
    height = _TOP + _ROW_H * len(bars) + 80
    canvas = Canvas(width, height)
    x0 = _LEFT + _LABEL_W

    def x_of(value: float) -> int:
        return x0 + round(min(max(value, 0.0), xmax) / xmax * _PLOT_W)

    canvas.text(_LEFT, 12, title, BLACK, 3)
    if subtitle:
        canvas.text(_LEFT, 42, subtitle, AXIS, 2)
    plot_top, plot_bottom = _TOP, _TOP + _ROW_H * len(bars)
    ticks = int(round(xmax / step))
    for i in range(ticks + 1):
        value = i * step
        x = x_of(value)
        canvas.rect(x, plot_top, 1, plot_bottom - plot_top, AXIS if value == 1.0 else GRID)
        label = f"{value:g}"
        canvas.text(x - Canvas.text_width(label) // 2, plot_bottom + 6, label, AXIS)
    canvas.rect(x0, plot_top, 1, plot_bottom - plot_top, AXIS)
    for n, bar in enumerate(bars):
        y = plot_top + n * _ROW_H + 6
        canvas.text(_LEFT, y + _BAR_H - 6, bar.label[:24], BLACK)
        for k, (value, rounds, baseline, color) in enumerate(
            (
                (bar.vs_pgbouncer, bar.rounds_pgbouncer, "pgbouncer", BLUE),
                (bar.vs_direct, bar.rounds_direct, "direct", GREY),
            )
        ):
            by = y + k * (_BAR_H + 2)
            if _finite(value):
                canvas.rect(x0, by, x_of(value) - x0, _BAR_H, color)
            for r in rounds:
                if _finite(r):
                    canvas.rect(x_of(r) - 1, by + 3, 2, _BAR_H - 6, TICK)
            judged = bar.target_baseline == baseline and _finite(bar.target)
            if judged:
                canvas.rect(x_of(bar.target) - 1, by - 3, 3, _BAR_H + 6, BLACK)
            text = f"{value:.2f}" if _finite(value) else "-"
            verdict_color = AXIS
            if judged and _finite(value):
                met = value >= bar.target
                text += " MET" if met else " NOT MET"
                verdict_color = GREEN if met else RED
            canvas.text(x0 + _PLOT_W + 12, by, text, verdict_color)
    ly = plot_bottom + 34
    x = _LEFT
    for color, name in ((BLUE, "TOPENG / PGBOUNCER"), (GREY, "TOPENG / DIRECT")):
        canvas.rect(x, ly, 24, _BAR_H, color)
        x = canvas.text(x + 32, ly, name, BLACK) + 24
    canvas.rect(x + 10, ly - 3, 3, _BAR_H + 6, BLACK)
    x = canvas.text(x + 24, ly, "TARGET", BLACK) + 24
    canvas.rect(x + 10, ly + 3, 2, _BAR_H - 6, TICK)
    canvas.text(x + 24, ly, "EACH ROUND (MEDIAN = BAR)", BLACK)
    return canvas.png()


def _finite(value: float) -> bool:
    return not math.isnan(value) and not math.isinf(value)
