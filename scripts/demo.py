#!/usr/bin/env python3
"""Demo traffic: play the main app against a running txmon over HTTP.

Creates three accounts, tops them up, buys SMS verifications, completes, cancels and fails
some, shows a 402, lets two short-timeout purchases expire so the workers refund them, and
prints each user's notifications as the user sees them (through a user JWT).

    python scripts/demo.py            # against TXMON_URL (default http://127.0.0.1:$PORT)

Environment: TXMON_URL, PORT, TXMON_SERVICE_KEYS (the first key is used), TXMON_JWT_SECRET;
both fall back to the development defaults of shared/config.py. Exits 0 when the API
answered every step as the contract says (a timeout refund that does not arrive is
reported, not hidden), 1 on an unexpected answer.
"""
from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jwt
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shared.config import DEV_JWT_SECRET, DEV_SERVICE_KEY  # noqa: E402

BASE = os.environ.get("TXMON_URL") or f"http://127.0.0.1:{os.environ.get('PORT', '8000')}"
BASE = BASE.rstrip("/")
SERVICE_KEY = next((k.strip() for k in os.environ.get("TXMON_SERVICE_KEYS", "").split(",")
                    if k.strip()), DEV_SERVICE_KEY)
JWT_SECRET = os.environ.get("TXMON_JWT_SECRET") or DEV_JWT_SECRET
RUN = datetime.now(timezone.utc).strftime("%H%M%S")  # ids unique per run, so reruns start clean
REFUND_WAIT_S = 60

session = requests.Session()
session.headers["X-API-Key"] = SERVICE_KEY


class Unexpected(Exception):
    pass


