"""Each ``scripts/bench`` subcommand for a few seconds at a tiny size, in two waves (no
assertion on speed): the stack starts and stops, and each writes its section with numbers."""
import os
import re
import subprocess

import pytest

from tests.support.common import ROOT, clean_env, require_tool

RUNS = {
    "stack": ["--accounts", "30", "--seconds", "2", "--rates", "20", "--rate-seconds", "2",
              "--sockets", "5", "--pgbench-seconds", "2"],
    "write": ["--accounts", "30", "--seconds", "2"],
    "ws": ["--sockets", "20", "--rate", "20", "--seconds", "2"],
    "worker": ["--accounts", "30", "--seconds", "1", "--refunds", "200", "--pending", "300",
               "--settle", "2"],
    "read": ["--scale", "0.001", "--repeat", "2"],
}
NO_CPU_TABLE = {"read"}  # request timings side by side; its load is one client at a time


@pytest.mark.timeout(600)
def test_every_subcommand_writes_its_section(tmp_path):
    for tool, hint in (("wrk", "apt-get install wrk"), ("pgbench", "postgresql-client"),
                       ("redis-server", "apt-get install redis-server")):
        require_tool(tool, hint)
    admin = os.environ.get("TXMON_TEST_PG_ADMIN_URL",
                           "postgresql://postgres@127.0.0.1:5432/postgres")
    names = list(RUNS)
    # Three stacks at most at a time (Postgres connection slots); the two longest, worker
    # and read (it waits for beat's 30 s roll-up), side by side.
    for wave in (names[:3], names[3:]):
        procs = {}
        for name in wave:
            log = open(tmp_path / f"{name}.log", "w")
            procs[name] = subprocess.Popen(
                [str(ROOT / "scripts" / "bench"), name, *RUNS[name],
                 "--doc", str(tmp_path / f"{name}.md")],
                env=clean_env(DATABASE_URL=admin), cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT)
        for name, proc in procs.items():
            assert proc.wait(300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    for name in RUNS:
        text = (tmp_path / f"{name}.md").read_text()
        section = text.split(f"<!-- bench:{name} -->")[1].split(f"<!-- /bench:{name} -->")[0]
        assert f"Rerun: `scripts/bench {name}" in section
        assert re.search(r"\*\*[\d.,]+( ms|/s| s|×)?\*\*", section), section
        if name not in NO_CPU_TABLE:
            assert re.search(r"\| \d+\.\d\d \|", section), section  # the CPU table
        table = text.split("<!-- bench:")[0]
        assert f"not run (`scripts/bench {name}`)" not in table
