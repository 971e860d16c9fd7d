"""The benchmark harness's own logic (scripts/benchkit): CPU arithmetic from /proc samples,
the captured purchase turned into a pgbench script, the PERFORMANCE.md writer, the plug-in
dispatcher."""
import sys

import pytest

from tests.support.common import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from benchkit import __main__ as dispatcher  # noqa: E402
from benchkit import cpu, doc, pgref  # noqa: E402


def test_role_seconds_counts_from_the_first_sample_and_new_processes_from_zero():
    tick = cpu.CLK_TCK
    first = {10: 5 * tick, 11: 1 * tick}
    last = {10: ("api", 7 * tick), 11: ("worker", 4 * tick), 12: ("worker", 2 * tick),
            13: ("other", 9 * tick)}
    out = cpu.role_seconds(first, last)
    assert out["api"] == pytest.approx(2.0)
    assert out["worker"] == pytest.approx(5.0)  # 3 s of pid 11 + 2 s of the new pid 12
    assert "other" not in out and out["postgres"] == 0


def test_machine_idle_steal_and_busy_shares():
    # user nice system idle iowait irq softirq steal
    out = cpu.machine([100, 0, 50, 1000, 0, 0, 0, 0], [160, 0, 70, 1100, 10, 0, 0, 10])
    assert out["idle_pct"] == pytest.approx(55.0)   # (100 + 10) of 200 ticks
    assert out["steal_pct"] == pytest.approx(5.0)
    assert out["busy_pct"] == pytest.approx(45.0)


@pytest.mark.parametrize("cmd, ancestors, expected", [
    ("/venv/bin/python /venv/bin/gunicorn -c gunicorn.conf.py api_service.wsgi:app", {5, 1}, "api"),
    ("python celery -A worker_service.celery_app worker --concurrency=2", {5}, "worker"),
    ("python celery -A worker_service.celery_app beat --schedule x", {5}, "beat"),
    ("python celery -A worker_service.celery_app flower --port=1", {5}, "flower"),
    ("redis-server 127.0.0.1:6390", {5}, "redis"),
    ("awk -v p=api   |  { print p $0; fflush() }", {5}, "log pipes"),
    ("python -m benchkit.smtpsink 25 x", {9}, "smtp server"),
    ("python -m benchkit stack", {9}, "load generator"),
    ("postgres: postgres txmon_b 127.0.0.1(5000) idle", set(), "postgres"),
    ("postgres: postgres someone_else 127.0.0.1(5000) idle", set(), "other"),
    ("bash something", {7}, "other"),
])
def test_process_roles(cmd, ancestors, expected):
    assert cpu.role(cmd, cmd.split()[0][:15], ancestors, 5, 9, "txmon_b") == expected


def capture():
    payload = '{"verification_id": "cap-1", "transaction_id": 41}'
    return {"user_id": "1000001", "verification_id": "cap-1", "events": [
        {"kind": "begin"},
        {"kind": "execute", "executemany": False, "pipeline": None,
         "statement": "UPDATE accounts SET balance_cents = balance_cents - %s WHERE user_id = %s "
                      "RETURNING balance_cents, nextval('t') AS tx_id",
         "params": [{"0": {"t": "int", "v": 1}, "1": {"t": "str", "v": "1000001"}}],
         "returned": {"balance_cents": "99", "tx_id": "41"}},
        {"kind": "execute", "executemany": False, "pipeline": 1,
         "statement": "INSERT INTO transactions (id, user_id, verification_id, created_at) "
                      "VALUES (%s, %s, %s, %s)",
         "params": [{"0": {"t": "int", "v": 41}, "1": {"t": "str", "v": "1000001"},
                     "2": {"t": "str", "v": "cap-1"},
                     "3": {"t": "datetime", "v": "2026-01-01T00:00:00+00:00"}}]},
        {"kind": "execute", "executemany": False, "pipeline": 1,
         "statement": "INSERT INTO outbox (user_id, payload) VALUES (%s, %s)",
         "params": [{"0": {"t": "str", "v": "1000001"}, "1": {"t": "str", "v": payload}}]},
        {"kind": "commit"}]}


def test_captured_purchase_becomes_a_pgbench_script_with_variables(tmp_path):
    text = pgref.PgbenchScript(capture()).write(tmp_path / "p.sql", 1000001, 1001000)
    lines = text.splitlines()
    assert "\\set uid random(1000001, 1001000)" in lines
    assert lines[3] == "BEGIN;" and lines[-1] in ("COMMIT;", "\\endpipeline")
    assert ("UPDATE accounts SET balance_cents = balance_cents - 1 WHERE user_id = :uid "
            "RETURNING balance_cents, nextval('t') AS tx_id \\gset accounts_") in lines
    insert = next(line for line in lines if line.startswith("INSERT INTO transactions"))
    assert insert == ("INSERT INTO transactions (id, user_id, verification_id, created_at) "
                      "VALUES (:accounts_tx_id, :uid, :vid, now());")
    outbox = next(line for line in lines if line.startswith("INSERT INTO outbox"))
    assert ("""('{"verification_id": "' || :vid || '", "transaction_id": ' || :accounts_tx_id"""
            """ || '}')::json""") in outbox
    assert lines.index("\\startpipeline") < lines.index(insert)


def test_a_capture_without_the_user_is_refused():
    cap = capture()
    cap["user_id"] = "nobody"
    with pytest.raises(SystemExit, match="user id"):
        pgref.PgbenchScript(cap).body()


def test_writing_one_section_keeps_the_others_and_rebuilds_the_table(tmp_path):
    path = tmp_path / "PERFORMANCE.md"
    doc.write_section("stack", "Whole stack", "scripts/bench stack", "stack body 1",
                      [doc.Target("stack.done_ratio", "150/s", "pgbench 1000 tps", "0.150", True)],
                      doc=path)
    doc.write_section("worker", "Worker", "scripts/bench worker", "worker body",
                      [doc.Target("worker.refunds", "40.0 s", met=False)], doc=path)
    doc.write_section("stack", "Whole stack", "scripts/bench stack", "stack body 2",
                      [doc.Target("stack.done_ratio", "90/s", "pgbench 1000 tps", "0.090", False)],
                      doc=path)
    text = path.read_text()
    assert "stack body 2" in text and "stack body 1" not in text and "worker body" in text
    assert text.count("<!-- bench:stack -->") == 1
    table = text.split("<!-- bench:")[0]
    assert "| 90/s | pgbench 1000 tps | 0.090 | **not met** |" in table
    assert "| 40.0 s | - | - | **not met** |" in table
    assert "not run (`scripts/bench ws`)" in table and "not run (`scripts/bench read`)" in table
    assert "Rerun: `scripts/bench worker`" in text
    assert len(table.split("\n\n")[1].splitlines()) <= 5  # the hand-written lines


def test_a_missing_subcommand_module_says_not_available(monkeypatch, capsys):
    monkeypatch.setattr(dispatcher, "SUBCOMMANDS", ("stack", "nosuchbench"))
    assert dispatcher.main(["nosuchbench"]) == 2
    assert "not available" in capsys.readouterr().err
