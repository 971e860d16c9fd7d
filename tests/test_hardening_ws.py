"""Websocket limits (DESIGN.md "Realtime"): a client message over 4 KiB closes with 1009, a
caller holds at most 5 sockets across every API process (the next closes with 1008), a
socket closes with 1008 when its token expires, a long history is replayed in pages, and
bad tokens count against the address like failed HTTP authentications.

Served by gunicorn with two gevent workers, so the per-user cap is checked across processes.
"""
from __future__ import annotations

import os
import struct
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, update

from api_service import realtime_ws
from api_service.realtime_ws import SocketLeases
from shared.db import db
from shared.models import Account, Transaction
from tests.support.stack import (Closed, check_contiguous, connections_by_worker,
                                 running_stack, uid, updates)

MESSAGE_TOO_BIG = 1009
POLICY_VIOLATION = 1008
AUTH_FAILURES = 6  # per minute and address, this stack only


@pytest.fixture(scope="module")
def stack(app, database_url, tmp_path_factory):
    with running_stack(app, database_url, tmp_path_factory, "ws-limits", web_workers=2,
                       env={"TXMON_RATELIMIT_AUTH_FAILURES": f"{AUTH_FAILURES}/minute"}) as s:
        yield s


@pytest.fixture(autouse=True)
def _settled(stack):
    yield
    stack.quiesce()


def close_code(ws, timeout: float = 10) -> int | None:
    return ws.expect_close(timeout).code


def alive(ws) -> bool:
    """The socket still answers a ping (updates that arrive first are passed over: the
    admin feed carries every account's, such as the test's own opening credit)."""
    ws.send("ping")
    try:
        while ws.recv_raw(10) != "pong":
            pass
        return True
    except Closed:
        return False


# -- message size ------------------------------------------------------------------------------


def test_message_of_4_kib__accepted(stack, sockets):
    user = uid("sz")
    stack.account(user, 100)
    ws = sockets.balance(token=stack.token(user))
    assert ws.recv()["type"] == "snapshot"
    ws.send("x" * 4096)
    assert alive(ws)


@pytest.mark.parametrize("size", [4097, 64 * 1024])
def test_message_over_4_kib__closed_1009(stack, sockets, size):
    user = uid("sz")
    stack.account(user, 100)
    ws = sockets.balance(token=stack.token(user))
    assert ws.recv()["type"] == "snapshot"
    ws.send("x" * size)
    assert close_code(ws) == MESSAGE_TOO_BIG


def test_big_message_in_the_auth_window__closed_1009(stack, sockets):
    ws = sockets.balance()
    ws.send('{"type": "auth", "token": "' + "a" * 8000 + '"}')
    assert close_code(ws) == MESSAGE_TOO_BIG


def test_frame_announcing_1_gib__closed_1009_after_a_few_kib(stack, sockets):
    """A frame header claiming 1 GiB, then 8 KiB of it: the server stops reading at 4 KiB."""
    ws = sockets.balance()
    mask = os.urandom(4)
    payload = b"a" * 8192
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    ws.ws.sock.sendall(struct.pack("!BBQ", 0x81, 0x80 | 127, 1 << 30) + mask + masked)
    closed = ws.expect_close(10)
    assert closed.code == MESSAGE_TOO_BIG, closed
    other = uid("sz")
    stack.account(other, 100)
    assert sockets.balance(token=stack.token(other)).recv()["type"] == "snapshot"


# -- sockets per user ----------------------------------------------------------------------------


def _five_on_both_workers(stack, sockets, user):
    """Five sockets of ``user`` spread over both gunicorn workers (reopened until they are)."""
    mine = []
    for _ in range(40):
        while len(mine) < 5:
            ws = sockets.balance(token=stack.token(user))
            assert ws.recv()["type"] == "snapshot"
            mine.append(ws)
        if len(connections_by_worker(stack, mine)) == 2:
            return mine
        mine.pop(0).close()
        time.sleep(0.2)  # the server releases the closed socket's lease
    raise AssertionError("the kernel never spread five sockets over both workers")


def test_sixth_socket_of_a_user__closed_1008_across_processes(stack, sockets):
    user, other = uid("cap"), uid("cap")
    for u in (user, other):
        stack.account(u, 100)
    mine = _five_on_both_workers(stack, sockets, user)
    for _ in range(3):  # whichever worker takes it
        assert close_code(sockets.balance(token=stack.token(user))) == POLICY_VIOLATION
    assert all(alive(ws) for ws in mine)
    assert sockets.balance(token=stack.token(other)).recv()["type"] == "snapshot"


