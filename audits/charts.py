"""Inline SVG charts for the compliance report: horizontal bars, stacked bars, a timeline.

Each function returns one ``<svg>`` element as a string, sized in CSS pixels, with a
``<title>`` and ``aria-label`` for screen readers and colours that read in print. Every
label is passed through :func:`html.escape` here, so callers may hand over entry values
as they are. No scripts, no external references, no fonts to load.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from html import escape

#: Colour-blind-safe palette (Okabe-Ito).
BLUE, ORANGE, GREEN, RED, PURPLE, GREY = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#999999")

Formatter = Callable[[float], str]


def fmt_int(v: float) -> str:
    return f"{round(v):,}"


def fmt_bytes(v: float) -> str:
    n = float(v)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n):,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"  # pragma: no cover


def _clip(label: str, n: int = 28) -> str:
    return label if len(label) <= n else label[: n - 1] + "\u2026"


def _open(width: int, height: int, title: str) -> str:
    t = escape(title)
    return (f'<svg class="chart" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{t}">'
            f"<title>{t}</title>")


def empty_chart(title: str, message: str = "no data in this period", width: int = 640) -> str:
    return (_open(width, 40, title) + f'<text x="8" y="24" class="muted">{escape(message)}'
            "</text></svg>")


def hbar_chart(
    rows: Sequence[tuple[str, float]],
    *,
    title: str,
    color: str = BLUE,
    fmt: Formatter = fmt_int,
    width: int = 640,
    max_rows: int = 25,
) -> str:
    """One bar per row (label, value), longest first as given."""
    rows = [r for r in rows if r[1] > 0][:max_rows]
    if not rows:
        return empty_chart(title, width=width)
    label_w, value_w, bar_h, gap = 190, 110, 18, 6
    plot_w = width - label_w - value_w
    top = max(v for _l, v in rows)
    height = len(rows) * (bar_h + gap) + gap
    out = [_open(width, height, title)]
    for i, (label, value) in enumerate(rows):
        y = gap + i * (bar_h + gap)
        w = max(1.0, plot_w * value / top)
        out.append(
            f'<text x="{label_w - 6}" y="{y + bar_h - 5}" text-anchor="end">'
            f"<title>{escape(label)}</title>{escape(_clip(label))}</text>"
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}">'
            f"<title>{escape(label)}: {escape(fmt(value))}</title></rect>"
            f'<text x="{label_w + w + 5:.1f}" y="{y + bar_h - 5}">{escape(fmt(value))}</text>')
    out.append("</svg>")
    return "".join(out)


def stacked_hbar_chart(
    rows: Sequence[tuple[str, dict[str, float]]],
    series: Sequence[tuple[str, str]],
    *,
    title: str,
    width: int = 640,
    max_rows: int = 25,
) -> str:
    """One stacked bar per row; ``series`` is (key, colour) in stacking order; a legend."""
    rows = [r for r in rows if sum(r[1].get(k, 0) for k, _c in series) > 0][:max_rows]
    if not rows:
        return empty_chart(title, width=width)
    label_w, value_w, bar_h, gap, legend_h = 190, 70, 18, 6, 24
    plot_w = width - label_w - value_w
    top = max(sum(v.get(k, 0) for k, _c in series) for _l, v in rows)
    height = legend_h + len(rows) * (bar_h + gap) + gap
    out = [_open(width, height, title)]
    x = label_w
    for key, colour in series:
        out.append(f'<rect x="{x}" y="6" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{x + 16}" y="16">{escape(key)}</text>')
        x += 24 + 8 * len(key)
    for i, (label, values) in enumerate(rows):
        y = legend_h + gap + i * (bar_h + gap)
        out.append(f'<text x="{label_w - 6}" y="{y + bar_h - 5}" text-anchor="end">'
                   f"<title>{escape(label)}</title>{escape(_clip(label))}</text>")
        x0 = float(label_w)
        total = 0.0
        for key, colour in series:
            v = values.get(key, 0)
            if v <= 0:
                continue
            w = plot_w * v / top
            out.append(f'<rect x="{x0:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                       f'fill="{colour}"><title>{escape(label)}: {escape(key)} '
                       f"{fmt_int(v)}</title></rect>")
            x0 += w
            total += v
        out.append(f'<text x="{x0 + 5:.1f}" y="{y + bar_h - 5}">{fmt_int(total)}</text>')
    out.append("</svg>")
    return "".join(out)


_BUCKETS: tuple[tuple[int, str], ...] = (
    (3_600_000, "hour"),
    (6 * 3_600_000, "6 hours"),
    (86_400_000, "day"),
    (7 * 86_400_000, "week"),
    (30 * 86_400_000, "30 days"),
)


def _utc(ms: int, with_time: bool) -> str:
    t = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return t.strftime("%Y-%m-%d %H:%M") if with_time else t.strftime("%Y-%m-%d")


def timeline_chart(
    times_ms: Sequence[int],
    *,
    title: str,
    start_ms: int | None = None,
    end_ms: int | None = None,
    width: int = 640,
    max_buckets: int = 60,
    color: str = BLUE,
) -> str:
    """Counts of events per time bucket (hour/day/week...) between start and end, UTC."""
    if not times_ms:
        return empty_chart(title, width=width)
    lo = min(times_ms) if start_ms is None else min(start_ms, min(times_ms))
    hi = max(times_ms) if end_ms is None else max(end_ms, max(times_ms) + 1)
    span = max(hi - lo, 1)
    size, unit = _BUCKETS[-1]
    for s, u in _BUCKETS:
        if span / s <= max_buckets:
            size, unit = s, u
            break
    first = lo - lo % size
    n = max(1, (hi - 1 - first) // size + 1)
    n = min(n, max_buckets * 4)
    counts = [0] * n
    for t in times_ms:
        i = (t - first) // size
        if 0 <= i < n:
            counts[i] += 1
    left, bottom, top_pad, height = 40, 34, 10, 170
    plot_w, plot_h = width - left - 10, height - bottom - top_pad
    peak = max(counts) or 1
    bw = plot_w / n
    out = [_open(width, height, f"{title} (per {unit}, UTC)")]
    out.append(f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{width - 10}" '
               f'y2="{top_pad + plot_h}" stroke="#555"/>')
    out.append(f'<text x="{left - 4}" y="{top_pad + 10}" text-anchor="end">{peak}</text>'
               f'<text x="{left - 4}" y="{top_pad + plot_h}" text-anchor="end">0</text>')
    with_time = size < 86_400_000
    for i, c in enumerate(counts):
        if c == 0:
            continue
        h = plot_h * c / peak
        x = left + i * bw
        out.append(f'<rect x="{x + 0.5:.1f}" y="{top_pad + plot_h - h:.1f}" '
                   f'width="{max(bw - 1, 1):.1f}" height="{h:.1f}" fill="{color}"><title>'
                   f"{escape(_utc(first + i * size, with_time))}: {c}</title></rect>")
    out.append(f'<text x="{left}" y="{height - 8}">{escape(_utc(first, with_time))}</text>'
               f'<text x="{width - 10}" y="{height - 8}" text-anchor="end">'
               f"{escape(_utc(first + n * size, with_time))}</text>"
               f'<text x="{left + plot_w / 2:.0f}" y="{height - 8}" text-anchor="middle" '
               f'class="muted">one bar per {unit}</text>')
    out.append("</svg>")
    return "".join(out)
