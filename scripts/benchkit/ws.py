"""``scripts/bench ws``: purchase → ``balance_update`` latency with many /ws/balance sockets
open (one per account, websocket-client), purchases at a fixed rate to those accounts, and
the API's memory per socket."""
from __future__ import annotations

import time

from benchkit import doc
from benchkit.cpu import Cpu
from benchkit.harness import (Sockets, Stack, common_args, cpu_table, log, machine_line, ms,
                              pct)


def register(subparsers) -> None:
    p = subparsers.add_parser("ws", help="balance_update latency with many sockets")
    p.add_argument("--sockets", type=int, default=1000)
    p.add_argument("--rate", type=float, default=100, help="purchases/s")
    p.add_argument("--seconds", type=float, default=10)
    common_args(p)
    p.set_defaults(run=main)


def main(args) -> int:
    machine = machine_line()
    with Stack("ws") as stack:
        users = stack.seed(args.sockets)
        rss0 = stack.rss_mb("api")
        log(f"opening {args.sockets} sockets")
        sockets = Sockets(stack, users)
        time.sleep(1)
        rss1 = stack.rss_mb("api")
        with Cpu(stack.run.pid, stack.dbname) as cpu:
            sent = stack.purchases(users, rate=args.rate, count=int(args.rate * args.seconds),
                                   prefix="ws")
            ok = [(at, tx) for at, status, tx in sent if status == 201]
            stack.wait(lambda: all(tx in sockets.got for _, tx in ok), 120,
                       "every balance_update", every=0.25)
        sockets.close()
    lat = [sockets.got[tx] - at for at, tx in ok]
    p99 = pct(lat, 99)
    targets = [doc.Target("ws.p99", f"{ms(p99)} ({args.sockets:,} sockets, {args.rate:g}/s)",
                          met=p99 <= 0.050)]
    body = f"""- Machine: {machine}.
- Stack: `scripts/run` (TXMON_DEMO=0) on a fresh PostgreSQL database, its own redis-server,
  an aiosmtpd server as `SMTP_URL`; {args.sockets:,} accounts, each with one `/ws/balance`
  socket (websocket-client); purchases at {args.rate:g}/s for {args.seconds:g} s, round robin
  over those accounts, so every purchase's `balance_update` is timed.

| measure | figure |
| --- | ---: |
| purchases accepted | {len(ok):,} of {len(sent):,} |
| purchase → `balance_update` p50 / p99 / max | {ms(pct(lat, 50))} / **{ms(p99)}** / {ms(max(lat, default=None))} |
| API RSS (all its processes) before → with the sockets open | {rss0:.0f} → {rss1:.0f} MB ({1024 * (rss1 - rss0) / max(1, args.sockets):.0f} KiB a socket) |

{cpu_table([("per purchase, until the last balance_update", cpu.per(len(ok)))], "purchase")}
"""
    command = f"scripts/bench ws --sockets {args.sockets} --rate {args.rate:g}"
    doc.write_section("ws", "Realtime: balance_update with many sockets", command, body,
                      targets, **({"doc": args.doc} if args.doc else {}))
    log(f"balance_update p99 {ms(p99)} with {args.sockets} sockets")
    return 0
