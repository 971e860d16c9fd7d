"""/ws/balance under gunicorn (gevent) with the real outbox relay: DESIGN.md "Realtime".

snapshot -> replay of seq > since_seq -> live balance_update/notification, every seq once and
in order (also for updates committed while the replay runs), both ways to authenticate,
privacy between users, push preferences, ping/pong.
"""
from __future__ import annotations

import json
import random
import threading
import time

import pytest

from tests.support.stack import (Closed, Reader, check_contiguous, check_update, compress, has_seq,
                              notifications, running_stack, seqs, summarize, uid, updates,
                              wait_until)


@pytest.fixture(scope="module")
def stack(app, database_url, tmp_path_factory):
    with running_stack(app, database_url, tmp_path_factory, "ws-stream",
                       env={"TXMON_ALERT_RAPID_COUNT": "100000"}) as s:
        yield s


@pytest.fixture(autouse=True)
def _settled(stack):
    """Let the worker finish this test's tasks before the next test truncates the tables."""
    yield
    stack.quiesce()


def test_query_token__snapshot_then_replay_then_live_in_seq_order(stack, sockets):
    user = uid()
    stack.account(user, 100_000)  # seq 1
    stack.set_preferences(user, push_on_debit=True)
    before = [stack.purchase(user, cost)["transaction"] for cost in (101, 102, 103)]  # 2..4
    stack.quiesce()  # their notifications are pushed (to nobody) before we connect

    ws = sockets.balance(token=stack.token(user), since=1)
    snapshot = ws.recv()
    assert snapshot == {"type": "snapshot", "balance_cents": stack.balance(user)["balance_cents"],
                        "seq": 4}
    replay = [ws.recv() for _ in range(3)]
    assert [m["type"] for m in replay] == ["balance_update"] * 3, summarize(replay)
    for message, tx in zip(replay, before):
        check_update(message, user)
        assert message["transaction"] == tx
    assert [m["seq"] for m in replay] == [2, 3, 4]

    live_tx = [stack.purchase(user, cost)["transaction"] for cost in (201, 202, 203)]  # 5..7
    live = ws.collect(lambda got: has_seq(7)(got) and len(notifications(got)) >= 3, timeout=15)
    live += stack.rest(ws, user)  # nothing more may come: no duplicate, no stray message

    for message in updates(live):
        check_update(message, user)
    check_contiguous(replay + live, 2, 7)
    assert [m["transaction"] for m in updates(live)] == live_tx
    assert updates(live)[-1]["balance_cents"] == stack.balance(user)["balance_cents"]
    pushed = notifications(live)
    assert sorted(n["transaction_id"] for n in pushed) == sorted(t["id"] for t in live_tx), (
        f"one notification per live purchase expected, got {pushed}")
    assert {n["type"] for n in pushed} == {"credit_deducted"}
    assert {m["type"] for m in live} == {"balance_update", "notification"}, summarize(live)


def test_without_since_seq__snapshot_then_only_new_updates(stack, sockets):
    user = uid()
    stack.account(user, 10_000)
    stack.purchase(user, 50)
    ws = sockets.balance(token=stack.token(user))
    assert ws.recv() == {"type": "snapshot", "balance_cents": 9_950, "seq": 2}
    stack.purchase(user, 70)
    got = ws.collect(has_seq(3), timeout=15) + stack.rest(ws, user)
    assert seqs(got) == [3], summarize(got)
    check_update(updates(got)[0], user)
    assert updates(got)[0]["balance_cents"] == 9_880


def test_since_seq_at_or_past_head__no_replay(stack, sockets):
    user = uid()
    stack.account(user, 10_000)
    stack.purchase(user, 50)
    stack.quiesce()  # the credit's notification is pushed before we connect
    for since in (2, 99):
        ws = sockets.balance(token=stack.token(user), since=since)
        assert ws.recv() == {"type": "snapshot", "balance_cents": 9_950, "seq": 2}
        assert stack.rest(ws, user) == []


def test_auth_message__snapshot_replay_and_live_like_query_token(stack, sockets):
    user = uid()
    stack.account(user, 5_000)
    stack.purchase(user, 10)
    ws = sockets.balance(since=0)
    ws.send_json({"type": "auth", "token": stack.token(user)})
    assert ws.recv() == {"type": "snapshot", "balance_cents": 4_990, "seq": 2}
    got = ws.collect(has_seq(2), timeout=10)
    stack.purchase(user, 20)
    got += ws.collect(has_seq(3), timeout=15) + stack.rest(ws, user)
    check_contiguous(got, 1, 3)
    for message in updates(got):
        check_update(message, user)


