"""The dashboard: messages per day by action, findings by category, top blocked senders as
inline SVG (no script, nothing remote), and scanner health from the gateway's metrics."""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from milter.store import Store
from milter.web import charts, health
from milter.web.app import create_app
from tests.web.conftest import Held, signed_in

METRICS = """# HELP school_milter_dependency_up 1 when a dependency is usable
# TYPE school_milter_dependency_up gauge
school_milter_dependency_up{dependency="rules"} 1.0
school_milter_dependency_up{dependency="clamd"} 0.0
school_milter_dependency_up{dependency="postgres",host="db1"} 1
school_milter_messages_total{action="accept"} 12.0
"""


@pytest.fixture
def metrics_url() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = METRICS.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


def counts(store: Store) -> None:
    today = dt.datetime.now(dt.UTC).date()
    yesterday = today - dt.timedelta(days=1)
    store.add_counts(
        {
            (today, "accept", ""): 40,
            (today, "quarantine", ""): 6,
            (today, "reject", ""): 2,
            (today, "quarantine", "obscene_language/profanity"): 4,
            (today, "quarantine", "safeguarding_concern/self_harm"): 2,
            (yesterday, "accept", ""): 25,
            (yesterday, "reject", "virus_scan/malware"): 1,
            (yesterday, "reject", ""): 1,
        },
        {(today, "troll@outside.example"): 5, (yesterday, "spam@bulk.example"): 2},
    )


def test_the_dashboard_draws_inline_svg_charts(tech: Any, store: Store, held: Held) -> None:
    counts(store)
    page = tech.get("/")
    assert page.status_code == 200
    text = page.text
    # Every message per day, then the held and refused on a scale of their own.
    assert text.count('<svg class="columns"') == 2
    assert "Held or refused per day" in text
    assert re.search(r'<rect class="a-accept" x="[\d.]+" y="[\d.]+" width="[\d.]+" height="[\d.]+"', text)
    assert '<rect class="a-quarantine"' in text and '<rect class="a-reject"' in text
    assert "74 messages" in text  # 48 today + 26 yesterday
    # Findings by category, most frequent first; top senders in order.
    labels = re.findall(r'<span class="hbar-label">([^<]+)</span>', text)
    days = [label for label in labels if re.fullmatch(r"\w{3} \d\d \w{3}", label)]
    assert len(days) == 14  # the phone form of the per-day chart: one row per day, newest first
    assert days[0] == dt.datetime.now(dt.UTC).strftime("%a %d %b")
    assert [label for label in labels if label not in days] == [
        "obscene_language/profanity",
        "safeguarding_concern/self_harm",
        "virus_scan/malware",
        "troll@outside.example",
        "spam@bulk.example",
    ]
    assert '<rect class="c-obscene_language" width="100.0"' in text
    assert '<rect class="c-safeguarding_concern" width="50.0"' in text
    # Nothing remote, no script but the console's own file.
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert re.findall(r"<script\b[^>]*>", text) == ['<script src="/static/console.js" defer>']
    # Health: the configured endpoint does not answer, so "unknown", said plainly.
    assert "could not be read" in text
    assert re.search(r'health-name">clamd</span> <span class="badge health-unknown">unknown', text)
    # Held now links to the queue.
    assert 'href="/quarantine?status=held"' in text


def test_scanner_health_from_the_gateway_metrics(
    settings: Any, store: Store, accounts: Any, metrics_url: str
) -> None:
    app = create_app(settings.model_copy(update={"metrics_url": metrics_url}), store)
    text = signed_in(app, "tech").get("/").text
    assert re.search(r'health-name">rules</span> <span class="badge health-up">up', text)
    assert re.search(r'health-name">clamd</span> <span class="badge health-down">down', text)
    assert re.search(r'health-name">postgres</span> <span class="badge health-up">up', text)


def test_health_parsing_and_unreachable_endpoint() -> None:
    assert health.parse(METRICS) == {"rules": "up", "clamd": "down", "postgres": "up"}
    assert health.parse('school_milter_dependency_up{dependency="x"} NaN') == {"x": "down"}
    unreachable = health.read_health("http://127.0.0.1:9/metrics", timeout=0.5)
    assert not unreachable.reachable
    assert {d.state for d in unreachable.dependencies} == {"unknown"}
    assert health.read_health("").note == "no metrics address configured"


def test_the_period_and_an_empty_store(tech: Any, held: Held) -> None:
    text = tech.get("/?days=30").text
    assert '<option value="30" selected>' in text
    assert "No messages counted in this period." in text
    assert tech.get("/?days=abc").status_code == 200


def test_column_chart_geometry() -> None:
    today = dt.date(2026, 11, 25)
    since = today - dt.timedelta(days=6)
    chart = charts.per_day_by_action(
        [(today, "accept", "", 9), (today, "reject", "", 1), (since, "quarantine", "", 5)], since, today
    )
    assert chart.total == 15
    assert [h for h in chart.table_head] == ["Day", "accept", "quarantine", "reject", "Total"]
    assert chart.table_rows[-1] == ("2026-11-25", "9", "0", "1", "10")
    # A tick every 2 up to 10 (the peak), a 0 on the baseline.
    assert [g.label for g in chart.grid] == ["0", "2", "4", "6", "8", "10"]
    baseline, top = chart.grid[0].y, chart.grid[-1].y
    assert baseline > top
    tallest = max(r.h for r in chart.rects if r.cls == "a-accept")
    assert tallest == pytest.approx((baseline - top) * 9 / 10, abs=0.1)
    # The labels sit in a gutter no bar reaches.
    assert all(r.x >= chart.plot_left and r.x + r.w <= chart.plot_right for r in chart.rects)
    # The held and refused on their own scale, with each day's number over its column.
    assert chart.held is not None
    assert {r.cls for r in chart.held.rects} == {"a-quarantine", "a-reject"}
    assert [g.label for g in chart.held.grid] == ["0", "5"]
    assert [v.text for v in chart.held.values] == ["5", "0", "0", "0", "0", "0", "1"]
    assert chart.held.plot_left == chart.plot_left  # the columns of both stand one above the other
    # On a phone, each day's held and refused are numbers under its bar.
    assert chart.day_bars[0].notes == (("a-quarantine", "quarantine", 0), ("a-reject", "reject", 1))


@pytest.mark.parametrize(
    ("peak", "step", "top"),
    [
        (0, 1, 1),
        (1, 1, 1),
        (7, 2, 8),
        (10, 2, 10),
        (130, 25, 150),
        (926, 200, 1000),
        (1060, 200, 1200),  # not 2000: the top tick just above the peak
        (13_987, 2500, 15_000),
    ],
)
def test_nice_axis_steps(peak: int, step: int, top: int) -> None:
    assert charts.nice_scale(peak) == (step, top)
    assert top >= peak and top - step < max(peak, 1)


def test_the_gutter_holds_the_longest_label() -> None:
    today = dt.date(2026, 11, 25)
    small = charts.per_day_by_action([(today, "accept", "", 9)], today, today)
    large = charts.per_day_by_action([(today, "accept", "", 1060)], today, today)
    assert large.grid[-1].label == "1200"
    assert large.plot_left > small.plot_left
    # Right-aligned 10 units left of the plot, at most 14 units a digit (the largest text).
    assert large.plot_left - 10 >= 14 * len("1200") - 6
    assert large.held is None  # nothing held or refused: no second chart
