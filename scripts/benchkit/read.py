"""``scripts/bench read``: the read side at scale. One account with 1,000,000 transactions and
2,000 accounts with 500 each, spread over 7 days (``--scale`` shrinks the big account and the
number of small ones; a small account keeps 500), written in SQL with one notification per
transaction. Then, through the API of the running stack, side by side: history pages (first,
cursor half-way, type + start_date, skip half-way), the account timeline and the CSV's first
byte for the big account vs a 500-row one, and the admin monitor over 7 days vs 60 minutes
(after beat's roll-up job caught up; the 7-day monitor before it, on raw rows, for
reference). Latencies are medians of sequential requests, big and small interleaved."""
from __future__ import annotations

import os
import statistics
import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg
import requests

from benchkit import doc
from benchkit.harness import Stack, common_args, log, machine_line

BIG, SMALL_ROWS, SMALL_USERS = 1_000_000, 500, 2000


def register(subparsers) -> None:
    p = subparsers.add_parser("read", help="history, monitor, timeline and CSV at 1M rows")
    p.add_argument("--scale", type=float, default=1.0,
                   help="fraction of the big account's rows and of the small accounts "
                        "(0.01: 10,000 rows and 20 accounts)")
    p.add_argument("--repeat", type=int, default=20, help="timed requests per case")
    p.add_argument("--rollup-timeout", type=float, default=600)
    common_args(p)
    p.set_defaults(run=main)


TYPES = """CASE (g - 1) % 10 WHEN 0 THEN 'credit' WHEN 1 THEN 'verification_refund'
           WHEN 2 THEN 'adjustment' ELSE 'sms_purchase' END"""
AMOUNTS = "CASE (g - 1) % 10 WHEN 0 THEN 1000 WHEN 1 THEN 150 WHEN 2 THEN 5 ELSE -150 END"
NOTE_TYPES = """CASE type WHEN 'credit' THEN 'credit_added' WHEN 'sms_purchase' THEN
    'credit_deducted' WHEN 'verification_refund' THEN 'instant_refund'
    ELSE 'balance_adjusted' END"""


