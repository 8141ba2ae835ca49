"""Usage: .venv/bin/python scripts/dependency_audit.py [--strict] [requirements files...]

Audit the runtime requirements (default: requirements.txt) for known vulnerabilities with
pip-audit, and say plainly what was and was not audited:

- any dependency with a known vulnerability fails the run (exit 1), naming the advisory and the
  versions that fix it;
- a dependency the vulnerability service has no record of is listed as not audited; with
  --strict (or HUB_AUDIT_STRICT=1) that fails the run too, which is right wherever the service is
  reachable. Without it the run passes with a warning, because a machine that cannot reach the
  vulnerability data (PyPI's JSON API or OSV) must still be able to build.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600  # seconds; resolving the requirements installs them into a scratch environment


def verdict(report: dict, *, strict: bool) -> tuple[int, list[str]]:
    """Judge a pip-audit JSON report: the exit code and the lines to print."""
    dependencies = report.get("dependencies", [])
    skipped = [d for d in dependencies if d.get("skip_reason")]
    audited = [d for d in dependencies if not d.get("skip_reason")]
    vulnerable = [d for d in audited if d.get("vulns")]
    lines = []
    for dependency in vulnerable:
        for vuln in dependency["vulns"]:
            fixed = ", ".join(vuln.get("fix_versions") or []) or "no fixed version yet"
            lines.append(
                f"VULNERABLE {dependency['name']} {dependency['version']}: {vuln['id']} "
                f"(fixed in {fixed})"
            )
    if skipped:
        names = ", ".join(d["name"] for d in skipped)
        lines.append(f"not audited (no record at the vulnerability service): {names}")
    lines.append(
        f"dependency audit: {len(audited)} audited, {len(skipped)} not audited, "
        f"{len(vulnerable)} vulnerable"
    )
    if vulnerable:
        return 1, lines
    if skipped and strict:
        return 1, [*lines, "dependency audit: failing because of --strict"]
    if skipped and not audited:
        lines.append(
            "WARNING: the vulnerability data could not be reached from this machine; nothing "
            "was audited. Run with --strict where PyPI's JSON API or OSV answers."
        )
    return 0, lines


def main(argv: list[str]) -> int:
    strict = "--strict" in argv or os.environ.get("HUB_AUDIT_STRICT") == "1"
    files = [arg for arg in argv if not arg.startswith("--")] or ["requirements.txt"]
    command = [sys.executable, "-m", "pip_audit", "--format", "json", "--progress-spinner", "off"]
    for name in files:
        command += ["--requirement", str(ROOT / name)]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    try:
        report = json.loads(result.stdout)
    except ValueError:
        print(result.stdout, result.stderr, sep="\n", file=sys.stderr)
        print("dependency audit: pip-audit failed before it could report", file=sys.stderr)
        return 2
    code, lines = verdict(report, strict=strict)
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