def dollars(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    return f"{sign}${abs(cents) // 100}.{abs(cents) % 100:02d}"


def say(line: str) -> None:
    print(line, flush=True)


def call(method: str, path: str, expect: int | tuple[int, ...], **kwargs) -> dict:
    """One request; the JSON body if the status is the expected one, else Unexpected."""
    expect = (expect,) if isinstance(expect, int) else expect
    resp = session.request(method, BASE + path, timeout=40, **kwargs)
    try:
        body = resp.json()
    except ValueError:
        body = {"raw": resp.text[:200]}
    if resp.status_code not in expect:
        raise Unexpected(f"{method} {path} answered {resp.status_code} "
                         f"(expected {'/'.join(map(str, expect))}): {body}")
    return body


def wait_ready(deadline_s: float = 60) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            if requests.get(BASE + "/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > end:
            raise Unexpected(f"{BASE}/readyz did not answer 200 within {deadline_s:.0f} s")
        time.sleep(1)


def user_token(user_id: str) -> str:
    now = datetime.now(timezone.utc)
    return jwt.encode({"sub": user_id, "role": "user", "iat": now,
                       "exp": now + timedelta(minutes=15)}, JWT_SECRET, algorithm="HS256")


def buy(user_id: str, service: str, country: str, cost_cents: int, vid: str,
        timeout_seconds: int | None = None) -> dict:
    body = {"id": vid, "user_id": user_id, "service_name": service, "country": country,
            "cost_cents": cost_cents}
    if timeout_seconds is not None:
        body["timeout_seconds"] = timeout_seconds
    r = call("POST", "/api/v1/verifications", 201, json=body)
    v = r["verification"]
    extra = f", expires in {timeout_seconds} s" if timeout_seconds else ""
    say(f"  {name(user_id)} buys {service} ({country}) for {dollars(cost_cents)}: "
        f"{v['status']}{extra}; balance {dollars(r['balance_cents'])}")
    return r


NAMES: dict[str, str] = {}


def name(user_id: str) -> str:
    return NAMES.get(user_id, user_id)


def demo() -> int:
    say(f"demo: playing the main app against {BASE} (run {RUN})")
    wait_ready()

    people = [("alice", "Alice", 2000, 100), ("bob", "Bob", 500, 100), ("carol", "Carol", 300, 200)]
    users = {}
    say("1. accounts")
    for short, display, _, threshold in people:
        uid = f"demo-{short}-{RUN}"
        users[short] = uid
        NAMES[uid] = display
        acct = call("PUT", f"/api/v1/accounts/{uid}", (200, 201),
                    json={"email": f"{short}@example.com", "display_name": display,
                          "low_balance_threshold_cents": threshold})
        say(f"  {display}: account {uid} ({acct['email']}), balance "
            f"{dollars(acct['balance_cents'])}, low-balance alert below {dollars(threshold)}")

    say("2. top-ups (POST credits, idempotent on payment_id)")
    for short, display, amount, _ in people:
        r = call("POST", f"/api/v1/accounts/{users[short]}/credits", 201,
                 json={"amount_cents": amount, "payment_id": f"pay-{short}-{RUN}",
                       "description": "Card top-up"})
        say(f"  {display} pays {dollars(amount)}: transaction #{r['transaction']['seq']}, "
            f"balance {dollars(r['balance_cents'])}")
    r = call("POST", f"/api/v1/accounts/{users['alice']}/credits", 200,
             json={"amount_cents": 2000, "payment_id": f"pay-alice-{RUN}",
                   "description": "Card top-up"})
    say(f"  the payment provider retries Alice's payment: 200, same transaction "
        f"#{r['transaction']['seq']}, balance still {dollars(r['balance_cents'])}")

    say("3. verifications")
    a, b, c = users["alice"], users["bob"], users["carol"]
    buy(a, "WhatsApp", "US", 150, f"v-{RUN}-a1")
    buy(a, "Telegram", "GB", 80, f"v-{RUN}-a2")
    buy(a, "Google", "DE", 120, f"v-{RUN}-a3", timeout_seconds=10)
    buy(b, "Discord", "FR", 90, f"v-{RUN}-b1")
    buy(b, "Uber", "US", 250, f"v-{RUN}-b2")
    buy(c, "Tinder", "CA", 250, f"v-{RUN}-c1", timeout_seconds=10)

    v = call("POST", f"/api/v1/verifications/v-{RUN}-a1/complete", 200)
    say(f"  Alice's WhatsApp code arrived: {v['status']} (no refund)")
    r = call("POST", f"/api/v1/verifications/v-{RUN}-a2/cancel", 200,
             json={"reason": "user cancelled"})
    say(f"  Alice cancels Telegram: {r['verification']['status']}, refund "
        f"{dollars(r['refund']['amount_cents'])}, balance "
        f"{dollars(r['refund']['balance_after_cents'])}")
    r2 = call("POST", f"/api/v1/verifications/v-{RUN}-a2/cancel", 200,
              json={"reason": "user cancelled"})
    same = r2["refund"]["id"] == r["refund"]["id"]
    say(f"  the main app repeats the cancel: 200, {'the same refund' if same else 'ANOTHER refund'}"
        f" (transaction {r2['refund']['id']})")
    if not same:
        raise Unexpected("a repeated cancel produced a second refund")
    r = call("POST", f"/api/v1/verifications/v-{RUN}-b1/fail", 200,
             json={"reason": "provider returned no number"})
    say(f"  Bob's Discord number never came (provider error): {r['verification']['status']}, "
        f"refund {dollars(r['refund']['amount_cents'])}, balance "
        f"{dollars(r['refund']['balance_after_cents'])}")
    v = call("POST", f"/api/v1/verifications/v-{RUN}-b2/complete", 200)
    say(f"  Bob's Uber code arrived: {v['status']}")
    e = call("POST", "/api/v1/verifications", 402,
             json={"id": f"v-{RUN}-c2", "user_id": c, "service_name": "Signal",
                   "country": "US", "cost_cents": 100})
    d = e["error"].get("details", {})
    say(f"  Carol tries Signal for $1.00 with {dollars(d.get('balance_cents', 0))} left: 402 "
        f"{e['error']['code']} (needs {dollars(d.get('required_cents', 100))}); nothing charged")

    say(f"4. waiting for the workers to refund the two 10-second purchases "
        f"(up to {REFUND_WAIT_S} s)")
    pending = {f"v-{RUN}-a3": a, f"v-{RUN}-c1": c}
    start = time.monotonic()
    troubles: list[str] = []
    while pending and time.monotonic() - start < REFUND_WAIT_S:
        for vid in list(pending):
            try:
                v = call("GET", f"/api/v1/verifications/{vid}", 200)
                if v["status"] == "pending":
                    continue
                acct = call("GET", f"/api/v1/accounts/{pending[vid]}", 200)
            except (Unexpected, requests.RequestException) as exc:
                # Keep polling through a slow or failing answer, but say so.
                say(f"  (the API did not answer the poll: {str(exc)[:160]})")
                troubles.append(str(exc))
                continue
            say(f"  {name(pending[vid])}'s {v['service_name']} verification is "
                f"{v['status']} {time.monotonic() - start:.0f} s after purchase"
                f"{', refunded' if v.get('refund_transaction_id') else ''}; "
                f"balance {dollars(acct['balance_cents'])}")
            del pending[vid]
        if pending:
            time.sleep(2)
    for vid, uid in pending.items():
        say(f"  NOT REFUNDED: {name(uid)}'s verification {vid} was still pending "
            f"{REFUND_WAIT_S} s after purchase ({REFUND_WAIT_S - 10} s after it expired). "
            "Timeout refunds are the workers' job: see var/log/worker.log and beat.log.")

    say("5. balances")
    for short, display, _, _ in people:
        acct = call("GET", f"/api/v1/accounts/{users[short]}", 200)
        say(f"  {display}: {dollars(acct['balance_cents'])} after {acct['last_seq']} transactions")

    say("6. what each user sees (GET /api/notifications with their own JWT)")
    for short, display, _, _ in people:
        page = call("GET", "/api/notifications", 200,
                    headers={"Authorization": f"Bearer {user_token(users[short])}",
                             "X-API-Key": None})
        say(f"  {display} ({page['unread_count']} unread):")
        for n in reversed(page["notifications"]):
            say(f"    [{n['type']}] {n['title']}: {n['message']} (email {n['email_status']})")

    say("demo: done" + (" (timeout refunds did not arrive, see above)" if pending else "")
        + (f" ({len(troubles)} polls failed, see above)" if troubles else ""))
    return 0


def main() -> int:
    try:
        return demo()
    except Unexpected as exc:
        say(f"demo: stopped, unexpected answer: {exc}")
        return 1
    except requests.RequestException as exc:
        say(f"demo: stopped, cannot reach {BASE}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
