"""Who may open a websocket, what the admin feed carries, and what never reaches a log.

Served by gunicorn (gevent) with a Celery worker, so alerts come from the real alert task.
"""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
import requests

from tests.support.stack import (check_update, forge, has_seq, running_stack, summarize, uid, updates)

POLICY_VIOLATION = 1008
LARGE_DEBIT_CENTS = 2_000


@pytest.fixture(scope="module")
def stack(app, database_url, tmp_path_factory):
    with running_stack(app, database_url, tmp_path_factory, "ws-access",
                       env={"TXMON_ALERT_LARGE_DEBIT_CENTS": str(LARGE_DEBIT_CENTS),
                            "TXMON_ALERT_RAPID_COUNT": "100000"}) as s:
        yield s


@pytest.fixture(autouse=True)
def _settled(stack):
    """Let the worker finish this test's tasks before the next test truncates the tables."""
    yield
    stack.quiesce()


def assert_policy_close(ws, timeout: float = 5) -> None:
    """The server's first and only answer is a close frame with 1008 (no snapshot, no data)."""
    closed = ws.expect_close(timeout)
    assert closed.code == POLICY_VIOLATION, f"expected close 1008, got {closed}"


# -- 1008 ------------------------------------------------------------------------------------


def test_no_auth_within_5_s__closed_1008(stack, sockets):
    stack.account(uid())
    ws = sockets.balance()
    with pytest.raises(TimeoutError):
        ws.recv_raw(3.5)  # nothing is sent to an unauthenticated socket, nor is it closed
    assert_policy_close(ws, timeout=30)


@pytest.mark.parametrize("how", ["query", "auth_message"])
@pytest.mark.parametrize("bad", ["expired", "forged", "unsigned", "hs512", "garbage"])
def test_bad_token__closed_1008(stack, sockets, how, bad):
    user = uid()
    stack.account(user, 1_000)
    secret = stack.app.config["JWT_SECRET"]
    token = {"expired": lambda: stack.token(user, ttl=timedelta(seconds=-30)),
             "forged": lambda: forge(user),
             "unsigned": lambda: forge(user, secret=None, algorithm="none"),
             "hs512": lambda: forge(user, secret=secret, algorithm="HS512"),
             "garbage": lambda: "not.a.jwt"}[bad]()
    if how == "query":
        ws = sockets.balance(token=token)
    else:
        ws = sockets.balance()
        ws.send_json({"type": "auth", "token": token})
    assert_policy_close(ws)


@pytest.mark.parametrize("first", ['{"type": "hello"}', "ping", "not json",
                                   '{"type": "auth"}', '{"type": "auth", "token": 5}'])
def test_first_message_not_a_valid_auth__closed_1008(stack, sockets, first):
    ws = sockets.balance()
    ws.send(first)
    assert_policy_close(ws)


def test_user_token_on_admin_socket__closed_1008(stack, sockets):
    user = uid()
    stack.account(user, 1_000)
    assert_policy_close(sockets.admin(token=stack.token(user)))
    ws = sockets.admin()
    ws.send_json({"type": "auth", "token": stack.token(user)})
    assert_policy_close(ws)
    assert_policy_close(sockets.admin(token=forge(user)))


def test_bad_since_seq__closed_1008(stack, sockets):
    user = uid()
    stack.account(user, 1_000)
    for since in ("-1", "abc", "1e3", "\u00b2", "\u0661\u0662", "1" * 19, " 1"):
        assert_policy_close(sockets.balance(token=stack.token(user), since=since))


def test_rejected_socket_gets_nothing_and_others_keep_flowing(stack, sockets):
    user = uid()
    stack.account(user, 10_000)
    good = sockets.balance(token=stack.token(user))
    assert good.recv()["type"] == "snapshot"
    assert_policy_close(sockets.balance(token=forge(user)))
    stack.purchase(user, 10)
    assert [m["seq"] for m in updates(good.collect(has_seq(2), timeout=15))] == [2]


# -- admin feed ------------------------------------------------------------------------------


