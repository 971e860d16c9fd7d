"""No client can stall the API: the slow-upload attack, oversized bodies, a database stopped
under purchase traffic, slow statements, /readyz and /metrics, gunicorn's own log lines and
a fresh process's first websocket (DESIGN.md, "HTTP contract", "Operations", "Realtime").

The attacks run against gunicorn as scripts/run serves it (gunicorn.conf.py, gevent).
"""
from __future__ import annotations

import ipaddress
import json
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import requests
from sqlalchemy import event, text

from tests.support import assert_error, start_gunicorn, wait_until
from tests.support.postgres import PostgresCluster

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def served(app, database_url, redis_server, tmp_path_factory):
    """One gunicorn (one gevent worker, the default two slots per pool) on the test database."""
    proc, base = start_gunicorn(app, database_url, tmp_path_factory.mktemp("hardening"),
                                workers=1, redis_url=redis_server.url(),
                                TXMON_WORKER_CLASS="gevent")
    yield proc, base
    proc.stop(grace=5)


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _purchase_json(user_id: str, **extra) -> dict:
    return {"user_id": user_id, "service_name": "WhatsApp", "country": "US", "cost_cents": 100,
            **extra}


def _raw(base: str, head: str, body: bytes = b"", *, closes: bool = True) -> tuple[int, dict]:
    """Send ``head`` (request line and headers) and ``body`` on a socket of its own; return
    (status, JSON body); with ``closes``, check that the server then closes the connection
    (it has not read the rest of the body, so it cannot serve another request on it)."""
    with socket.create_connection(("127.0.0.1", _port(base)), timeout=30) as s:
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = s.recv(65536)
            assert chunk, f"connection closed mid-response: {data!r}"
            data += chunk
        head_bytes, payload = data.split(b"\r\n\r\n", 1)
        if closes:
            try:
                assert s.recv(65536) == b"", "the connection stayed open"
            except ConnectionResetError:
                pass  # closed with the unread body still arriving: as good
    status = int(head_bytes.split(b" ", 2)[1])
    return status, json.loads(payload[:_length(data)])


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 1 << 30


# -- the slow-upload attack ----------------------------------------------------------------


class SlowUpload:
    """A user's request whose body arrives one byte at a time."""

    def __init__(self, base: str, token: str):
        self.sock = socket.create_connection(("127.0.0.1", _port(base)), timeout=60)
        self.sock.sendall((f"PUT /api/notifications/preferences HTTP/1.1\r\nHost: t\r\n"
                           f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                           f"Content-Length: 60000\r\n\r\n ").encode())

    def dribble(self) -> None:
        try:
            self.sock.sendall(b" ")
        except OSError:
            pass  # the server has given up on us: what it should do

    def answer(self) -> bytes:
        """The status line the server sent, or b"" when it dropped the connection."""
        try:
            return self.sock.recv(4096).split(b"\r\n", 1)[0]
        except OSError:
            return b""


def test_slow_uploads_hold_no_slot__the_main_apps_purchases_complete(served, api):
    """More slow uploads than all slots together (two pools of two), one byte every 2 s:
    the main app's purchases still complete, and each slow upload is cut off (408 or
    dropped) once its body deadline passes."""
    _, base = served
    api.account("victim", 10_000)
    token = api.token("attacker")
    attackers = [SlowUpload(base, token) for _ in range(12)]
    stop = threading.Event()

    def dribble():
        while not stop.wait(2):
            for a in attackers:
                a.dribble()

    pacer = threading.Thread(target=dribble, daemon=True)
    pacer.start()
    try:
        with requests.Session() as s:
            s.headers.update(api.service)
            for i in range(10):
                r = s.post(f"{base}/api/v1/verifications", timeout=30,
                           json=_purchase_json("victim", id=f"attack-{i}"))
                assert r.status_code == 201, r.text
        assert api.client.get("/api/v1/accounts/victim",
                              headers=api.service).get_json()["balance_cents"] == 9_000
        answers = [a.answer() for a in attackers]
    finally:
        stop.set()
        pacer.join(10)
        for a in attackers:
            a.sock.close()
    assert all(a == b"" or a.startswith(b"HTTP/1.1 408 ") for a in answers), answers