def build(stack: Stack, big: int, small_users: int) -> tuple[str, str, int]:
    """The data set, by SQL (triggers off while loading; the per-account counts they keep
    are written after, as the migration that added them does). Returns (big, small, rows)."""
    users = [("big", big)] + [(f"s{i:04d}", SMALL_ROWS) for i in range(small_users)]
    with psycopg.connect(stack.db_url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("CREATE TEMP TABLE bench_users (uid text, n int)")
        with conn.cursor().copy("COPY bench_users (uid, n) FROM STDIN") as copy:
            for row in users:
                copy.write_row(row)
        conn.execute("""INSERT INTO accounts (user_id, email, balance_cents, currency, last_seq,
                            low_balance_threshold_cents, created_at, updated_at)
                        SELECT uid, uid || '@bench.example', 0, 'USD', n, 0,
                               now() - interval '8 days', now() FROM bench_users""")
        t0 = time.monotonic()
        conn.execute(f"""
            INSERT INTO transactions (user_id, seq, amount_cents, balance_after_cents, type,
                                      status, description, service, created_at)
            SELECT uid, g, amt, sum(amt) OVER (PARTITION BY uid ORDER BY g), typ, 'completed',
                   'bench', CASE typ WHEN 'sms_purchase' THEN 'WhatsApp' END, ts
            FROM (SELECT u.uid, g, {TYPES} AS typ, {AMOUNTS} AS amt,
                         now() - interval '7 days' + interval '30 minutes'
                           + (g - random()) / u.n * (interval '7 days' - interval '32 minutes')
                           AS ts
                  FROM bench_users u CROSS JOIN LATERAL generate_series(1, u.n) g) s
            ORDER BY ts""")
        conn.execute(f"""
            INSERT INTO notifications (user_id, type, title, message, amount_cents,
                                       transaction_id, read, created_at)
            SELECT user_id, {NOTE_TYPES}, 'Bench', 'Bench notification', amount_cents, id, true,
                   created_at FROM transactions ORDER BY id""")
        conn.execute("""UPDATE accounts a SET balance_cents = s.b FROM
                          (SELECT user_id, sum(amount_cents) b FROM transactions
                           GROUP BY user_id) s WHERE s.user_id = a.user_id""")
        conn.execute("DELETE FROM account_tx_counts")
        conn.execute("""INSERT INTO account_tx_counts (user_id, type, n)
                        SELECT user_id, type, count(*) FROM transactions GROUP BY user_id, type""")
        rows = conn.execute("SELECT count(*) FROM transactions").fetchone()[0]
        log(f"{rows:,} transactions and their notifications in {time.monotonic() - t0:.0f} s")
        conn.execute("VACUUM ANALYZE")
    return "big", f"s{small_users // 2:04d}", rows


def timed(session: requests.Session, url: str, headers: dict, first_byte: bool = False) -> float:
    t0 = time.perf_counter()
    if first_byte:
        with session.get(url, headers=headers, stream=True, timeout=60) as r:
            assert r.status_code == 200, (url, r.status_code)
            next(r.iter_content(1))
            return time.perf_counter() - t0
    r = session.get(url, headers=headers, timeout=120)
    assert r.status_code == 200, (url, r.status_code, r.text[:300])
    return time.perf_counter() - t0


def side_by_side(session, cases: list[tuple[str, str, str, dict]], repeat: int,
                 first_byte: bool = False) -> dict:
    """{name: median seconds}; the cases' requests interleaved, after 3 warm-up rounds."""
    times: dict[str, list[float]] = {name: [] for name, *_ in cases}
    for i in range(3 + repeat):
        for name, _, url, headers in cases:
            t = timed(session, url, headers, first_byte)
            if i >= 3:
                times[name].append(t)
    return {name: statistics.median(v) for name, v in times.items()}


def csv_memory(stack: Stack, url: str, headers: dict) -> tuple[float, float, int, float]:
    """(API RSS growth MB while the whole CSV downloads, seconds, bytes, RSS MB before)."""
    before = stack.rss_mb("api")
    if not before:
        raise SystemExit("no API process found to measure")
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(stack.rss_mb("api"))
            time.sleep(0.2)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    size, t0 = 0, time.perf_counter()
    with requests.get(url, headers=headers, stream=True, timeout=600) as r:
        for chunk in r.iter_content(65536):
            size += len(chunk)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return max(peak) - before, seconds, size, before


def main(args) -> int:
    os.environ.setdefault("TXMON_RATELIMIT_USER", "1000000/minute")  # a bench, not a client
    machine = machine_line()
    big_n, small_users = max(1000, int(BIG * args.scale)), max(2, int(SMALL_USERS * args.scale))
    with Stack("read") as stack:
        s = requests.Session()
        admin = {"Authorization": f"Bearer {stack.token('bench-admin', admin=True)}"}
        mon = stack.url + "/api/admin/transactions/monitor?minutes="

        def watermark() -> int:
            got = stack.sql("SELECT watermark_id FROM monitor_rollup_state WHERE id = 1")
            return got[0][0] if got else 0
        # Worker and beat paused (SIGSTOP) while loading and for the reference: the monitor
        # before the roll-up job has run, every row read raw.
        with stack.paused():
            big, small, rows = build(stack, big_n, small_users)
            top = stack.sql("SELECT max(id) FROM transactions")[0][0]
            wm_raw = watermark()
            raw = side_by_side(s, [("7d raw", "", mon + "10080", admin),
                                   ("60m raw", "", mon + "60", admin)], max(3, args.repeat // 4))
            wm_raw_after = watermark()
        loaded = time.monotonic()
        u = {who: {"Authorization": f"Bearer {stack.token(who)}"} for who in (big, small)}
        n = {big: big_n, small: SMALL_ROWS}
        log(f"monitor before the roll-up (watermark {wm_raw}..{wm_raw_after} of {top}): "
            f"7 d {raw['7d raw'] * 1000:.1f} ms, 60 min {raw['60m raw'] * 1000:.1f} ms")
        stack.wait(lambda: watermark() >= top, args.rollup_timeout, "beat's monitor roll-up",
                   every=1)
        waited = time.monotonic() - loaded
        log(f"roll-up caught up {waited:.0f} s after worker and beat resumed")
        # Exact? The rows start 30 minutes inside the 7 days, so that window holds all of
        # them however long the run takes; the 60-minute one moves with the clock, so its
        # figure must lie between the SQL counts just before and just after the request.
        seen = s.get(mon + "10080", headers=admin, timeout=60).json()
        want = stack.sql("SELECT count(*), count(DISTINCT user_id) FROM transactions"
                         " WHERE created_at >= now() - interval '7 days'")[0]
        hour = "SELECT count(*) FROM transactions WHERE created_at >= now() - interval '1 hour'"
        before = stack.sql(hour)[0][0]
        seen_hour = s.get(mon + "60", headers=admin, timeout=60).json()["total_transactions"]
        after = stack.sql(hour)[0][0]
        exact = ((seen["total_transactions"], seen["unique_users"]) == tuple(want)
                 == (rows, 1 + small_users) and after <= seen_hour <= before)
        monitor = side_by_side(s, [("7d", "", mon + "10080", admin),
                                   ("60m", "", mon + "60", admin),
                                   ("24h", "", mon + "1440", admin)], args.repeat)
        half_start = (datetime.now(timezone.utc) - timedelta(days=3, hours=12)).isoformat()
        api = stack.url + "/api/wallet/transactions"
        pages = {
            "history first page": lambda w: f"{api}/detailed?limit=50",
            "history cursor half-way": lambda w: f"{api}/detailed?limit=50&cursor={n[w] // 2}",
            "history type + start_date": lambda w: (
                f"{api}/detailed?limit=50&type=sms_purchase&start_date="
                + requests.utils.quote(half_start)),
            "history skip half-way": lambda w: f"{api}?limit=50&skip={n[w] // 2}",
        }
        results = {}
        for name, url in pages.items():
            results[name] = side_by_side(s, [(w, w, url(w), u[w]) for w in (big, small)],
                                         args.repeat)
        tl = stack.url + "/api/admin/accounts/{}/timeline?limit=50"
        results["timeline first page"] = side_by_side(
            s, [(w, w, tl.format(w), admin) for w in (big, small)], args.repeat)
        csv = stack.url + "/api/wallet/transactions/export.csv"
        results["CSV first byte"] = side_by_side(
            s, [(w, w, csv, u[w]) for w in (big, small)], args.repeat, first_byte=True)
        growth, csv_s, csv_bytes, rss0 = csv_memory(stack, csv, u[big])
        log(f"CSV of {big_n:,} rows: {csv_bytes / 1e6:.1f} MB in {csv_s:.1f} s, API RSS "
            f"+{growth:.1f} MB")

    full = args.scale >= 1
    judged = (lambda ok: ok) if full else (lambda ok: None)
    scale_note = "" if full else f" (scale {args.scale:g})"
    ms = lambda x: f"{x * 1000:.1f} ms"  # noqa: E731
    goals = {"history first page": ("read.history_first", 1.5),
             "history cursor half-way": ("read.history_cursor", 1.5),
             "history skip half-way": ("read.history_skip", 1.5),
             "history type + start_date": ("read.history_filtered", 3),
             "timeline first page": ("read.timeline", 1.5)}
    targets, lines = [], []
    for name, r in results.items():
        ratio = r[big] / r[small]
        lines.append(f"| {name} | {ms(r[big])} | {ms(r[small])} | **{ratio:.2f}×** |")
        if name in goals:
            tid, goal = goals[name]
            targets.append(doc.Target(tid, ms(r[big]) + scale_note, f"{ms(r[small])} (500 rows)",
                                      f"{ratio:.2f}", judged(ratio <= goal)))
    mratio = monitor["7d"] / monitor["60m"]
    targets.append(doc.Target("read.monitor", ms(monitor["7d"]) + scale_note,
                              f"{ms(monitor['60m'])} (60 min)", f"{mratio:.2f}",
                              judged(mratio <= 3 and exact)))
    fb = results["CSV first byte"][big]
    targets.append(doc.Target("read.csv_first_byte", ms(fb) + scale_note, "-", "-",
                              judged(fb <= 1)))
    targets.append(doc.Target("read.csv_memory", f"+{growth:.1f} MB{scale_note}",
                              f"{csv_bytes / 1e6:.0f} MB of CSV", "-", judged(growth <= 64)))
    table = "\n".join(lines)
    body = f"""- Machine: {machine}.
- Stack: `scripts/run` (TXMON_DEMO=0) on a fresh PostgreSQL database; data written in SQL:
  one account with {big_n:,} transactions and {small_users:,} accounts with {SMALL_ROWS}
  each ({rows:,} transactions, one notification each), spread over 7 days.
- Median of {args.repeat} sequential requests per case after 3 warm-up rounds, the two cases
  of a row interleaved.{'' if full else ' Targets are judged only at --scale 1.'}

| request | {big_n:,}-row account | 500-row account | ratio |
| --- | ---: | ---: | ---: |
{table}

| monitor | 7 days | 60 minutes | 24 hours | 7 d ÷ 60 min |
| --- | ---: | ---: | ---: | ---: |
| on the roll-ups (worker and beat resumed: the job caught up {waited:.0f} s later) | {ms(monitor['7d'])} | {ms(monitor['60m'])} | {ms(monitor['24h'])} | **{mratio:.2f}×** |
| before the job ran (worker and beat paused; watermark {wm_raw_after:,} of {top:,}: every row read raw) | {ms(raw['7d raw'])} | {ms(raw['60m raw'])} | | {raw['7d raw'] / raw['60m raw']:.2f}× |

The 7-day monitor's `total_transactions` and `unique_users` equal `count(*)` and
`count(DISTINCT user_id)` over the raw rows: **{'yes' if exact else 'NO'}**
({seen['total_transactions']:,} transactions, {seen['unique_users']:,} users); the 60-minute
one's count, {seen_hour:,}, lies between the SQL counts before and after it
({before:,}, {after:,}).
The whole CSV of the {big_n:,}-row account: {csv_bytes / 1e6:.1f} MB in {csv_s:.1f} s, API
RSS (all API processes, sampled every 0.2 s) {rss0:.0f} MB before, +{growth:.1f} MB at
most while it streamed.
"""
    command = f"scripts/bench read --scale {args.scale:g} --repeat {args.repeat}"
    doc.write_section("read", "Read side: history, monitor, timeline and CSV at scale",
                      command, body, targets, **({"doc": args.doc} if args.doc else {}))
    log(f"monitor 7 d ÷ 60 min {mratio:.2f} (exact: {exact}); "
        + "; ".join(f"{k} {r[big] / r[small]:.2f}" for k, r in results.items()))
    return 0