def test_admin_feed__every_users_update_and_alerts(stack, sockets):
    admin = sockets.admin(token=stack.token("ops-1", admin=True))
    assert admin.recv() == {"type": "hello", "role": "admin"}
    admin.send("ping")
    assert admin.recv_raw(5) == "pong"

    alice, bob = uid("adm-a"), uid("adm-b")
    expected = set()
    for user in (alice, bob):
        stack.account(user, 100_000)
        expected.add((user, 1))
    for user, cost in [(alice, 10), (bob, 20), (alice, 30), (bob, 40)]:
        stack.purchase(user, cost)
    expected |= {(alice, 2), (alice, 3), (bob, 2), (bob, 3)}
    large = stack.purchase(alice, LARGE_DEBIT_CENTS + 1)["transaction"]
    expected.add((alice, 4))

    def complete(got):
        seen = {(m["transaction"]["user_id"], m["seq"]) for m in updates(got)}
        return expected <= seen and any(m.get("type") == "alert" for m in got)

    got = admin.collect(complete, timeout=20)
    stack.quiesce()
    got += stack.rest(admin)
    mine = [m for m in updates(got) if m["transaction"]["user_id"] in (alice, bob)]
    for message in mine:
        check_update(message, message["transaction"]["user_id"])
    pairs = [(m["transaction"]["user_id"], m["seq"]) for m in mine]
    assert sorted(pairs) == sorted(expected), f"each transaction once: {pairs}"
    alerts = [m["alert"] for m in got if m.get("type") == "alert"]
    assert [(a["rule"], a["user_id"], a["transaction_id"]) for a in alerts] == [
        ("large_deduction", alice, large["id"])], alerts
    assert {m["type"] for m in got} == {"balance_update", "alert"}, summarize(got)


def test_admin_feed__alert_not_sent_to_users(stack, sockets):
    user = uid()
    stack.account(user, 100_000)
    stack.quiesce()
    ws = sockets.balance(token=stack.token(user))
    assert ws.recv()["type"] == "snapshot"
    stack.purchase(user, LARGE_DEBIT_CENTS + 5)
    got = ws.collect(has_seq(2), timeout=15)
    stack.quiesce()
    got += stack.rest(ws, user)
    assert "alert" not in {m["type"] for m in got}, summarize(got)


# -- logs ------------------------------------------------------------------------------------


def test_token_in_query__never_in_gunicorn_logs(stack, sockets):
    """Tokens passed as ?token= (accepted, rejected, or on plain HTTP) reach no log line."""
    user = uid("log")
    stack.account(user, 1_000)
    good, expired = stack.token(user), stack.token(user, ttl=timedelta(seconds=-5))
    forged, admin = forge(user), stack.token("ops-2", admin=True)
    ws = sockets.balance(token=good, since=0)
    assert ws.recv()["type"] == "snapshot"
    ws.close()
    assert_policy_close(sockets.balance(token=expired))
    assert_policy_close(sockets.balance(token=forged))
    assert_policy_close(sockets.admin(token=good))
    assert_policy_close(sockets.balance(token=good, since="x"))
    adm = sockets.admin(token=admin)
    assert adm.recv()["type"] == "hello"
    adm.close()
    # Plain HTTP with the token in the query: these do reach the access log (path only).
    for path in ("/ws/balance", "/healthz", "/api/wallet/balance", "/nowhere"):
        requests.get(f"{stack.base}{path}?token={good}&since_seq=0", timeout=10)
    time.sleep(1.0)  # gunicorn writes its access log after the response

    access = stack.access_log.read_text()
    assert '"GET /healthz HTTP/1.1"' in access and '"GET /nowhere HTTP/1.1"' in access, (
        "access log does not have the requests; the check below would prove nothing")
    logs = stack.logs() + stack.worker_proc.output()
    secrets = [good, expired, forged, admin] + stack.tokens
    for token in secrets:
        for part in {token, token.rsplit(".", 1)[-1]}:  # whole token, or its signature
            assert part not in logs, "a token reached a log line: " + next(
                line for line in logs.splitlines() if part in line)
    assert "token=" not in logs, next(line for line in logs.splitlines() if "token=" in line)
