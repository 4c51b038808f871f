"""Hand-written SVG charts for nslab's reports: horizontal bars with a spread, nothing else.

No plotting library: a report must open in any browser, offline, and nslab depends only on
cffi, pyroute2 and psutil. One function, :func:`bar_chart`, draws one bar per row, labelled
on the left, with an optional whisker for the spread (min..max over rounds), a marker for a
second statistic (a p99, say), and a note at the end of the bar (a ratio)::

    >>> svg = bar_chart("Round-trip latency (p50)", "µs", [
    ...     {"label": "loopback", "value": 39.0, "low": 37.2, "high": 41.0, "note": "×1.00"},
    ...     {"label": "bridge", "value": 64.0, "low": 50.1, "high": 70.3, "note": "×1.62",
    ...      "marker": 130.0, "marker_label": "p99"},
    ... ])
    >>> svg.startswith("<svg")
    True

Every text is escaped; sizes are computed from the data; the axis has "nice" round ticks.
"""
from __future__ import annotations

import math
from html import escape

__all__ = ["bar_chart", "nice_ticks"]

_PALETTE = ("#4c78a8", "#72b7b2", "#f58518", "#e45756", "#54a24b", "#b279a2", "#9d755d")


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``top`` (1, 2 or 5 times a power of ten apart)."""
    if not math.isfinite(top) or top <= 0:
        return [0.0, 1.0]
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    n = math.ceil(round(top / step, 9))
    return [round(i * step, 10) for i in range(max(1, n) + 1)]


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def bar_chart(title: str, unit: str, bars: list[dict], *, width: int = 720, bar_height: int = 22,
              label_width: int = 150, note_width: int = 170) -> str:
    """An SVG document: one horizontal bar per item of ``bars``.

    Each item: ``label`` and ``value`` (required); ``low``/``high`` (a whisker), ``marker``
    (a tick, e.g. p99) with ``marker_label``, ``note`` (text after the bar), ``color``.
    Items whose value is None are drawn as "not measured" with their ``note``.
    """
    gap = 10
    top_pad, bottom_pad = 34, 34
    plot_x = label_width
    plot_w = max(100, width - label_width - note_width)
    height = top_pad + len(bars) * (bar_height + gap) + bottom_pad
    values = [v for b in bars for v in (b.get("value"), b.get("high"), b.get("marker"))
              if isinstance(v, (int, float)) and math.isfinite(v)]
    ticks = nice_ticks(max(values) if values else 1.0)
    scale = plot_w / ticks[-1] if ticks[-1] else 1.0

    def x(v: float) -> float:
        return plot_x + max(0.0, v) * scale

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12" role="img" '
           f'aria-label="{escape(title)}">',
           f'<title>{escape(title)}</title>',
           f'<text x="8" y="18" font-size="14" font-weight="bold">{escape(title)}</text>']
    axis_y = top_pad + len(bars) * (bar_height + gap)
    integral = all(float(t).is_integer() for t in ticks)
    for t in ticks:
        tx = x(t)
        out.append(f'<line x1="{tx:.1f}" y1="{top_pad - 6}" x2="{tx:.1f}" y2="{axis_y}" stroke="#ddd"/>')
        out.append(f'<text x="{tx:.1f}" y="{axis_y + 14}" text-anchor="middle" fill="#555">{int(t) if integral else _fmt(t)}</text>')
    out.append(f'<text x="{plot_x + plot_w / 2:.1f}" y="{axis_y + 30}" text-anchor="middle" '
               f'fill="#333">{escape(unit)}</text>')
    for n, bar in enumerate(bars):
        y = top_pad + n * (bar_height + gap)
        mid = y + bar_height / 2
        color = bar.get("color") or _PALETTE[n % len(_PALETTE)]
        out.append(f'<text x="{plot_x - 8}" y="{mid + 4:.1f}" text-anchor="end">{escape(str(bar["label"]))}</text>')
        value = bar.get("value")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            out.append(f'<text x="{plot_x + 4}" y="{mid + 4:.1f}" fill="#b00">'
                       f'{escape(bar.get("note") or "not measured")}</text>')
            continue
        out.append(f'<rect x="{plot_x}" y="{y}" width="{max(1.0, x(value) - plot_x):.1f}" height="{bar_height}" '
                   f'fill="{color}"><title>{escape(str(bar["label"]))}: {_fmt(value)} {escape(unit)}</title></rect>')
        low, high = bar.get("low"), bar.get("high")
        if isinstance(low, (int, float)) and isinstance(high, (int, float)):
            out.append(f'<line x1="{x(low):.1f}" y1="{mid:.1f}" x2="{x(high):.1f}" y2="{mid:.1f}" '
                       f'stroke="#222" stroke-width="1.5"/>')
            for end in (low, high):
                out.append(f'<line x1="{x(end):.1f}" y1="{mid - 5:.1f}" x2="{x(end):.1f}" y2="{mid + 5:.1f}" '
                           f'stroke="#222" stroke-width="1.5"/>')
        marker = bar.get("marker")
        if isinstance(marker, (int, float)) and math.isfinite(marker):
            mx = x(marker)
            out.append(f'<path d="M{mx:.1f},{y - 1} l-4,-6 h8 z" fill="#222"><title>'
                       f'{escape(bar.get("marker_label", ""))} {_fmt(marker)} {escape(unit)}</title></path>')
        note = bar.get("note")
        end_x = max(x(value), x(high) if isinstance(high, (int, float)) else 0, x(marker)
                    if isinstance(marker, (int, float)) else 0)
        if note:
            out.append(f'<text x="{end_x + 6:.1f}" y="{mid + 4:.1f}" fill="#333">{escape(note)}</text>')
    out.append("</svg>")
    return "\n".join(out)
