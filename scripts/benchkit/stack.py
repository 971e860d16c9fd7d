"""``scripts/bench stack``: the whole stack as a user runs it. Purchases from 16 connections,
then at fixed offered rates; a purchase is done when its email reached the SMTP server,
matched by its notification's Message-ID; sockets subscribed for a sample of the accounts
time each ``balance_update``; pgbench on the purchase SQL in the same run is the reference."""
from __future__ import annotations

import re
import time

from benchkit import doc, pgref
from benchkit.cpu import Cpu
from benchkit.harness import Sockets, Stack, common_args, cpu_table, log, machine_line, ms, pct

SUBJECT = "txmon: Credits Used"
MID = re.compile(r"<notification-(\d+)@")


def register(subparsers) -> None:
    p = subparsers.add_parser("stack", help="whole stack: purchases until their email is sent")
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20, help="the 16-connection load")
    p.add_argument("--rates", default="50,100,200", help="fixed offered rates, purchases/s")
    p.add_argument("--rate-seconds", type=float, default=10)
    p.add_argument("--sockets", type=int, default=200, help="accounts with a socket open")
    p.add_argument("--pgbench-seconds", type=float, default=10)
    common_args(p)
    p.set_defaults(run=main)


def purchase_emails(stack: Stack, since: float) -> list[tuple[float, int]]:
    """(arrival, notification id) of the purchase emails received after ``since``."""
    out = []
    for at, mid, _, subject in stack.emails():
        m = MID.search(mid)
        if float(at) > since and subject == SUBJECT and m:
            out.append((float(at), int(m.group(1))))
    return out


def wait_emails(stack: Stack, since: float, count: int, timeout: float = 900) -> list:
    got: list = []

    def enough() -> bool:
        got[:] = purchase_emails(stack, since)
        return len(got) >= count
    stack.wait(enough, timeout, f"{count} purchase emails", every=0.5)
    return got


def saturated(stack: Stack, args) -> dict:
    log(f"{args.connections} connections for {args.seconds:g} s")
    with Cpu(stack.run.pid, stack.dbname) as cpu:
        t0 = time.time()
        w = stack.wrk(users=args.accounts, seconds=args.seconds, connections=args.connections,
                      prefix="sat")
        t_load = time.time()
        accepted = stack.sql("SELECT count(*) FROM verifications WHERE id LIKE 'sat-%%'")[0][0]
        emails = wait_emails(stack, t0, accepted)
    last = max(at for at, _ in emails)
    return {"accepted": accepted, "accepted_s": accepted / (t_load - t0),
            "non_2xx": w["errors_status"], "done_s": accepted / (last - t0),
            "drain_s": last - t_load, "cpu": cpu.per(accepted), "seconds": t_load - t0}


def at_rate(stack: Stack, args, users: list[str], sockets: Sockets, rate: float) -> dict:
    count = int(rate * args.rate_seconds)
    log(f"{rate:g} purchases/s offered for {args.rate_seconds:g} s")
    with Cpu(stack.run.pid, stack.dbname) as cpu:
        t0 = time.time()
        sent = stack.purchases(users, rate=rate, count=count, prefix=f"r{rate:g}")
        t_load = time.time()
        ok = [(at, tx) for at, status, tx in sent if status == 201]
        emails = wait_emails(stack, t0, len(ok))
    tx_of = dict(stack.sql("SELECT id, transaction_id FROM notifications WHERE id = ANY(%s)",
                           [n for _, n in emails]))
    mailed = {tx_of.get(n): at for at, n in emails}
    to_email = [mailed[tx] - at for at, tx in ok if tx in mailed]
    to_ws = [sockets.got[tx] - at for at, tx in ok if tx in sockets.got]
    return {"rate": rate, "count": len(ok), "non_2xx": count - len(ok),
            "accepted_s": len(ok) / (t_load - t0), "cpu": cpu.per(len(ok)),
            "email": (pct(to_email, 50), pct(to_email, 99), max(to_email, default=None)),
            "ws": (pct(to_ws, 50), pct(to_ws, 99), max(to_ws, default=None)), "ws_n": len(to_ws)}


