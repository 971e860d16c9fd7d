"""``scripts/bench write``: the API alone (worker and beat paused with SIGSTOP, so only the
purchase itself runs) against pgbench on the same purchase SQL, in the same run."""
from __future__ import annotations

from benchkit import doc, pgref
from benchkit.cpu import Cpu
from benchkit.harness import Stack, common_args, cpu_table, log, machine_line

def register(subparsers) -> None:
    p = subparsers.add_parser("write", help="the API alone vs pgbench of the purchase SQL")
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--seconds", type=float, default=15)
    common_args(p)
    p.set_defaults(run=main)


def main(args) -> int:
    machine = machine_line()
    with Stack("write") as stack:
        users = stack.seed(args.accounts)
        script = pgref.script_for(stack, users)
        stack.wait(lambda: stack.due() == 0, 120, "the capture's follow-ups")
        with stack.paused(), Cpu(stack.run.pid, stack.dbname) as api_cpu:
            w = stack.wrk(users=len(users), seconds=args.seconds,
                          connections=args.connections, prefix="w")
        n = stack.sql("SELECT count(*) FROM verifications WHERE id LIKE 'w-%%'")[0][0]
        with Cpu(stack.run.pid, stack.dbname) as pg_cpu:
            bench = pgref.reference(stack, script, clients=args.connections,
                                    seconds=args.seconds)
    rps = n / (w["duration_us"] / 1e6)
    ratio = rps / bench["tps"]
    targets = [doc.Target("write.ratio", f"{rps:.0f}/s", f"pgbench {bench['tps']:.0f} tps",
                          f"{ratio:.3f}", None if doc.BASELINE.get("write.ratio") is None
                          else ratio >= doc.BASELINE["write.ratio"])]
    body = f"""- Machine: {machine}.
- Stack: `scripts/run` (TXMON_DEMO=0) on a fresh PostgreSQL database, worker and beat paused
  (SIGSTOP) while the API is loaded; {args.accounts:,} accounts.

| run | rate | latency p50 / p99 | non-2xx |
| --- | ---: | ---: | ---: |
| API, wrk {args.connections} connections, {args.seconds:g} s | **{rps:.0f} purchases/s** | {w['p50_us'] / 1000:.1f} / {w['p99_us'] / 1000:.1f} ms | {w['errors_status']} |
| pgbench of the purchase SQL, {args.connections} clients | {bench['tps']:.0f} tps | | |
| API ÷ pgbench | **{ratio:.3f}** | | |

{cpu_table([("API, per purchase", api_cpu.per(n)), ("pgbench, per transaction", pg_cpu.per(bench["transactions"]))], "purchase")}
"""
    command = f"scripts/bench write --accounts {args.accounts} --seconds {args.seconds:g}"
    doc.write_section("write", "API alone: POST /api/v1/verifications", command, body,
                      targets, **({"doc": args.doc} if args.doc else {}))
    log(f"API {rps:.0f}/s, pgbench {bench['tps']:.0f} tps, ratio {ratio:.3f}")
    return 0
