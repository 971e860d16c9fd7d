"""Notification email through a real worker and a real SMTP server (aiosmtpd on loopback).

DESIGN.md / issue 3: each notification is emailed per the user's preferences with a plain
text and an HTML part that state the amount and ``New balance: $X.YY`` and link to the
wallet; ``email_status`` moves pending -> sent / skipped / failed (retries spent); a refund
whose email finally fails logs ``CRITICAL: Failed to send refund notification ...`` and
raises an admin alert.
"""
from __future__ import annotations


from tests.support import invariant_violations, ok
from tests.support.workers import (WALLET_BASE, email_statuses, rows, wait_quiet,
                                  wait_until)


WALLET_URL = WALLET_BASE + "/wallet"
TITLES = {"credit_added": "Credits Added", "credit_deducted": "Credits Used",
          "instant_refund": "Instant Refund Processed", "balance_adjusted": "Balance Adjusted",
          "low_balance": "Low Balance"}


def _notifications(app, user_id: str) -> list[dict]:
    return rows(app, "SELECT n.*, t.balance_after_cents, d.status AS email_status"
                     " FROM notifications n LEFT JOIN transactions t ON t.id = n.transaction_id"
                     " JOIN notification_deliveries d ON d.notification_id = n.id"
                     " AND d.channel = 'email' "
                     "WHERE n.user_id = :u ORDER BY n.id", u=user_id)


def _alice_traffic(api) -> None:
    """One notification of each user-facing type, all committed before any worker runs."""
    svc = api.service
    ok(api.client.put("/api/v1/accounts/alice", headers=svc,
                       json={"email": "alice@example.com", "low_balance_threshold_cents": 500}))
    ok(api.client.post("/api/v1/accounts/alice/credits", headers=svc,   # $10.00 -> $10.00
                        json={"amount_cents": 1000, "payment_id": "pay-alice-1"}))
    ok(api.purchase("alice", 320, vid="va-1"))                           # -$3.20 -> $6.80
    ok(api.purchase("alice", 250, vid="va-2"))                           # -$2.50 -> $4.30, low
    ok(api.client.post("/api/v1/verifications/va-2/cancel", headers=svc,  # +$2.50 -> $6.80
                        json={"reason": "no sms"}))
    ok(api.client.post("/api/v1/accounts/alice/adjustments", headers=svc,  # -$1.05 -> $5.75
                        json={"amount_cents": -105, "reason": "chargeback",
                              "idempotency_key": "adj-alice-1"}))


EXPECTED = [  # (type, amount, new balance) in the order the ledger wrote them
    ("credit_added", "$10.00", "$10.00"),
    ("credit_deducted", "$3.20", "$6.80"),
    ("credit_deducted", "$2.50", "$4.30"),
    ("low_balance", "$4.30", "$4.30"),
    ("instant_refund", "$2.50", "$6.80"),
    ("balance_adjusted", "$1.05", "$5.75"),
]


def _check_email(msg, *, title: str, amount: str, balance: str, to: str) -> None:
    assert msg.to == to
    assert msg.subject == f"txmon: {title}"
    plain, html = msg.part("plain"), msg.part("html")
    assert plain is not None and html is not None, msg.message.get_content_type()
    for body in (plain, html):
        assert title in body
        assert amount in body, (amount, body)
        stated = [line.strip() for line in body.splitlines() if "New balance:" in line]
        assert f"New balance: {balance}" in body, f"expected New balance: {balance}, got {stated}"
    assert WALLET_URL in plain
    assert f'href="{WALLET_URL}"' in html


def test_email__each_notification_type__text_and_html_with_amount_balance_and_link(
        app, api, workers, smtp):
    _alice_traffic(api)
    notes = _notifications(app, "alice")
    assert [n["type"] for n in notes] == [e[0] for e in EXPECTED]
    assert {n["email_status"] for n in notes} == {"pending"}  # no worker yet

    worker = workers.start(smtp=smtp)
    wait_quiet(app, worker)
    assert set(email_statuses(app, "alice").values()) == {"sent"}

    for n, (ntype, amount, balance) in zip(notes, EXPECTED):
        if ntype == "low_balance":
            continue  # see the next test
        got = smtp.messages(to="alice@example.com", subject=f"txmon: {TITLES[ntype]}")
        # Several notifications share a title (two purchases): pick this one by its text.
        mine = [m for m in got if n["message"] in m.part("plain")]
        assert len(mine) == 1, (ntype, n["message"], [m.part("plain") for m in got])
        _check_email(mine[0], title=TITLES[ntype], amount=amount, balance=balance,
                     to="alice@example.com")
        assert n["message"] in mine[0].part("html")
    # One email per notification, nothing else went to alice.
    assert len(smtp.messages(to="alice@example.com")) == len(EXPECTED)
    assert worker.lines(r"Email sent: Type=credit_added, User=alice")
    # The worker counts the deliveries (the API's /metrics only declares the counter).
    assert worker.metric("notifications_total", type="credit_added", success="true") >= 1
    assert invariant_violations(app, delivered=True) == []


