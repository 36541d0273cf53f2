"""The status page as HTML: server-rendered, inline CSS and SVG, every value escaped.

No template engine and no front-end build: the page is a few tables, a row of counters and a
chart drawn as an SVG polyline from the monitor's samples. It works without JavaScript; the one
inline script only reloads the page every `REFRESH_SECONDS` while its checkbox is ticked.
Every string that comes from a client (`clientInfo`, User-Agent) goes through `html.escape`,
and ids arrive here already shortened (see `monitor.py`).
"""

from __future__ import annotations

import base64
import hashlib
import html
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from .monitor import HISTORY_SECONDS, ClosedEntry, Sample, SessionEntry
from .status import StatusPage

REFRESH_SECONDS = 10
CHART_WIDTH = 640
CHART_HEIGHT = 140
CHART_PAD = 30

T = TypeVar("T")

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2430;background:#f4f6f9}
header{background:#1d2430;color:#fff;padding:10px 20px;display:flex;gap:16px;align-items:center}
header h1{font-size:18px;margin:0}
header .grow{flex:1}
main{padding:12px 20px;display:grid;gap:14px;
grid-template-columns:repeat(auto-fit,minmax(560px,1fr))}
section{background:#fff;border:1px solid #d9dee7;border-radius:6px;padding:10px 14px}
section.wide{grid-column:1/-1}
h2{font-size:15px;margin:0 0 8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eef0f4;vertical-align:top}
th{font-weight:600;color:#4a5466}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
code,pre{font:12px ui-monospace,monospace}
pre{white-space:pre-wrap;margin:0 0 4px}
.tiles{display:flex;gap:10px;flex-wrap:wrap}
.tile{border:1px solid #d9dee7;border-radius:6px;padding:6px 14px;min-width:80px}
.tile b{display:block;font-size:22px}
.ok{color:#0a7d32}.bad{color:#b3261e}.muted{color:#6b7587}
.badge{padding:2px 8px;border-radius:10px;background:#0a7d32;color:#fff}
.badge.bad{background:#b3261e;color:#fff}
svg .live{fill:none;stroke:#2563eb;stroke-width:2}
svg .dormant{fill:none;stroke:#9333ea;stroke-width:1.5;stroke-dasharray:4 3}
svg text{font-size:11px;fill:#6b7587}
svg .axis{stroke:#c5ccd8}
"""

SCRIPT = f"""
(function(){{
  var box=document.getElementById('refresh');
  box.checked=localStorage.getItem('mcp-sidecar-refresh')!=='off';
  box.addEventListener('change',function(){{
    localStorage.setItem('mcp-sidecar-refresh',box.checked?'on':'off');
  }});
  setInterval(function(){{if(box.checked)location.reload();}},{REFRESH_SECONDS * 1000});
  document.documentElement.setAttribute('data-refresh','armed');
}})();
"""


# The page's security headers: nothing is loaded from elsewhere, nothing may frame it, and
# only the page's own script (by its hash) may run, so a string that escaped escaping could
# still not execute.
SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{SCRIPT_HASH}'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def render(page: StatusPage) -> str:
    ready = (
        '<span class="badge">ready</span>'
        if page.ready
        else ('<span class="badge bad">not ready</span>')
    )
    sections = [
        _section("What it enforces", _enforces(page.enforces), wide=True),
        _section("Sessions", _tiles(page) + _chart(page.history, page.now), wide=True),
        _section("Longest idle", _sessions_table(page.longest_idle, "no idle session")),
        _section("Busiest", _sessions_table(page.busiest, "no live session")),
        _section("Live sessions by client identity", _by_client(page.by_client)),
        _section("Stuck clients (requests on closed ids)", _stuck(page)),
        _section("Upstreams", _upstreams(page)),
        _section("Recent closes", _closes(page.recent_closes)),
    ]
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>mcp-sidecar status</title><style>{STYLE}</style></head><body>"
        f"<header><h1>mcp-sidecar {e(page.version)}</h1>{ready}"
        f'<span class="grow"></span><span>{e(_clock(page.now))} UTC</span>'
        "<label><input type=checkbox id=refresh checked> "
        f"refresh every {REFRESH_SECONDS}s</label></header>"
        f"<main>{''.join(sections)}</main><script>{SCRIPT}</script></body></html>\n"
    )


def _section(title: str, body: str, *, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    slug = title.partition(" (")[0].lower().replace(" ", "-")
    return f'<section id="{e(slug)}"{cls}><h2>{e(title)}</h2>{body}</section>'


def _enforces(lines: Iterable[str]) -> str:
    return "".join(f"<pre>{e(line)}</pre>" for line in lines)


def _tiles(page: StatusPage) -> str:
    c = page.counts
    tiles = [
        ("live", c.live),
        ("active", c.active),
        ("idle", c.idle),
        ("dormant", c.dormant),
        ("persistent", c.persistent),
        ("closed, remembered", c.closed_remembered),
    ]
    return (
        '<div class="tiles">'
        + "".join(
            f'<div class="tile" id="count-{e(name.split(",")[0])}"><b>{value}</b>{e(name)}</div>'
            for name, value in tiles
        )
        + "</div>"
    )


def _table(
    headers: Sequence[str], rows: Iterable[T], cells: Callable[[T], Sequence[str]], empty: str
) -> str:
    """A table; header names ending in '#' are right-aligned numbers. Cells come escaped."""
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{cell}</td>' if head.endswith("#") else f"<td>{cell}</td>"
            for head, cell in zip(headers, cells(row), strict=True)
        )
        + "</tr>"
        for row in rows
    )
    if not body:
        return f'<p class="muted">{e(empty)}</p>'
    head = "".join(
        f'<th class="n">{e(h.rstrip("#"))}</th>' if h.endswith("#") else f"<th>{e(h)}</th>"
        for h in headers
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _sessions_table(entries: Sequence[SessionEntry], empty: str) -> str:
    return _table(
        ("id", "client", "User-Agent", "transport", "idle#", "age#", "requests#"),
        entries,
        lambda s: (
            f"<code>{e(s.short_id)}</code>"
            + (' <span class="muted">persistent</span>' if s.persistent else ""),
            e(s.client_info or "-"),
            e(s.user_agent or "-"),
            e(s.transport),
            "busy" if s.in_flight else e(duration(s.idle_seconds)),
            e(duration(s.age_seconds)),
            e(s.requests),
        ),
        empty,
    )


def _by_client(rows: Sequence[tuple[str, int]]) -> str:
    return _table(
        ("identity", "live sessions#"),
        rows,
        lambda row: (f"<code>{e(row[0])}</code>", e(row[1])),
        "no live session",
    )


def _stuck(page: StatusPage) -> str:
    return _table(
        ("client", "requests#", "closed ids#", "last seen"),
        page.stuck,
        lambda row: (
            e(row.client),
            e(row.requests),
            e(row.sessions),
            e(duration(page.now - row.last_seen) + " ago"),
        ),
        "none: every client re-initializes after a 404",
    )


def _upstreams(page: StatusPage) -> str:
    table = _table(
        ("name", "url", "live sessions#", "health"),
        page.upstreams,
        lambda row: (e(row.name), f"<code>{e(row.url)}</code>", e(row.sessions), e(row.health)),
        "no upstream",
    )
    return table + f'<p class="muted">upstream closes (DELETE) owed: {page.closes_owed}</p>'


def _closes(entries: Sequence[ClosedEntry]) -> str:
    return _table(
        ("when", "id", "reason", "client", "idle#", "lived#", "requests#"),
        entries,
        lambda c: (
            e(_clock(c.closed_at)),
            f"<code>{e(c.short_id)}</code>",
            e(c.reason),
            e(c.client),
            e(duration(c.idle_seconds)),
            e(duration(c.lived_seconds)),
            e(c.requests),
        ),
        "no session closed since start",
    )


def _chart(samples: Sequence[Sample], now: float) -> str:
    """Live (solid) and dormant (dashed) sessions over the last hour, as inline SVG."""
    start = now - HISTORY_SECONDS
    shown = [s for s in samples if s.at >= start]
    top = max([1, *(max(s.live, s.dormant) for s in shown)])
    inner_w = CHART_WIDTH - 2 * CHART_PAD
    inner_h = CHART_HEIGHT - 2 * CHART_PAD

    def point(at: float, value: int) -> str:
        x = CHART_PAD + (at - start) / HISTORY_SECONDS * inner_w
        y = CHART_PAD + inner_h - value / top * inner_h
        return f"{x:.1f},{y:.1f}"

    lines = ""
    if shown:
        for cls in ("live", "dormant"):
            points = [point(s.at, getattr(s, cls)) for s in shown]
            if len(points) == 1:
                points.append(point(now, getattr(shown[0], cls)))
            lines += f'<polyline class="{cls}" points="{" ".join(points)}"/>'
    else:
        lines = f'<text x="{CHART_PAD + 10}" y="{CHART_HEIGHT // 2}">no samples yet</text>'
    bottom = CHART_PAD + inner_h
    return (
        f'<svg id="live-chart" role="img" width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
        f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" xmlns="http://www.w3.org/2000/svg">'
        "<title>live and dormant sessions, last hour</title>"
        f'<line class="axis" x1="{CHART_PAD}" y1="{bottom}" x2="{CHART_WIDTH - CHART_PAD}" '
        f'y2="{bottom}"/><line class="axis" x1="{CHART_PAD}" y1="{CHART_PAD}" '
        f'x2="{CHART_PAD}" y2="{bottom}"/>'
        f'<text x="2" y="{CHART_PAD + 4}">{top}</text><text x="2" y="{bottom}">0</text>'
        f'<text x="{CHART_PAD}" y="{CHART_HEIGHT - 8}">-60 min</text>'
        f'<text x="{CHART_WIDTH - CHART_PAD - 20}" y="{CHART_HEIGHT - 8}">now</text>'
        f'<text x="{CHART_WIDTH - 200}" y="16">— live   - - dormant</text>'
        f"{lines}</svg>"
    )


def duration(seconds: float) -> str:
    """3s, 4m 05s, 2h 10m, 3d 4h: two units at most, for a glance."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _clock(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))