def test_large_exports_read_slowly_hold_no_slot__reads_and_purchases_meanwhile(served, api, app):
    """Three CSV exports of 20,000 rows each (more than the two user slots), each read one
    chunk and then left waiting: another user's reads and the main app's purchases are
    answered while every export is still open, and each export ends complete."""
    from shared.db import db

    _, base = served
    api.account("exporter", 0)
    api.account("reader", 10_000)
    with app.app_context(), db.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO transactions (user_id, seq, amount_cents, balance_after_cents, type,"
            " status, description, created_at) SELECT 'exporter', g, 1, g, 'credit',"
            " 'completed', 'bulk row ' || g, now() FROM generate_series(1, 20000) g"))
        conn.execute(text("UPDATE accounts SET balance_cents = 20000, last_seq = 20000"
                          " WHERE user_id = 'exporter'"))
    exporter = {"Authorization": f"Bearer {api.token('exporter')}"}
    reader = {"Authorization": f"Bearer {api.token('reader')}"}
    exports = [requests.get(f"{base}/api/wallet/transactions/export.csv", headers=exporter,
                            stream=True, timeout=30) for _ in range(3)]
    chunks = [e.raw.read(4096) for e in exports]  # started, then left unread
    assert all(e.status_code == 200 and c.startswith(b"id,seq,") for e, c in zip(exports, chunks))
    for i in range(3):
        r = requests.get(f"{base}/api/wallet/balance", headers=reader, timeout=30)
        assert r.status_code == 200 and r.json()["balance_cents"] == 10_000 - 100 * i, r.text
        r = requests.post(f"{base}/api/v1/verifications", headers=api.service, timeout=30,
                          json=_purchase_json("reader", id=f"during-export-{i}"))
        assert r.status_code == 201, r.text
    assert not any(e.raw.closed for e in exports)  # still streaming
    for export, chunk in zip(exports, chunks):
        body = chunk + export.raw.read()
        assert body.count(b"\n") == 20_001  # the header and every row
        export.close()


# -- oversized bodies ----------------------------------------------------------------------


def test_body_over_64_kib__413_before_it_is_read__nothing_changes(served, api):
    _, base = served
    api.account("big", 5_000)
    key = api.service["X-API-Key"]
    head = (f"POST /api/v1/verifications HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\n"
            "Content-Type: application/json")
    # 2 GB declared, a few bytes sent: refused at once, the connection closed unread.
    status, body = _raw(base, head + "\r\nContent-Length: 2147483648", b'{"user_id"')
    assert status == 413 and body["error"]["code"] == "payload_too_large", body
    assert body["error"]["details"] == {"limit_bytes": LIMIT}
    # Chunked (no length given): cut off at 64 KiB + 1 byte.
    padded = json.dumps(_purchase_json("big", id="big-chunked")).encode() + b" " * LIMIT
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(padded[i:i + 8192]), padded[i:i + 8192])
                      for i in range(0, len(padded), 8192)) + b"0\r\n\r\n"
    status, body = _raw(base, head + "\r\nTransfer-Encoding: chunked", chunks)
    assert status == 413 and body["error"]["code"] == "payload_too_large", body
    # One byte over, with a length: refused. Exactly the limit: served.
    for size, expected in ((LIMIT + 1, 413), (LIMIT, 201)):
        doc = json.dumps(_purchase_json("big", id=f"big-{size}")).encode()
        status, body = _raw(base, head + f"\r\nContent-Length: {size}",
                            doc + b" " * (size - len(doc)), closes=expected == 413)
        assert status == expected, body
    r = api.client.get("/api/v1/accounts/big/transactions", headers=api.service).get_json()
    assert [t["amount_cents"] for t in r["transactions"]] == [-100, 5_000]
    assert api.client.get("/api/v1/verifications/big-chunked",
                          headers=api.service).status_code == 404


# -- gunicorn's own log lines --------------------------------------------------------------


def test_gunicorn_error_path_never_logs_a_token(served, api):
    """gunicorn logs the request line of a request it rejects itself, query string and all."""
    proc, base = served
    token = api.token("leaky")
    with socket.create_connection(("127.0.0.1", _port(base)), timeout=10) as s:
        s.sendall(f"GET /ws/balance?token={token}\r\n\r\n".encode())  # no HTTP version
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    wait_until(lambda: "Invalid HTTP request line: 'GET /ws/balance?token=" in proc.output(),
               15, message=lambda: proc.tail())
    assert token not in proc.output()
    assert token.split(".")[1] not in proc.output()  # nor any part of it


# -- a fresh process's first websocket -----------------------------------------------------