def test_ping__answered_pong_and_stream_continues(stack, sockets):
    user = uid()
    stack.account(user, 1_000)
    stack.quiesce()  # the credit's notification is pushed before we connect
    ws = sockets.balance(token=stack.token(user))
    assert ws.recv()["type"] == "snapshot"
    for _ in range(3):
        ws.send("ping")
        assert ws.recv_raw(5) == "pong"
    stack.purchase(user, 10)
    assert seqs(ws.collect(has_seq(2), timeout=15)) == [2]
    ws.send("ping")
    assert ws.recv_raw(5) == "pong"


def test_ping_burst__every_ping_answered_in_order(stack, sockets):
    """Client input wakes the socket's one queue (no reader thread per socket): a burst of
    pings, sent before any is answered, still gets one pong each and the stream goes on."""
    user = uid()
    stack.account(user, 1_000)
    stack.quiesce()
    ws = sockets.balance(token=stack.token(user))
    assert ws.recv()["type"] == "snapshot"
    for _ in range(200):
        ws.send("ping")
    assert [ws.recv_raw(5) for _ in range(200)] == ["pong"] * 200
    stack.purchase(user, 10)
    assert seqs(ws.collect(has_seq(2), timeout=15)) == [2]


def test_client_gone__server_frees_the_socket(stack, sockets):
    """A client that closes, or just vanishes (TCP closed, no close frame), is noticed
    without anything to send to it: websocket_connections falls back."""
    user = uid()
    stack.account(user, 1_000)
    stack.quiesce()
    base = stack.metric("websocket_connections")
    polite, vanishing, staying = (sockets.balance(token=stack.token(user)) for _ in range(3))
    for ws in (polite, vanishing, staying):
        assert ws.recv()["type"] == "snapshot"
    assert stack.metric("websocket_connections") == base + 3
    polite.close()
    vanishing.ws.sock.close()  # no close frame
    wait_until(lambda: stack.metric("websocket_connections") == base + 1, 10, interval=0.2,
               message="the two departed sockets freed")
    stack.purchase(user, 10)
    assert seqs(staying.collect(has_seq(2), timeout=15)) == [2]


def test_push_preference_off__balance_update_without_notification(stack, sockets):
    user = uid()
    stack.account(user, 1_000)  # defaults: push_on_debit off, push_on_credit on
    stack.quiesce()
    ws = sockets.balance(token=stack.token(user))
    assert ws.recv()["type"] == "snapshot"
    stack.purchase(user, 10)
    got = ws.collect(has_seq(2), timeout=15)
    stack.quiesce()
    got += stack.rest(ws, user)
    assert [m["type"] for m in got] == ["balance_update"], summarize(got)

    credit = stack.credit(user, 500)["transaction"]
    got = ws.collect(lambda g: has_seq(3)(g) and notifications(g), timeout=15)
    got += stack.rest(ws, user)
    assert [n["transaction_id"] for n in notifications(got)] == [credit["id"]]
    assert notifications(got)[0]["type"] == "credit_added"


def test_privacy__a_user_never_receives_another_users_messages(stack, sockets):
    alice, bob = uid("pa"), None
    bob = alice + "-b"  # alice's id is a prefix of bob's: routing must match whole ids
    for user in (alice, bob):
        stack.account(user, 50_000)
        stack.set_preferences(user, push_on_debit=True)
    stack.quiesce()
    readers = {}
    for name, user, copies in (("alice", alice, 2), ("bob", bob, 1)):
        for i in range(copies):
            ws = sockets.balance(token=stack.token(user), since=0)
            readers[(name, i)] = (user, Reader(ws, lambda got: has_seq(6)(got)
                                               and len(notifications(got)) >= 5, timeout=30))
    tx_ids = {alice: set(), bob: set()}
    for i in range(5):
        for user in (alice, bob) if i % 2 else (bob, alice):
            tx_ids[user].add(stack.purchase(user, 10 + i)["transaction"]["id"])
    for key, (user, reader) in readers.items():
        got = reader.result()
        got += stack.rest(reader.client, user)
        assert reader.closed is None, f"{key} closed: {reader.closed}"
        assert got[0]["type"] == "snapshot"
        for message in updates(got):
            check_update(message, user)  # transaction.user_id is the socket's user
        check_contiguous(got, 1, 6)
        pushed = notifications(got)
        assert {n["transaction_id"] for n in pushed} == tx_ids[user], (key, pushed)
        assert len(pushed) == 5, (key, pushed)


