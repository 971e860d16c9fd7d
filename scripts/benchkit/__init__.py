"""txmon's benchmark harness: ``scripts/bench <subcommand>``.

Plug-in interface: a subcommand is one module ``scripts/benchkit/<name>.py`` for each name in
``SUBCOMMANDS``, which defines

    def register(subparsers) -> None:
        parser = subparsers.add_parser("<name>", help="...")
        parser.add_argument(...)          # ordinary flags, including a tiny-size option
        parser.set_defaults(run=main)     # main(args) -> int, the exit status

The dispatcher (``__main__.py``) imports each module; a module that is not there gets a
subcommand that says "not available". Shared pieces, for any subcommand:
- ``harness.Stack``: scripts/run with TXMON_DEMO=0 on a fresh PostgreSQL database, a private
  redis-server and an aiosmtpd sink as SMTP_URL; ``Stack.api`` is a requests session with the
  service key, ``Stack.token(user)`` a JWT, ``Stack.stop()`` stops all of it;
- ``harness.Cpu``: CPU per process role from /proc (``with Cpu(stack) as cpu: ...``,
  then ``cpu.per(count)``: ms per item by role, plus the machine's idle and steal);
- ``pgref``: the statements of one real purchase captured into a pgbench script, and pgbench;
- ``doc.write_section(key, title, command, body, targets)``: replaces this subcommand's
  section of docs/PERFORMANCE.md (and its rows of the table at the top), keeping the others.
  ``targets`` rows: ``doc.Target(name, figure, reference, ratio, met)``; the table's rows
  come from ``doc.TARGETS`` (key, target name, goal text), so a new subcommand adds its
  targets there.
"""
SUBCOMMANDS = ("stack", "write", "worker", "ws", "read")
