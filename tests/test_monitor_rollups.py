"""The monitor on its roll-ups (shared/rollups.py) against a plain SQL aggregate over the raw
rows: random data written by plain SQL (back-dated rows too), random windows that cut
buckets, empty windows, before, during and after the roll-up job; UPDATE and DELETE by
plain SQL; a transaction that commits a lower id after a higher one (PostgreSQL)."""
from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

pytestmark = pytest.mark.smoke

TYPES = ("credit", "sms_purchase", "verification_refund", "adjustment")
NOW = datetime(2026, 3, 4, 12, 30, 17, 250000, tzinfo=timezone.utc)
FIGURES = ("total_transactions", "credits_added_cents", "credits_spent_cents",
           "refunds_issued_cents", "unique_users", "by_type")


def _bind(value: datetime):
    """A time as plain SQL would write it: on SQLite the text SQLAlchemy stores (naive UTC,
    always with microseconds, so text order is time order)."""
    from shared.db import db
    from shared.models import Transaction

    dialect = db.session.get_bind().dialect
    value = Transaction.__table__.c.created_at.type.process_bind_param(value, dialect)
    return value.strftime("%Y-%m-%d %H:%M:%S.%f") if dialect.name == "sqlite" else value


def _read_time(value) -> datetime:
    value = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