def test_closing_a_socket__frees_its_place(stack, sockets):
    user = uid("cap")
    stack.account(user, 100)
    mine = _five_on_both_workers(stack, sockets, user)
    mine[0].close()
    deadline = time.monotonic() + 10
    while True:  # the server notices the close asynchronously
        ws = sockets.balance(token=stack.token(user))
        try:
            assert ws.recv()["type"] == "snapshot"
            break
        except Closed as closed:
            assert closed.code == POLICY_VIOLATION
            assert time.monotonic() < deadline, "the closed socket's place was never freed"
            time.sleep(0.2)


def test_admin_sockets__capped_per_admin(stack, sockets):
    token = stack.token(uid("ops"), admin=True)
    admins = [sockets.admin(token=token) for _ in range(5)]
    for ws in admins:
        assert ws.recv()["type"] == "hello"
    assert close_code(sockets.admin(token=token)) == POLICY_VIOLATION


def test_leases__lapse_after_a_crash_and_fall_back_to_the_process_without_redis(
        stack, monkeypatch):
    monkeypatch.setattr(realtime_ws, "LEASE_S", 1)
    crashed = SocketLeases(stack.redis.url())  # a process that never released its leases
    key = f"user:{uid('lease')}"
    assert all(crashed.acquire(key, f"l{i}", 5) for i in range(5))
    survivor = SocketLeases(stack.redis.url())
    assert not survivor.acquire(key, "new", 5)
    time.sleep(2.5)
    assert survivor.acquire(key, "new", 5)

    offline = SocketLeases("redis://127.0.0.1:1/0")
    assert all(offline.acquire(key, f"o{i}", 2) for i in range(2))
    assert not offline.acquire(key, "o3", 2)
    offline.release(key, "o0")
    assert offline.acquire(key, "o4", 2)


# -- token expiry --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["balance", "admin"])
def test_socket_closes_1008_when_its_token_expires(stack, sockets, path):
    user = uid("exp")
    stack.account(user, 100)
    # Long enough for the socket to be shown open first on a loaded machine.
    token = stack.token(user, admin=path == "admin", ttl=timedelta(seconds=6))
    ws = getattr(sockets, path)(token=token)
    assert ws.recv()["type"] in ("snapshot", "hello")
    assert alive(ws), ws.closed
    closed = ws.expect_close(30)
    assert closed.code == POLICY_VIOLATION
    assert "expired" in closed.reason


# -- replay in pages -----------------------------------------------------------------------------


def test_since_seq_0_on_a_long_history__every_update_once_in_order(stack, sockets):
    """More than two replay pages: every seq from 1 to the head, once, then live ones."""
    user, n = uid("long"), 2 * realtime_ws.REPLAY_PAGE + 137
    stack.account(user)
    now = datetime.now(timezone.utc)
    with stack.app.app_context():
        with db.engine.begin() as conn:
            conn.execute(insert(Transaction), [
                {"user_id": user, "seq": seq, "amount_cents": 1, "balance_after_cents": seq,
                 "type": "credit", "status": "completed", "reference": f"{user}-{seq}",
                 "description": "bulk", "created_at": now} for seq in range(1, n + 1)])
            conn.execute(update(Account).where(Account.user_id == user)
                         .values(balance_cents=n, last_seq=n))
    ws = sockets.balance(token=stack.token(user), since=0)
    got = ws.collect(lambda m: len(updates(m)) >= n, timeout=60)
    assert got[0] == {"type": "snapshot", "balance_cents": n, "seq": n}
    check_contiguous(got, 1, n)
    stack.purchase(user, 5)
    live = ws.collect(lambda m: len(updates(m)) >= 1, timeout=20)
    assert [u["seq"] for u in updates(live)] == [n + 1]


# -- failed authentication per address -------------------------------------------------------


@pytest.fixture
def fresh_failure_counts(stack):
    def flush():
        client = stack.redis.client()
        for key in client.scan_iter("LIMITS*"):
            client.delete(key)

    flush()
    yield
    flush()


def test_bad_tokens__count_against_the_address(stack, sockets, fresh_failure_counts):
    user = uid("guess")
    stack.account(user, 100)
    good = stack.token(user)
    for i in range(AUTH_FAILURES):
        assert close_code(sockets.balance(token=f"guess-{i}")) == POLICY_VIOLATION
    refused = sockets.balance(token=good).expect_close(10)
    assert refused.code == POLICY_VIOLATION and "Too many" in refused.reason
    r = stack.call("GET", "/api/wallet/balance", headers={"Authorization": f"Bearer {good}",
                                                     "X-API-Key": None})
    assert r.status_code == 429