def test_updates_racing_the_replay__every_seq_exactly_once(stack, sockets):
    """Clients connect (since_seq=0 and >0) while purchases commit: replay and live meet
    without a gap or a duplicate, and the last update is the API's balance."""
    user, purchases, threads = uid("race"), 240, 4
    stack.account(user, 1_000_000)  # seq 1
    final_seq = 1 + purchases
    costs = [random.randint(1, 99) for _ in range(purchases)]
    done, errors = [0], []
    lock = threading.Lock()

    def buy(share):
        try:
            for cost in share:
                stack.purchase(user, cost)
                with lock:
                    done[0] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=buy, args=(costs[i::threads],), daemon=True)
               for i in range(threads)]
    for w in workers:
        w.start()
    readers = []
    for at, since in ((20, 0), (70, 0), (110, 25), (160, 0)):
        deadline = time.monotonic() + 30
        while done[0] < at and time.monotonic() < deadline and not errors:
            time.sleep(0.002)
        ws = sockets.balance(token=stack.token(user), since=since)
        readers.append((since, done[0], Reader(ws, has_seq(final_seq), timeout=60)))
    for w in workers:
        w.join(60)
    assert not errors, errors[0]
    assert not any(w.is_alive() for w in workers)
    balance = stack.balance(user)
    assert balance["balance_cents"] == 1_000_000 - sum(costs)

    by_seq = {}
    for since, at, reader in readers:
        got = reader.result()
        assert reader.closed is None, f"client since={since} closed: {reader.closed}"
        snapshot = got[0]
        assert snapshot["type"] == "snapshot", summarize(got)
        assert since < snapshot["seq"] < final_seq or at >= purchases, (
            f"client connected after {at} purchases was not mid-stream: {snapshot}")
        got += stack.rest(reader.client, user)
        assert seqs(got) == list(range(since + 1, final_seq + 1)), (
            f"client since={since} (connected after {at} purchases, snapshot seq "
            f"{snapshot['seq']}) got seqs {compress(seqs(got))}")
        check_contiguous(got, since + 1, final_seq)
        for message in updates(got):
            check_update(message, user)
            assert by_seq.setdefault(message["seq"], message["transaction"]) == \
                message["transaction"], "two clients saw different transactions for one seq"
        assert updates(got)[-1]["balance_cents"] == balance["balance_cents"]


def test_lagging_client__reads_only_whole_frames_then_a_close(stack, sockets):
    """A client that reads, but slower than its messages come (a phone on a poor link), must
    get intact messages and then a close (1013, or the connection dropped) -- never a torn
    frame. Messages are the size of a balance_update (~600 bytes), published straight on the
    user's channel because the ledger cannot produce thousands per second."""
    user = uid("lag")
    stack.account(user, 1_000)
    stack.quiesce()
    ws = sockets.balance(token=stack.token(user), rcvbuf=4096)
    assert ws.recv()["type"] == "snapshot"
    redis_client, stop = stack.redis.client(), threading.Event()

    def flood():
        i = 0
        while not stop.is_set() and i < 40_000:
            pipe = redis_client.pipeline(transaction=False)
            for _ in range(20):
                pipe.publish(f"txmon:rt:user:{user}", json.dumps(
                    {"type": "notification", "notification": {"id": i, "pad": "z" * 550}}))
                i += 1
            pipe.execute()
            time.sleep(0.004)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    ids, ended = [], None
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ids.append(ws.recv(5)["notification"]["id"])
            if len(ids) % 10 == 0:
                time.sleep(0.01)  # the lag: about half the publishing rate
    except Closed as closed:
        ended = closed
    except Exception as exc:  # a torn frame
        ended = exc
    finally:
        stop.set()
        flooder.join(10)
        redis_client.close()
    assert isinstance(ended, Closed), (
        f"after {len(ids)} intact messages the client read a torn frame: {repr(ended)[:200]}")
    assert ended.code in (1013, None), ended
    assert ids == list(range(len(ids))), f"messages out of order or missing: {compress(ids)}"
