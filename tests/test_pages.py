"""The pages in a real browser (DESIGN.md "Pages"): Debian's chromium driven by Playwright,
against gunicorn, a Celery worker and a Redis of their own (tests/support/stack.py), so live
updates travel the production path: commit, outbox relay, Redis, hub, websocket, page.

Every test also checks that the page logged no console error and asked no host but txmon's.
"""
from __future__ import annotations

import csv
import io
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from playwright.sync_api import expect, sync_playwright

from tests.support.common import require_tool
from tests.support.stack import running_stack, uid

LARGE_DEBIT_CENTS = 2_000
WAIT_MS = 10_000  # a deadline for the page to show what the API did, not a latency target
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


@pytest.fixture(scope="module")
def stack(app, database_url, tmp_path_factory):
    with running_stack(app, database_url, tmp_path_factory, "pages",
                       env={"TXMON_ALERT_LARGE_DEBIT_CENTS": str(LARGE_DEBIT_CENTS),
                            "TXMON_ALERT_RAPID_COUNT": "100000"}) as s:
        yield s


@pytest.fixture(autouse=True)
def _settled(stack):
    yield
    stack.quiesce()


@pytest.fixture(scope="module")
def browser():
    chromium = require_tool("chromium", "apt-get install chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


class Watched:
    """A page whose console errors, foreign requests and request URLs are recorded."""

    def __init__(self, browser, stack, viewport=DESKTOP, **context):
        self.stack = stack
        self.context = browser.new_context(viewport=viewport, accept_downloads=True, **context)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.urls: list[str] = []
        own = (stack.base + "/", stack.ws_base + "/")
        self.foreign: list[str] = []

        def request(r):
            self.urls.append(r.url)
            if not r.url.startswith(own + ("data:", "blob:")):
                self.foreign.append(r.url)

        def websocket(ws):
            self.urls.append(ws.url)
            if not ws.url.startswith(own):
                self.foreign.append(ws.url)

        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", request)
        self.page.on("websocket", websocket)

    def open(self, path: str, token: str | None = None):
        self.page.goto(self.stack.base + path + (f"#token={token}" if token else ""))
        return self.page

    def check(self, *secrets: str) -> None:
        assert self.errors == [], self.errors
        assert self.foreign == [], self.foreign
        for url in self.urls:
            for secret in secrets:
                assert secret not in url, f"a token in a request URL: {url[:80]}"

    def close(self):
        self.context.close()


@pytest.fixture
def watched(browser, stack):
    opened = []

    def make(**kw):
        w = Watched(browser, stack, **kw)
        opened.append(w)
        return w

    yield make
    for w in opened:
        w.close()


def api(stack, path, token, method="GET", **kw):
    r = stack.call(method, path, headers={"Authorization": f"Bearer {token}", "X-API-Key": None},
                   **kw)
    assert r.ok, r.text
    return r.json()


def user_with_history(stack, balance_cents=1_000, purchases=0):
    user = uid("page")
    stack.account(user, balance_cents)
    stack.set_preferences(user, push_on_debit=True)
    for i in range(purchases):
        stack.purchase(user, 10 + i)
    stack.quiesce()
    return user


# -- wallet --------------------------------------------------------------------------------


def test_wallet__live_purchase_bell_toast_and_mark_all_read(stack, watched):
    user = user_with_history(stack)
    token = stack.token(user)
    w = watched()
    page = w.open("/wallet", token)
    expect(page.get_by_test_id("balance")).to_have_text("$10.00", timeout=WAIT_MS)
    expect(page.get_by_test_id("unread-count")).to_have_text("1", timeout=WAIT_MS)
    expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
    expect(page.get_by_test_id("tx-row")).to_have_count(1)

    stack.purchase(user, 150)  # through the service API, no reload
    expect(page.get_by_test_id("balance")).to_have_text("$8.50", timeout=WAIT_MS)
    expect(page.get_by_test_id("tx-row")).to_have_count(2)
    expect(page.get_by_test_id("tx-row").first).to_contain_text("-$1.50")
    expect(page.get_by_test_id("unread-count")).to_have_text("2", timeout=WAIT_MS)
    expect(page.locator(".toast").last).to_contain_text("1.50", timeout=WAIT_MS)

    page.locator("#bell").click()
    expect(page.get_by_test_id("notification-row")).to_have_count(2)
    page.get_by_test_id("mark-all-read").click()
    expect(page.get_by_test_id("unread-count")).to_have_text("0")
    assert api(stack, "/api/notifications", token)["unread_count"] == 0
    w.check(token)


def test_wallet__mark_one_read(stack, watched):
    user = user_with_history(stack, purchases=2)
    token = stack.token(user)
    page = watched().open("/wallet", token)
    expect(page.get_by_test_id("unread-count")).to_have_text("3", timeout=WAIT_MS)
    page.locator("#bell").click()
    page.get_by_test_id("notification-row").first.get_by_role("button", name="Mark read").click()
    expect(page.get_by_test_id("unread-count")).to_have_text("2")
    assert api(stack, "/api/notifications", token)["unread_count"] == 2


def test_wallet__reload_keeps_the_session_and_the_token_leaves_the_address_bar(stack, watched):
    user = user_with_history(stack)
    token = stack.token(user)
    w = watched()
    page = w.open("/wallet", token)
    expect(page.get_by_test_id("balance")).to_have_text("$10.00", timeout=WAIT_MS)
    assert "token" not in page.url and token not in page.url
    page.reload()
    expect(page.get_by_test_id("balance")).to_have_text("$10.00", timeout=WAIT_MS)
    assert page.url == stack.base + "/wallet"
    w.check(token)


def test_wallet__reconnects_with_since_seq_and_misses_nothing(stack, watched):
    """The network drops (the page's socket is closed and reconnects are refused for a
    while); two purchases meanwhile reach the page through since_seq once it is back."""
    user = user_with_history(stack)
    token = stack.token(user)
    w = watched()
    state = {"down": False, "live": [], "urls": []}

    def route(ws):
        state["urls"].append(ws.url)
        if state["down"]:
            ws.close(code=1012, reason="network down")
            return
        ws.connect_to_server()
        state["live"].append(ws)

    w.page.route_web_socket(re.compile(r".*/ws/balance.*"), route)
    page = w.open("/wallet", token)
    expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
    state["down"] = True
    state["live"].pop().close(code=1012, reason="network down")
    expect(page.locator("#live")).to_have_text("reconnecting…", timeout=WAIT_MS)
    stack.purchase(user, 25)
    stack.purchase(user, 35)
    stack.quiesce()
    state["down"] = False
    expect(page.get_by_test_id("balance")).to_have_text("$9.40", timeout=3 * WAIT_MS)
    expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
    expect(page.get_by_test_id("tx-row")).to_have_count(3)
    assert "since_seq=1" in state["urls"][-1], state["urls"]
    w.check(token)


def test_wallet__history_filter_load_more_and_csv_without_token_in_a_url(stack, watched):
    user = user_with_history(stack, purchases=24)  # 25 transactions
    token = stack.token(user)
    w = watched()
    page = w.open("/wallet", token)
    rows = page.get_by_test_id("tx-row")
    expect(rows).to_have_count(20, timeout=WAIT_MS)
    expect(page.locator("#history-total")).to_have_text("25 transactions")
    page.locator("#more-history").click()
    expect(rows).to_have_count(25)
    expect(page.locator("#more-history")).to_be_hidden()

    page.locator("select[name=type]").select_option("credit")
    page.get_by_role("button", name="Apply").click()
    expect(rows).to_have_count(1)
    expect(page.locator("#history-total")).to_have_text("1 transaction")

    page.locator("select[name=type]").select_option("")
    page.get_by_role("button", name="Apply").click()
    expect(rows).to_have_count(20)
    with page.expect_download() as download:
        page.locator("#csv").click()
    content = Path(download.value.path()).read_text()
    exported = list(csv.DictReader(io.StringIO(content)))
    history = api(stack, "/api/wallet/transactions/detailed?limit=100", token)["transactions"]
    assert [int(r["seq"]) for r in exported] == [t["seq"] for t in history]
    w.check(token)


def test_wallet__date_filter_in_the_viewers_zone(stack, watched):
    user = user_with_history(stack, purchases=1)
    token = stack.token(user)
    w = watched(timezone_id="Pacific/Kiritimati")  # UTC+14
    page = w.open("/wallet", token)
    rows = page.get_by_test_id("tx-row")
    expect(rows).to_have_count(2, timeout=WAIT_MS)
    today = page.evaluate("() => new Date().toLocaleDateString('en-CA')")  # local YYYY-MM-DD
    page.locator("input[name=start]").fill(today)
    page.locator("input[name=end]").fill(today)
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#history-total")).to_have_text("2 transactions")
    # the filter sent is the viewer's midnight (UTC+14) in UTC, the whole "to" day included
    sent = [u for u in w.urls if "transactions/detailed" in u and "start_date" in u][-1]
    query = parse_qs(urlsplit(sent).query)
    local_midnight = datetime.fromisoformat(today).replace(tzinfo=timezone(timedelta(hours=14)))
    assert datetime.fromisoformat(query["start_date"][0].replace("Z", "+00:00")) == local_midnight
    assert datetime.fromisoformat(query["end_date"][0].replace("Z", "+00:00")) == (
        local_midnight + timedelta(days=1, milliseconds=-1))
    page.locator("input[name=start]").fill("2001-01-01")
    page.locator("input[name=end]").fill("2001-01-02")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#history-total")).to_have_text("0 transactions")
    expect(rows).to_have_count(0)


def test_wallet__preferences_422_shown_next_to_the_field(stack, watched):
    user = user_with_history(stack)
    token = stack.token(user)
    before = api(stack, "/api/notifications/preferences", token)
    w = watched()
    page = w.open("/wallet", token)
    field = page.locator("#min_amount_notify_cents")
    expect(field).to_have_value(str(before["min_amount_notify_cents"]), timeout=WAIT_MS)
    field.fill("-5")
    page.get_by_test_id("prefs-save").click()
    expect(page.locator("#err-min_amount_notify_cents")).not_to_be_empty(timeout=WAIT_MS)
    expect(field).to_have_attribute("aria-invalid", "true")
    assert api(stack, "/api/notifications/preferences", token) == before

    field.fill("250")
    page.locator("input[name=email_on_debit]").uncheck()
    page.get_by_test_id("prefs-save").click()
    expect(page.locator("#prefs-status")).to_have_text("Saved", timeout=WAIT_MS)
    expect(page.locator("#err-min_amount_notify_cents")).to_be_empty()
    after = api(stack, "/api/notifications/preferences", token)
    assert after["min_amount_notify_cents"] == 250 and after["email_on_debit"] is False
    # the 422 is the browser's only console error; nothing else went wrong
    assert all("422" in e for e in w.errors), w.errors
    w.errors.clear()
    w.check(token)


# -- dashboard -----------------------------------------------------------------------------


def test_admin__feed_shows_a_purchase_and_an_alert_is_acknowledged(stack, watched):
    user = user_with_history(stack, balance_cents=10_000)
    token = stack.token(uid("ops"), admin=True)
    w = watched()
    page = w.open("/admin", token)
    expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
    feed = page.get_by_test_id("feed-item")
    stack.purchase(user, 125)
    expect(feed.first).to_contain_text(user, timeout=WAIT_MS)
    expect(feed.first).to_contain_text("-$1.25")

    stack.purchase(user, LARGE_DEBIT_CENTS + 500)  # raises large_debit
    alert = page.get_by_test_id("alert-row").filter(has_text=user)
    expect(alert).to_have_count(1, timeout=WAIT_MS)
    alert.get_by_role("textbox").fill("called the user")
    alert.get_by_test_id("ack-button").click()
    expect(alert).to_have_count(0, timeout=WAIT_MS)
    alerts = api(stack, "/api/admin/alerts?limit=200", token)["alerts"]
    mine = [a for a in alerts if a["user_id"] == user]
    assert [(a["status"], a["note"]) for a in mine] == [("acknowledged", "called the user")]
    w.check(token)


def test_admin__monitor_window_and_outbox_match_the_api(stack, watched):
    user_with_history(stack, purchases=3)
    token = stack.token(uid("ops"), admin=True)
    w = watched()
    page = w.open("/admin", token)
    for minutes in ("60", "1440", "10080"):
        page.get_by_test_id("monitor-window").select_option(minutes)
        total = api(stack, f"/api/admin/transactions/monitor?minutes={minutes}",
                    token)["total_transactions"]
        expect(page.get_by_test_id("monitor-total")).to_have_text(str(total), timeout=WAIT_MS)
    expect(page.locator("#chart-series canvas")).to_have_count(1)
    expect(page.locator("#chart-types canvas")).to_have_count(1)
    backlog = api(stack, "/api/admin/outbox", token)["backlog"]
    expect(page.get_by_test_id("outbox-backlog")).to_have_text(str(backlog), timeout=WAIT_MS)
    w.check(token)


def test_admin__dead_letter_re_driven_from_the_page(stack, watched):
    from sqlalchemy import text

    from shared.db import db

    user = user_with_history(stack)
    with stack.app.app_context(), db.engine.begin() as conn:  # the user's last row, dead
        dead_id = conn.execute(text(
            "UPDATE outbox SET dead_at = now(), completed_at = NULL, last_error = 'seeded'"
            " WHERE id = (SELECT max(id) FROM outbox WHERE user_id = :u) RETURNING id"),
            {"u": user}).scalar_one()
    token = stack.token(uid("ops"), admin=True)
    w = watched()
    page = w.open("/admin", token)
    row = page.get_by_test_id("dead-row").filter(has_text=f"#{dead_id} ")
    expect(row).to_have_count(1, timeout=WAIT_MS)
    row.get_by_role("button", name="Re-drive").click()
    expect(row).to_have_count(0, timeout=WAIT_MS)
    stack.quiesce()
    dead = api(stack, "/api/admin/outbox/dead?limit=200", token)["rows"]
    assert dead_id not in [r["id"] for r in dead]
    w.check(token)


def test_admin__account_search_opens_that_timeline(stack, watched):
    user = user_with_history(stack, purchases=2)
    other = user_with_history(stack, purchases=5)
    token = stack.token(uid("ops"), admin=True)
    w = watched()
    page = w.open("/admin", token)
    page.get_by_test_id("account-search").fill(user)
    page.get_by_role("button", name="Open timeline").click()
    expected = api(stack, f"/api/admin/accounts/{user}/timeline?limit=50", token)["events"]
    others = api(stack, f"/api/admin/accounts/{other}/timeline?limit=50", token)["events"]
    assert len(others) != len(expected)  # the row count tells the two accounts apart
    rows = page.get_by_test_id("timeline-row")
    expect(rows).to_have_count(len(expected), timeout=WAIT_MS)
    for row, event in zip(rows.all(), expected):
        expect(row).to_contain_text(event["summary"])
    expect(page.locator("#timeline-status")).to_have_text(f"Timeline of {user}")
    page.get_by_test_id("account-search").fill("no-such-account")
    page.get_by_role("button", name="Open timeline").click()
    expect(page.locator("#timeline-status")).to_have_text("No account no-such-account",
                                                         timeout=WAIT_MS)
    # the 404 of the unknown account is the only console error
    assert all("404" in e for e in w.errors), w.errors
    w.errors.clear()
    w.check(token)


# -- home, docs, headers -----------------------------------------------------------------------


def test_home__links_and_health_of_every_part(stack, watched):
    w = watched()
    page = w.open("/")
    for name in ("Wallet", "Operator dashboard", "API reference"):
        expect(page.locator("#main").get_by_role("link", name=name)).to_be_visible()
    expect(page.locator('[data-part="database"]')).to_have_text("answering", timeout=WAIT_MS)
    expect(page.locator('[data-part="redis"]')).to_have_text("answering")
    expect(page.locator('[data-part="workers"]')).to_have_text("1 answering", timeout=WAIT_MS)
    w.check()


def test_docs__interactive_reference_of_openapi_from_txmon_itself(stack, watched):
    w = watched()
    page = w.open("/docs")
    expect(page.locator(".opblock").first).to_be_visible(timeout=WAIT_MS)
    paths = requests.get(stack.base + "/openapi.json", timeout=10).json()["paths"]
    operations = sum(len(ops) for ops in paths.values())
    expect(page.locator(".opblock")).to_have_count(operations)
    w.check()


@pytest.mark.parametrize("path", ["/", "/docs", "/wallet", "/admin"])
def test_pages__security_headers(stack, path):
    r = requests.get(stack.base + path, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    csp = r.headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == "'self'" and directives["default-src"] == "'none'"
    assert "unsafe" not in csp and "http" not in csp and "*" not in csp
    assert directives["connect-src"] == f"'self' {stack.ws_base} {stack.ws_base.replace('ws:', 'wss:')}"
    assert r.headers["X-Frame-Options"] == "DENY"
    forged = requests.get(stack.base + path, headers={"Host": "x; script-src *"}, timeout=10)
    assert "script-src *" not in forged.headers["Content-Security-Policy"]
    assert "<script>" not in r.text and " style=" not in r.text  # nothing inline


@pytest.mark.parametrize("name,viewport", [("desktop", DESKTOP), ("phone", PHONE)])
@pytest.mark.parametrize("path", ["/wallet", "/admin"])
def test_pages__fit_the_width_and_screenshot(stack, watched, tmp_path, path, name, viewport):
    """No horizontal scrolling down to a phone's width. TXMON_SCREENSHOTS=docs/screenshots
    saves the images the README shows."""
    user = user_with_history(stack, balance_cents=5_000, purchases=6)
    token = stack.token(uid("ops"), admin=True) if path == "/admin" else stack.token(user)
    w = watched(viewport=viewport)
    page = w.open(path, token)
    expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
    if path == "/admin":
        page.get_by_test_id("account-search").fill(user)
        page.get_by_role("button", name="Open timeline").click()
        expect(page.get_by_test_id("timeline-row").first).to_be_visible(timeout=WAIT_MS)
    else:
        expect(page.get_by_test_id("tx-row")).to_have_count(7, timeout=WAIT_MS)
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{path} scrolls sideways by {overflow}px at {viewport['width']}px"
    out = Path(os.environ.get("TXMON_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / f"{path.strip('/')}-{name}.png"), full_page=True)
    w.check(token)
