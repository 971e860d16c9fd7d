"""``scripts/bench worker``: the follow-ups on their own. Purchases made while the worker and
beat are paused (SIGSTOP), then the time and CPU to do their follow-ups once they resume;
the time to refund expired verifications; the worker's RSS with many pending 24 h
verifications. The verifications of the last two are written by pgbench with the purchase's
own SQL (fast), their other follow-ups marked done, so only the timeouts are left."""
from __future__ import annotations

import signal
import time

from benchkit import doc, pgref
from benchkit.cpu import Cpu
from benchkit.harness import Stack, common_args, cpu_table, log, machine_line
from benchkit.stack import purchase_emails
from shared import outbox

PAUSED = ("worker", "beat")
MINE = "status = 'pending' AND id ~ '^[0-9]+$'"  # pending, written by pgbench


def register(subparsers) -> None:
    p = subparsers.add_parser("worker", help="follow-ups, refunds and worker memory")
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10, help="purchases while paused")
    p.add_argument("--refunds", type=int, default=10000)
    p.add_argument("--pending", type=int, default=100000, help="pending 24 h verifications")
    p.add_argument("--settle", type=float, default=15,
                   help="seconds of relay and beat cycles over the pending rows before RSS")
    common_args(p)
    p.set_defaults(run=main)


def follow_ups(stack: Stack, users: list[str], seconds: float) -> dict:
    stack.signal(PAUSED, signal.SIGSTOP)  # resumed below, inside the CPU window
    since = time.time()
    stack.wrk(users=len(users), seconds=seconds, prefix="fu", timeout_s=86400)
    n = stack.sql("SELECT count(*) FROM verifications WHERE id LIKE 'fu-%%'")[0][0]
    backlog = stack.due()
    log(f"{n} purchases made with the worker paused; {backlog} follow-ups due; resuming")
    with Cpu(stack.run.pid, stack.dbname) as cpu:
        t0 = time.monotonic()
        stack.signal(PAUSED, signal.SIGCONT)
        stack.wait(lambda: stack.due() == 0 and len(purchase_emails(stack, since)) >= n, 900,
                   "the follow-ups", every=0.25)
        took = time.monotonic() - t0
    return {"n": n, "backlog": backlog, "seconds": took, "cpu": cpu.per(n)}


def settle_other_follow_ups(stack: Stack) -> None:
    stack.settle("task <> %s", outbox.EXPIRE_VERIFICATION)


def refunds(stack: Stack, users: list[str], n: int) -> dict:
    script = pgref.script_for(stack, users, 300)
    with stack.paused():
        pgref.pgbench(stack.db_url, script, transactions=n)
        settle_other_follow_ups(stack)
        n = stack.sql(f"SELECT count(*) FROM verifications WHERE {MINE}")[0][0]
    log(f"{n} pending verifications expire now")
    with Cpu(stack.run.pid, stack.dbname) as cpu:
        t0 = time.monotonic()
        stack.sql("UPDATE verifications SET expires_at = now() - interval '1 second' "
                  f"WHERE {MINE}")
        stack.sql("UPDATE outbox SET available_at = now() WHERE task = %s AND completed_at "
                  "IS NULL AND payload->>'verification_id' ~ '^[0-9]+$'",
                  outbox.EXPIRE_VERIFICATION)
        stack.wait(lambda: stack.sql(f"SELECT count(*) FROM verifications WHERE {MINE}")[0][0]
                   == 0, 900, "the refunds", every=0.25)
        took = time.monotonic() - t0
    return {"n": n, "seconds": took, "cpu": cpu.per(n)}


def memory(stack: Stack, users: list[str], n: int, settle: float) -> dict:
    script = pgref.script_for(stack, users, 86400)
    stack.wait(lambda: stack.due() == 0, 600, "an idle outbox")
    time.sleep(2)
    before = stack.rss_mb("worker")
    with stack.paused():
        pgref.pgbench(stack.db_url, script, transactions=n)
        settle_other_follow_ups(stack)
    pending = stack.sql("SELECT count(*) FROM verifications WHERE status = 'pending' AND "
                        "expires_at > now() + interval '23 hours'")[0][0]
    time.sleep(settle)  # several relay and beat cycles over the pending rows
    return {"n": pending, "before": before, "after": stack.rss_mb("worker")}


def main(args) -> int:
    machine = machine_line()
    with Stack("worker") as stack:
        users = stack.seed(args.accounts)
        fu = follow_ups(stack, users, args.seconds)
        rf = refunds(stack, users, args.refunds)
        mem = memory(stack, users, args.pending, args.settle)
    growth = mem["after"] - mem["before"]
    targets = [doc.Target("worker.rss", f"{growth:+.1f} MB ({mem['n']:,} pending)",
                          f"{mem['before']:.0f} MB before", met=growth <= 50),
               doc.Target("worker.refunds", f"{rf['seconds']:.1f} s ({rf['n']:,})",
                          met=rf["seconds"] <= 30 * rf["n"] / 10000)]
    body = f"""- Machine: {machine}.
- Stack: `scripts/run` (TXMON_DEMO=0) on a fresh PostgreSQL database, its own redis-server,
  an aiosmtpd server as `SMTP_URL`; {args.accounts:,} accounts with email addresses.

| measure | figure |
| --- | ---: |
| purchases made with the worker and beat paused (wrk, 16 connections, {args.seconds:g} s) | {fu['n']:,} ({fu['backlog']:,} follow-ups due) |
| their follow-ups done after resuming (every email sent, outbox idle) | {fu['seconds']:.1f} s, **{fu['n'] / fu['seconds']:.0f} purchases/s** |
| {rf['n']:,} expired verifications refunded (from their due time) | **{rf['seconds']:.1f} s** ({rf['n'] / rf['seconds']:.0f}/s) |
| worker RSS (all its processes), before → with {mem['n']:,} pending 24 h verifications | {mem['before']:.0f} → {mem['after']:.0f} MB ({growth:+.1f} MB) |

The refund and memory cases write their verifications with pgbench running the purchase's
own SQL, and mark their other follow-ups done, so only the timeouts are left to the workers.

{cpu_table([("follow-ups of a purchase", fu["cpu"]), ("refund of an expired verification", rf["cpu"])], "purchase or refund")}
"""
    command = (f"scripts/bench worker --accounts {args.accounts} --seconds {args.seconds:g} "
               f"--refunds {args.refunds} --pending {args.pending} --settle {args.settle:g}")
    doc.write_section("worker", "Worker: follow-ups, refunds, memory", command, body, targets,
                      **({"doc": args.doc} if args.doc else {}))
    log(f"follow-ups {fu['n'] / fu['seconds']:.0f}/s, refunds {rf['seconds']:.1f} s, "
        f"RSS {growth:+.1f} MB")
    return 0