def main(args) -> int:
    rates = [float(r) for r in args.rates.split(",") if r]
    machine = machine_line()
    with Stack("stack") as stack:
        users = stack.seed(args.accounts)
        script = pgref.script_for(stack, users)
        stack.wait(lambda: stack.due() == 0, 120, "the capture's follow-ups")
        sockets = Sockets(stack, users[:args.sockets])
        sat = saturated(stack, args)
        stack.wait(lambda: stack.due() == 0, 300, "an idle outbox")
        runs = [at_rate(stack, args, users, sockets, r) for r in rates]
        sockets.close()
        log("pgbench on the purchase SQL")
        bench = pgref.reference(stack, script, clients=args.connections,
                                seconds=args.pgbench_seconds)
    ratio = sat["done_s"] / bench["tps"]
    ref = next((r for r in runs if r["rate"] == 100), runs[len(runs) // 2] if runs else None)
    targets = [doc.Target("stack.done_ratio", f"{sat['done_s']:.0f}/s",
                          f"pgbench {bench['tps']:.0f} tps", f"{ratio:.3f}", ratio >= 0.15)]
    if ref:
        e99, w99 = ref["email"][1], ref["ws"][1]
        label = f" (at {ref['rate']:g}/s)" if ref["rate"] != 100 else ""
        targets += [doc.Target("stack.ws_p99", ms(w99) + label,
                               met=None if w99 is None else w99 <= 0.050),
                    doc.Target("stack.email_p99", ms(e99) + label,
                               met=None if e99 is None else e99 <= 2.0)]
    rate_rows = "\n".join(
        f"| {r['rate']:g}/s | {r['accepted_s']:.0f}/s | {r['non_2xx']} | {ms(r['email'][0])} | "
        f"{ms(r['email'][1])} | {ms(r['email'][2])} | {ms(r['ws'][0])} | {ms(r['ws'][1])} | "
        f"{ms(r['ws'][2])} | {r['ws_n']} |" for r in runs)
    body = f"""- Machine: {machine}.
- Stack: `scripts/run` (TXMON_DEMO=0) on a fresh PostgreSQL database, its own redis-server,
  an aiosmtpd server as `SMTP_URL`; {args.accounts:,} accounts with email addresses and the
  default preferences; `/ws/balance` sockets open for {min(args.sockets, args.accounts)} of them.
- A purchase is done when its email reached the SMTP server (matched by Message-ID).

| {args.connections} connections, {args.seconds:g} s (wrk) | figure |
| --- | ---: |
| purchases accepted | {sat['accepted']:,} ({sat['accepted_s']:.0f}/s), {sat['non_2xx']} non-2xx |
| purchases done, first purchase to last email | **{sat['done_s']:.0f}/s** |
| backlog drained after the load stopped | {sat['drain_s']:.1f} s |
| pgbench of the purchase SQL, {args.connections} clients, {args.pgbench_seconds:g} s | {bench['tps']:.0f} tps |
| done/s ÷ pgbench tps | **{ratio:.3f}** |

| offered | accepted | non-2xx | → email p50 | p99 | max | → `balance_update` p50 | p99 | max | sampled |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{rate_rows}

{cpu_table([(f"{args.connections} connections, until the last email", sat["cpu"])]
           + [(f"{r['rate']:g}/s, until the last email", r["cpu"]) for r in runs], "purchase")}

pgbench: `{bench['command']}`, the script generated from one real purchase's statements.
"""
    command = (f"scripts/bench stack --accounts {args.accounts} --seconds {args.seconds:g} "
               f"--rates {args.rates}")
    doc.write_section("stack", "Whole stack: purchases until their email is sent", command,
                      body, targets, **({"doc": args.doc} if args.doc else {}))
    log(f"done/s {sat['done_s']:.0f}, pgbench {bench['tps']:.0f} tps, ratio {ratio:.3f}")
    return 0
