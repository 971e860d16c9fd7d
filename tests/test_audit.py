"""scripts/audit's judgement of pip-audit's JSON report (scripts/audit_report.py)."""
import json
import runpy

from tests.support.common import ROOT

verdict = runpy.run_path(str(ROOT / "scripts" / "audit_report.py"))["verdict"]

CLEAN = {"name": "flask", "version": "3.1.3", "vulns": []}
VULN = {"name": "flask", "version": "0.12", "vulns": [
    {"id": "PYSEC-2018-66", "fix_versions": ["0.12.3"], "description": "..."}]}
SKIPPED = {"name": "celery", "skip_reason": "Dependency not found on PyPI and could not be audited"}


def report(*deps) -> str:
    return json.dumps({"dependencies": list(deps), "fixes": []})


def test_a_known_vulnerability_fails_strict_or_not():
    for strict in (True, False):
        status, lines = verdict(report(CLEAN, VULN), strict)
        assert status == 1 and any("PYSEC-2018-66" in line for line in lines)


def test_a_package_not_audited_fails_only_when_strict():
    assert verdict(report(CLEAN, SKIPPED), True)[0] == 1
    status, lines = verdict(report(CLEAN, SKIPPED), False)
    assert status == 0 and any("not audited" in line and "celery" in line for line in lines)


def test_everything_audited_and_clean_passes():
    status, lines = verdict(report(CLEAN), True)
    assert status == 0 and lines == ["1 audited, no known vulnerability"]


def test_no_report_fails():
    assert verdict("", False)[0] == 1
    assert verdict("Traceback (most recent call last):", False)[0] == 1