def test_a_fresh_process_sends_its_first_socket_exactly_one_snapshot(app, database_url,
                                                                      tmp_path):
    from shared.realtime import user_channel
    from tests.support.stack import MARKER, Client, Stack

    fresh = Stack(app, database_url, tmp_path, web_workers=1)  # no Celery worker needed
    try:
        fresh.redis.start()
        fresh.start_api()
        fresh.account("first", 700)
        ws = Client(f"{fresh.ws_base}/ws/balance?token={fresh.token('first')}")
        got, marker = [], uuid.uuid4().hex
        r = fresh.redis.client()

        def marker_arrived():
            # Published on the user's channel after the socket synced; once it arrives,
            # everything the hub queued for the socket before it (a resync) has arrived too.
            r.publish(user_channel("first"), json.dumps(
                {"type": "notification", "notification": {MARKER: marker}}))
            try:
                got.append(ws.recv(1))
            except TimeoutError:
                pass
            return marker in ws.markers

        wait_until(marker_arrived, 30, interval=0, message=lambda: f"marker; got {got}")
        ws.close()
        r.close()
        assert [m for m in got if m["type"] == "snapshot"] == [
            {"type": "snapshot", "balance_cents": 700, "seq": 1}], got
    finally:
        fresh.stop()


# -- the database stopped under purchase traffic -------------------------------------------


def test_postgres_stopped_under_purchases__only_201_or_503__recovers_by_itself(
        app, redis_server, tmp_path):
    from flask_migrate import upgrade

    from api_service import create_app
    from shared.config import TestConfig

    cluster = PostgresCluster()
    proc = None
    try:
        cluster.start()
        url = cluster.create_database("txmon_outage")
        migrated = create_app(TestConfig(url, redis_server.url()).as_dict())
        with migrated.app_context():
            upgrade()
            from shared.db import db

            db.engine.dispose()
        proc, base = start_gunicorn(app, url, tmp_path, workers=1,
                                    redis_url=redis_server.url(), TXMON_WORKER_CLASS="gevent")
        service = {"X-API-Key": app.config["SERVICE_KEYS"][0]}
        assert requests.put(f"{base}/api/v1/accounts/o1", json={}, headers=service,
                            timeout=10).status_code == 201
        assert requests.post(f"{base}/api/v1/accounts/o1/credits", headers=service, timeout=10,
                             json={"amount_cents": 10**9, "payment_id": "p"}).status_code == 201
        answers: list[tuple[int, str | None]] = []
        created: list[str] = []
        stop = threading.Event()

        def buyer(n):
            with requests.Session() as s:
                s.headers.update(service)
                while not stop.is_set():
                    vid = f"o-{n}-{len(answers)}-{uuid.uuid4().hex[:6]}"
                    try:
                        r = s.post(f"{base}/api/v1/verifications", timeout=30,
                                   json=_purchase_json("o1", id=vid))
                    except requests.RequestException as exc:
                        answers.append((0, type(exc).__name__))
                        continue
                    code = r.json().get("error", {}).get("code") if r.status_code != 201 else None
                    answers.append((r.status_code, code))
                    if r.status_code == 201:
                        created.append(vid)

        def count(status):
            return sum(1 for a in answers if a[0] == status)

        def refused():
            return sum(1 for a in answers if a[0] != 201)

        def readyz():
            return requests.get(f"{base}/readyz", timeout=10).status_code

        with ThreadPoolExecutor(4) as pool:
            for n in range(4):
                pool.submit(buyer, n)
            try:
                wait_until(lambda: count(201) >= 20, 60, message="purchases before the outage")
                cluster.stop("immediate")
                wait_until(lambda: readyz() == 503, 30, message="/readyz 503 while down")
                wait_until(lambda: refused() >= 20, 60, message="purchases during the outage")
                before_restart = count(201)
                cluster.start()
                wait_until(lambda: count(201) >= before_restart + 20, 60,
                           message="purchases after the restart")
                wait_until(lambda: readyz() == 200, 30, message="/readyz 200 again")
            finally:
                stop.set()
        assert {a for a in answers if a[0] != 201} == {(503, "unavailable")}, sorted(
            set(answers))
        with psycopg.connect(url.replace("+psycopg", "")) as conn:
            stored = {row[0] for row in conn.execute("SELECT id FROM verifications")}
        # Every 201 is a committed purchase. (A 503 may be one too: committed as the server
        # died, before its answer left; the main app's retry with the same id gets 200.)
        assert set(created) <= stored
        output = proc.output()
        assert "Traceback" not in output, output[-4000:]
    finally:
        if proc is not None:
            proc.stop(grace=5)
        cluster.destroy()


