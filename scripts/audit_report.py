"""Judge one pip-audit JSON report (stdin): exit 1 on a vulnerability, on an unreadable report,
and, when strict (argv[2] != "0"), on a package the service could not audit."""
import json
import sys


def verdict(report: str, strict: bool) -> tuple[int, list[str]]:
    """(exit status, lines to print) for one report."""
    try:
        deps = json.loads(report)["dependencies"]
    except (ValueError, KeyError, TypeError):
        return 1, ["pip-audit gave no report"]
    vulns = [f"{d['name']} {d['version']}: {v['id']} (fixed in {', '.join(v['fix_versions']) or '-'})"
             for d in deps for v in d.get("vulns", [])]
    skipped = [d["name"] for d in deps if d.get("skip_reason")]
    lines = [f"VULNERABLE {line}" for line in vulns]
    if skipped:
        lines.append(f"{'NOT AUDITED' if strict else 'warning: not audited'} "
                     f"({len(skipped)} of {len(deps)}, no answer from the service): "
                     + ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else ""))
    failed = bool(vulns) or (strict and bool(skipped))
    if not failed:
        lines.append(f"{len(deps) - len(skipped)} audited, no known vulnerability")
    return int(failed), lines


if __name__ == "__main__":
    status, lines = verdict(sys.stdin.read(), sys.argv[2] != "0")
    for line in lines:
        print(f"audit {sys.argv[1].rsplit('/', 1)[-1]}: {line}")
    sys.exit(status)