def test_email__low_balance_states_the_balance_it_warns_about(app, api, workers, smtp):
    """The low_balance email is sent after later transactions (the worker starts late, as
    after an outage); its "New balance" must be the balance the warning is about ($4.30),
    as its own message says, not whatever the balance is when the email goes out."""
    _alice_traffic(api)
    low = [n for n in _notifications(app, "alice") if n["type"] == "low_balance"]
    assert len(low) == 1 and "Your balance is $4.30" in low[0]["message"]

    worker = workers.start(smtp=smtp)
    wait_quiet(app, worker)
    got = smtp.messages(to="alice@example.com", subject="txmon: Low Balance")
    assert len(got) == 1
    _check_email(got[0], title="Low Balance", amount="$4.30", balance="$4.30",
                 to="alice@example.com")


def test_email__preferences_threshold_and_missing_address_skip(app, api, workers, smtp):
    svc = api.service
    ok(api.client.put("/api/v1/accounts/bob", headers=svc, json={"email": "bob@example.com"}))
    ok(api.client.put("/api/v1/accounts/carol", headers=svc, json={}))  # no email address
    prefs = ok(api.client.put("/api/notifications/preferences", headers=api.user("bob"),
                               json={"email_on_debit": False, "min_amount_notify_cents": 500}))
    assert prefs["email_on_debit"] is False and prefs["min_amount_notify_cents"] == 500

    def credit(user, cents, pid):
        return ok(api.client.post(f"/api/v1/accounts/{user}/credits", headers=svc,
                                   json={"amount_cents": cents, "payment_id": pid}))

    expect = {}  # transaction id -> expected email_status
    expect[credit("bob", 1000, "pb-1")["transaction"]["id"]] = "sent"       # >= $5.00
    expect[credit("bob", 200, "pb-2")["transaction"]["id"]] = "skipped"     # below threshold
    expect[ok(api.purchase("bob", 600, vid="vb-1"))["transaction"]["id"]] = "skipped"  # debit off
    refund = ok(api.client.post("/api/v1/verifications/vb-1/fail", headers=svc, json={}))
    expect[refund["refund"]["id"]] = "sent"                                  # refund, $6.00
    expect[ok(api.client.post("/api/v1/accounts/bob/adjustments", headers=svc, json={
        "amount_cents": -50, "reason": "fee", "idempotency_key": "kb-1"}))["transaction"]["id"]] \
        = "skipped"                                                          # below threshold
    expect[ok(api.client.post("/api/v1/accounts/bob/adjustments", headers=svc, json={
        "amount_cents": 700, "reason": "goodwill", "idempotency_key": "kb-2"}))["transaction"][
        "id"]] = "sent"
    expect[credit("carol", 5000, "pc-1")["transaction"]["id"]] = "skipped"  # no address
    expect[ok(api.purchase("carol", 100, vid="vc-1"))["transaction"]["id"]] = "skipped"

    notes = rows(app, "SELECT n.transaction_id, n.user_id, d.status AS email_status"
                      " FROM notifications n JOIN notification_deliveries d ON d.notification_id = n.id AND d.channel = 'email'"
                      " WHERE n.transaction_id IS NOT NULL")
    assert {n["transaction_id"]: n["email_status"] for n in notes} == {
        t: "pending" for t in expect}
    assert rows(app, "SELECT * FROM notifications WHERE transaction_id IS NULL") == []

    worker = workers.start(smtp=smtp)
    wait_quiet(app, worker)
    notes = rows(app, "SELECT n.transaction_id, n.user_id, d.status AS email_status"
                      " FROM notifications n JOIN notification_deliveries d ON d.notification_id = n.id AND d.channel = 'email'")
    assert {n["transaction_id"]: n["email_status"] for n in notes} == expect
    bob_mail = sorted(m.subject for m in smtp.messages(to="bob@example.com"))
    assert bob_mail == sorted(["txmon: Credits Added", "txmon: Instant Refund Processed",
                               "txmon: Balance Adjusted"])
    assert len(smtp.received) == 3  # carol has no address: nothing sent anywhere for her


def test_email__recipient_refused_is_permanent__failed_without_retries(app, api, workers, smtp):
    """A 550 at RCPT cannot be fixed by retrying (base.py: dont_autoretry_for): the status
    must still end ``failed``, not stay ``pending`` forever."""
    smtp.refuse.add("gone@example.com")
    ok(api.client.put("/api/v1/accounts/gone", headers=api.service,
                       json={"email": "gone@example.com"}))
    ok(api.client.post("/api/v1/accounts/gone/credits", headers=api.service,
                        json={"amount_cents": 1000, "payment_id": "pg-1"}))
    worker = workers.start(smtp=smtp)
    wait_until(lambda: worker.lines(r"Task txmon\.email\.send_notification\[outbox:\d+\] "
                                    r"(succeeded|failed)"),
               timeout=30, message="the email handler ran")
    assert not worker.lines(r"Task txmon\.email\.send_notification\[outbox:\d+\] failed")
    wait_until(lambda: set(email_statuses(app, "gone").values()) == {"failed"}, timeout=15,
               message=lambda: f"email_status failed (now {email_statuses(app, 'gone')}); "
                               f"worker: {worker.lines('send_notification.*raised')}")