class Ledger:
    """Accounts and transactions written by plain SQL, seq in insertion order per account."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.seq: dict[str, int] = {}

    def add(self, user_id: str, times: list[datetime]) -> None:
        from shared.db import db

        if user_id not in self.seq:
            self.seq[user_id] = 0
            db.session.execute(text(
                "INSERT INTO accounts (user_id, balance_cents, currency, last_seq,"
                " low_balance_threshold_cents, created_at, updated_at)"
                " VALUES (:u, 0, 'USD', 0, 0, :t, :t)"), {"u": user_id, "t": _bind(NOW)})
        for at in times:
            kind = self.rng.choice(TYPES)
            amount = self.rng.randint(1, 999) * (-1 if kind == "sms_purchase" else 1)
            if kind == "adjustment" and self.rng.random() < .5:
                amount = -amount
            self.seq[user_id] += 1
            db.session.execute(text(
                "INSERT INTO transactions (user_id, seq, amount_cents, balance_after_cents,"
                " type, status, created_at) VALUES (:u, :s, :a, 0, :k, 'completed', :t)"),
                {"u": user_id, "s": self.seq[user_id], "a": amount, "k": kind,
                 "t": _bind(at)})
        db.session.commit()

    def random(self, n_users: int, n_max: int, span: timedelta, prefix: str = "u") -> None:
        for i in range(n_users):
            n = self.rng.randrange(0, n_max)
            self.add(f"{prefix}-{i}", sorted(
                NOW - timedelta(microseconds=self.rng.randrange(int(span.total_seconds() * 1e6)))
                for _ in range(n)))


def _reference(minutes: int, now: datetime) -> dict:
    """The monitor's figures and non-empty series buckets, by plain SQL over the raw rows."""
    from shared import history
    from shared.db import db

    cutoff = {"c": _bind(now - timedelta(minutes=minutes))}
    q = db.session.execute
    n, added, spent, refunds, users = q(text(
        "SELECT count(*),"
        " coalesce(sum(CASE WHEN type = 'credit' THEN amount_cents ELSE 0 END), 0),"
        " coalesce(sum(CASE WHEN type = 'sms_purchase' THEN -amount_cents ELSE 0 END), 0),"
        " coalesce(sum(CASE WHEN type = 'verification_refund' THEN amount_cents ELSE 0 END), 0),"
        " count(DISTINCT user_id) FROM transactions WHERE created_at >= :c"), cutoff).one()
    by_type = dict(q(text("SELECT type, count(*) FROM transactions WHERE created_at >= :c"
                          " GROUP BY type"), cutoff).all())
    width = history.bucket_minutes(minutes) * 60
    buckets: dict[int, list[int]] = {}
    for kind, amount, at in q(text("SELECT type, amount_cents, created_at FROM transactions"
                                   " WHERE created_at >= :c"), cutoff).all():
        b = buckets.setdefault(int(_read_time(at).timestamp()) // width, [0, 0, 0, 0])
        b[0] += 1
        b[1] += amount if kind == "credit" else 0
        b[2] += -amount if kind == "sms_purchase" else 0
        b[3] += amount if kind == "verification_refund" else 0
    db.session.commit()  # no transaction left open (SQLite: the job needs the write lock)
    return {"total_transactions": n, "credits_added_cents": int(added),
            "credits_spent_cents": int(spent), "refunds_issued_cents": int(refunds),
            "unique_users": users, "by_type": by_type, "buckets": buckets}


def _check(minutes: int, now: datetime) -> dict:
    from shared import history
    from shared.db import db

    got = history.monitor(minutes=minutes, now=now)
    db.session.commit()
    want = _reference(minutes, now)
    for key in FIGURES:
        assert got[key] == want[key], (minutes, now, key)
    width = history.bucket_minutes(minutes) * 60
    assert got["bucket_minutes"] * 60 == width
    series = {int(datetime.fromisoformat(b["start"]).timestamp()) // width:
              [b["transactions"], b["credits_added_cents"], b["credits_spent_cents"],
               b["refunds_issued_cents"]] for b in got["series"]}
    assert len(series) == len(got["series"])  # one entry per bucket
    assert {b: v for b, v in series.items() if v != [0, 0, 0, 0]} == want["buckets"], minutes
    cutoff = now - timedelta(minutes=minutes)
    assert min(series) == int(cutoff.timestamp()) // width
    assert sorted(series) == list(range(min(series), max(series) + 1))  # no holes
    assert max(series) >= int(now.timestamp()) // width
    return got


def _windows(rng: random.Random):
    """Windows of every series width, cutoffs on and off minute and hour boundaries."""
    on_minute = NOW.replace(second=0, microsecond=0)
    on_hour = NOW.replace(minute=0, second=0, microsecond=0)
    fixed = [(1, NOW), (7, NOW), (60, NOW), (60, on_hour), (61, on_minute), (180, NOW),
             (181, NOW), (1440, on_hour), (1441, NOW), (10080, NOW), (10080, on_hour),
             (4321, on_minute + timedelta(minutes=17))]
    drawn = [(rng.randint(1, 10080),
              NOW - timedelta(seconds=rng.randrange(0, 7200), microseconds=rng.randrange(10**6)))
             for _ in range(10)]
    return fixed + drawn


def _state():
    from shared.db import db

    row = db.session.execute(text(
        "SELECT watermark_id, pending_id FROM monitor_rollup_state WHERE id = 1")).first()
    db.session.commit()
    return tuple(row) if row else (0, None)


def test_figures_equal_sql_before_during_and_after_the_job(ctx):
    from shared import rollups
    from shared.db import db

    rng = random.Random(14)
    ledger = Ledger(rng)
    ledger.random(12, 80, timedelta(days=8))
    # rows exactly on the boundaries the fixed windows cut at, and on other minutes and hours
    ledger.add("edge", sorted([now - timedelta(minutes=m) for m, now in _windows(rng)[:12]]
                              + [NOW.replace(second=0, microsecond=0) - timedelta(minutes=m)
                                 for m in rng.sample(range(10080), 40)]
                              + [NOW.replace(minute=0, second=0, microsecond=0)
                                 - timedelta(hours=h) for h in range(0, 170, 13)]))
    for minutes, now in _windows(rng):  # nothing rolled up: all raw
        _check(minutes, now)
    rollups.catch_up()
    top = db.session.scalar(text("SELECT max(id) FROM transactions"))
    db.session.commit()
    assert _state()[0] == top
    for minutes, now in _windows(rng):  # all from the roll-ups but the cut minutes
        _check(minutes, now)
    # More rows, some back-dated into buckets already rolled up, some in the future, and
    # new accounts; checked with none of them rolled up, after one pass, after catching up.
    ledger.random(5, 40, timedelta(days=8), prefix="late")
    ledger.add("u-0", [NOW - timedelta(days=6, seconds=3), NOW - timedelta(minutes=59, seconds=1),
                       NOW + timedelta(minutes=3)])
    for minutes, now in _windows(rng):
        _check(minutes, now)
    rollups.run()
    for minutes, now in _windows(rng):
        _check(minutes, now)
    rollups.catch_up()
    assert _state()[0] == db.session.scalar(text("SELECT max(id) FROM transactions"))
    db.session.commit()
    for minutes, now in _windows(rng):
        _check(minutes, now)


def test_small_chunks_and_repeated_runs_count_each_row_once(ctx, monkeypatch):
    from shared import rollups

    rng = random.Random(5)
    ledger = Ledger(rng)
    ledger.random(6, 60, timedelta(days=2))
    monkeypatch.setattr(rollups, "CHUNK_IDS", 7)
    for _ in range(3):
        rollups.run()
        _check(10080, NOW)
        _check(90, NOW)
    rollups.catch_up(passes=8)
    for _ in range(3):  # nothing new: the roll-ups do not move
        rollups.run()
        for minutes, now in _windows(rng):
            _check(minutes, now)


def test_empty_windows_are_zero_before_and_after_the_job(ctx, client, api):
    from shared import rollups

    _check(5, NOW)
    _check(10080, NOW)
    rollups.catch_up()
    _check(60, NOW)
    Ledger(random.Random(1)).add("old", [NOW - timedelta(days=9), NOW - timedelta(days=8)])
    rollups.catch_up()
    for minutes in (1, 60, 1440, 10080):
        got = _check(minutes, NOW)
        assert got["total_transactions"] == 0 and got["unique_users"] == 0
        assert got["by_type"] == {} and got["recent_transactions"] == []
    body = client.get("/api/admin/transactions/monitor?minutes=10080",
                      headers=api.admin()).get_json()
    assert body["total_transactions"] == 0 and len(body["series"]) in (168, 169)


def test_update_and_delete_by_plain_sql_are_recomputed(ctx):
    from shared import rollups
    from shared.db import db

    rng = random.Random(8)
    ledger = Ledger(rng)
    ledger.random(8, 50, timedelta(days=7))
    rollups.catch_up()
    ids = [i for (i,) in db.session.execute(text("SELECT id FROM transactions ORDER BY id"))]
    gone = rng.sample(ids, 10)
    db.session.execute(text(f"DELETE FROM transactions WHERE id IN ({', '.join(map(str, gone))})"))
    moved = rng.sample([i for i in ids if i not in gone], 10)
    for i in moved:
        db.session.execute(text("UPDATE transactions SET created_at = :t, amount_cents = 5"
                                " WHERE id = :i"),
                           {"t": _bind(NOW - timedelta(seconds=rng.randrange(86400 * 7))),
                            "i": i})
    # every row of one account deleted: it leaves unique_users
    db.session.execute(text("DELETE FROM transactions WHERE user_id = 'u-3'"))
    db.session.commit()
    rollups.catch_up()
    assert db.session.scalar(text("SELECT count(*) FROM monitor_rollup_dirty")) == 0
    db.session.commit()
    for minutes, now in _windows(rng):
        _check(minutes, now)


def test_inserts_write_nothing_for_the_monitor(app, api):
    """The purchase path pays nothing: no trigger on INSERT, the roll-ups move only with the
    job."""
    from shared import rollups
    from shared.db import db

    api.account("p1", 5000)  # the requests in their own app context (SQLite: their session
    api.purchase("p1", 150, vid="pv1")  # must not hold the write lock the ledger takes)
    with app.app_context():
        counts = [db.session.scalar(text(f"SELECT count(*) FROM {table}"))
                  for table in ("monitor_rollups", "monitor_user_last", "monitor_rollup_dirty")]
        db.session.commit()
        assert counts == [0, 0, 0]
        rollups.catch_up()
        got = _check(60, datetime.now(timezone.utc))
        assert got["total_transactions"] == 2 and got["unique_users"] == 1
        assert db.session.scalar(text("SELECT sum(n) FROM monitor_rollups"
                                      " WHERE grain_s = 60")) == 2
        db.session.commit()


def test_beat_runs_the_job_every_30_s_on_a_short_queue():
    from worker_service.celery_app import celery_config

    conf = celery_config({"REDIS_URL": "redis://127.0.0.1:1/0"})
    entry = [e for e in conf["beat_schedule"].values()
             if e["task"] == "txmon.reconcile.monitor_rollups"]
    assert entry and entry[0]["schedule"] == 30.0
    assert conf["task_routes"]["txmon.reconcile.monitor_rollups"]["queue"] != "reconcile"


def test_a_lower_id_committed_late_is_not_skipped(ctx, database_url):
    """PostgreSQL: a transaction takes an id, a later one commits a higher id first; the
    watermark must wait for the first, or its row would never be rolled up."""
    from shared import rollups
    from shared.db import db

    if db.engine.dialect.name != "postgresql":
        pytest.skip("SQLite writers hold the write lock: ids commit in order")
    ledger = Ledger(random.Random(2))
    ledger.add("early", [NOW - timedelta(days=3)])
    ledger.add("late", [NOW - timedelta(days=3)])
    slow = db.engine.connect()
    try:
        tx = slow.begin()
        slow.execute(text(
            "INSERT INTO transactions (user_id, seq, amount_cents, balance_after_cents, type,"
            " status, created_at) VALUES ('early', 2, 777, 0, 'credit', 'completed', :t)"),
            {"t": NOW - timedelta(days=2)})
        slow_id = slow.scalar(text("SELECT max(id) FROM transactions"))
        ledger.add("late", [NOW - timedelta(days=1)])  # a higher id, committed first
        top = db.session.scalar(text("SELECT max(id) FROM transactions"))
        db.session.commit()
        assert top > slow_id
        for _ in range(5):
            rollups.run()
            assert _state()[0] < slow_id
            _check(10080, NOW)
        tx.commit()
    finally:
        slow.close()
    _check(10080, NOW)  # committed, above the watermark: read raw
    rollups.catch_up()
    assert _state()[0] >= top
    got = _check(10080, NOW)
    assert got["credits_added_cents"] >= 777


def test_open_transactions_that_write_no_transactions_do_not_hold_the_watermark(ctx):
    """PostgreSQL: only writers of ``transactions`` are waited for; a transaction open
    elsewhere (here one writing an account row, holding a transaction id) is not."""
    from shared import rollups
    from shared.db import db

    if db.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's watermark wait")
    Ledger(random.Random(4)).random(3, 30, timedelta(days=2))
    other = db.engine.connect()
    try:
        tx = other.begin()
        other.execute(text("UPDATE accounts SET display_name = 'busy' WHERE user_id = 'u-0'"))
        assert other.scalar(text("SELECT pg_current_xact_id_if_assigned()")) is not None
        top = db.session.scalar(text("SELECT max(id) FROM transactions"))
        db.session.commit()
        result = rollups.run()
        assert result["watermark_id"] == top and result["waiting_for"] is None
        _check(10080, NOW)
        tx.rollback()
    finally:
        other.close()


def _date_ranges(rng: random.Random):
    """(type, start, end) filters: open ends, on and off hour boundaries, inside one hour,
    empty, with other time-zone offsets than UTC."""
    on_hour = NOW.replace(minute=0, second=0, microsecond=0)
    plus14 = timezone(timedelta(hours=14))
    fixed = [(None, NOW - timedelta(days=3), None), (None, None, NOW - timedelta(days=2)),
             ("credit", on_hour - timedelta(hours=30), on_hour - timedelta(hours=2)),
             (None, on_hour - timedelta(minutes=40), on_hour - timedelta(minutes=10)),
             ("sms_purchase", NOW - timedelta(days=1), NOW - timedelta(days=1)),
             (None, (NOW - timedelta(hours=50)).astimezone(plus14), NOW.astimezone(plus14)),
             ("adjustment", NOW + timedelta(days=1), NOW + timedelta(days=2))]
    drawn = []
    for _ in range(12):
        a, b = sorted(NOW - timedelta(seconds=rng.randrange(0, 8 * 86400),
                                      microseconds=rng.randrange(10**6)) for _ in range(2))
        drawn.append((rng.choice((None,) + TYPES), a, b))
    return fixed + drawn


def _check_totals(users, rng, stage="") -> None:
    from shared import history
    from shared.db import db

    for user in users:
        for kind, start, end in _date_ranges(rng):
            got = history._total(user, kind, start, end)
            q = "SELECT count(*) FROM transactions WHERE user_id = :u"
            args = {"u": user}
            if kind:
                q += " AND type = :k"
                args["k"] = kind
            if start:
                q += " AND created_at >= :s"
                args["s"] = _bind(start)
            if end:
                q += " AND created_at <= :e"
                args["e"] = _bind(end)
            want = db.session.scalar(text(q), args)
            db.session.commit()
            assert got == want, (stage, user, kind, start, end)


def test_date_filtered_history_totals_equal_sql_before_and_after_the_job(ctx):
    """Totals with a date filter read whole hours from account_hour_counts: exact against
    SQL with nothing rolled up, after the job, with back-dated rows above the watermark, and
    after UPDATE and DELETE by plain SQL."""
    from shared import rollups
    from shared.db import db

    rng = random.Random(21)
    ledger = Ledger(rng)
    ledger.random(4, 120, timedelta(days=8))
    on_hour = NOW.replace(minute=0, second=0, microsecond=0)
    ledger.add("edge", sorted([on_hour - timedelta(hours=h) for h in range(0, 60, 7)]
                              + [on_hour - timedelta(hours=2, microseconds=1)]))
    users = ["u-0", "u-1", "u-2", "u-3", "edge", "nobody"]
    _check_totals(users, rng, "raw")
    rollups.catch_up()
    _check_totals(users, rng, "rolled")
    ledger.add("u-1", [NOW - timedelta(days=5), on_hour - timedelta(hours=30)])  # above the mark
    _check_totals(users, rng, "above")
    db.session.execute(text("DELETE FROM transactions WHERE id IN"
                            " (SELECT id FROM transactions WHERE user_id = 'u-0' LIMIT 5)"))
    db.session.execute(text("UPDATE transactions SET created_at = :t, type = 'credit'"
                            " WHERE user_id = 'u-2'"), {"t": _bind(on_hour - timedelta(hours=9))})
    db.session.commit()
    rollups.catch_up()
    _check_totals(users, rng, "recomputed")