# -- slow statements -----------------------------------------------------------------------


def test_a_statement_past_statement_timeout__cancelled__503(app, database_url, redis_server):
    """A purchase waiting on its account's row lock (held here) is cancelled by Postgres
    after TXMON_DB_STATEMENT_TIMEOUT_MS and answered 503, instead of hanging."""
    from api_service import create_app
    from shared.config import TestConfig, engine_options, normalize_database_url

    config = TestConfig(database_url, redis_server.url()).as_dict()
    config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(
        normalize_database_url(database_url), statement_timeout_ms=300)
    slow = create_app(config)
    client = slow.test_client()
    service = {"X-API-Key": slow.config["SERVICE_KEYS"][0]}
    assert client.put("/api/v1/accounts/locked", json={}, headers=service).status_code == 201
    assert client.post("/api/v1/accounts/locked/credits", headers=service,
                       json={"amount_cents": 500, "payment_id": "p"}).status_code == 201
    locker = psycopg.connect(database_url.replace("+psycopg", ""))
    try:
        locker.execute("SELECT 1 FROM accounts WHERE user_id = 'locked' FOR UPDATE")
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.post, "/api/v1/verifications", headers=service,
                                  json=_purchase_json("locked", id="locked-1"))
            try:
                r = waiting.result(timeout=30)
            finally:
                locker.rollback()  # a purchase that hangs (no timeout) is let go here
        assert_error(r, 503, "unavailable")
        assert "in time" in r.get_json()["error"]["message"]
    finally:
        locker.close()
    assert client.get("/api/v1/accounts/locked", headers=service).get_json()[
        "balance_cents"] == 500
    assert client.get("/api/v1/verifications/locked-1", headers=service).status_code == 404
    with slow.app_context():
        from shared.db import db

        db.engine.dispose()


# -- /readyz and /metrics ------------------------------------------------------------------


def test_readyz_answers_from_a_result_at_most_a_second_old(app, client, monkeypatch):
    from api_service.ops import Readiness
    from shared.db import db

    now = [1000.0]
    monkeypatch.setitem(app.extensions, "txmon_readiness", Readiness(clock=lambda: now[0]))
    checkouts = []
    with app.app_context():
        engine = db.engine
    listener = lambda *a: checkouts.append(1)  # noqa: E731
    event.listen(engine, "checkout", listener)
    try:
        for _ in range(20):
            assert client.get("/readyz").status_code == 200
        assert len(checkouts) == 1
        now[0] += 0.999
        assert client.get("/readyz").status_code == 200
        assert len(checkouts) == 1
        now[0] += 0.001  # one second old: checked again
        assert client.get("/readyz").get_json()["checks"] == {"database": "ok", "redis": "ok"}
        assert len(checkouts) == 2
    finally:
        event.remove(engine, "checkout", listener)


@pytest.mark.parametrize("address, allowed", [
    ("127.0.0.1", True), ("10.1.2.3", True), ("172.20.0.5", True), ("192.168.7.8", True),
    ("::1", True), ("::ffff:192.168.1.1", True),
    ("203.0.113.9", False), ("172.32.0.1", False), ("2001:db8::1", False)])
def test_metrics_only_to_allowed_networks__default_loopback_and_private(
        client, address, allowed):
    r = client.get("/metrics", environ_base={"REMOTE_ADDR": address})
    if allowed:
        assert r.status_code == 200 and b"transactions_total" in r.data
    else:
        assert_error(r, 404, "not_found")
        assert b"transactions_total" not in r.data


def test_metrics_allow_is_a_cidr_list(app, client, monkeypatch):
    from shared.config import Config, ConfigError

    monkeypatch.setenv("TXMON_METRICS_ALLOW", "198.51.100.0/24, 2001:db8::/32")
    networks = Config().METRICS_ALLOW
    assert networks == (ipaddress.ip_network("198.51.100.0/24"),
                        ipaddress.ip_network("2001:db8::/32"))
    monkeypatch.setitem(app.config, "METRICS_ALLOW", networks)
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "198.51.100.7"}).status_code == 200
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "2001:db8::5"}).status_code == 200
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code == 404
    monkeypatch.setenv("TXMON_METRICS_ALLOW", "10.0.0.0/8,not-a-network")
    with pytest.raises(ConfigError, match="TXMON_METRICS_ALLOW"):
        Config()
