"""The CI's dependency audit fails on a known vulnerability and says what it could not audit."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "dependency_audit.py"
spec = importlib.util.spec_from_file_location("dependency_audit", SCRIPT)
dependency_audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dependency_audit)

CLEAN = {"name": "django", "version": "5.2.19", "vulns": []}
VULNERABLE = {
    "name": "daphne",
    "version": "4.2.1",
    "vulns": [{"id": "CVE-2026-44545", "fix_versions": ["4.2.2"]}],
}
UNKNOWN = {"name": "inhouse", "skip_reason": "Dependency not found on PyPI"}


def test_a_known_vulnerability_fails_the_audit_and_names_the_fix():
    code, lines = dependency_audit.verdict({"dependencies": [CLEAN, VULNERABLE]}, strict=False)
    assert code == 1
    assert "VULNERABLE daphne 4.2.1: CVE-2026-44545 (fixed in 4.2.2)" in lines


def test_clean_dependencies_pass():
    code, lines = dependency_audit.verdict({"dependencies": [CLEAN]}, strict=True)
    assert code == 0
    assert lines[-1] == "dependency audit: 1 audited, 0 not audited, 0 vulnerable"


def test_dependencies_it_could_not_audit_are_named_and_fail_only_when_strict():
    report = {"dependencies": [CLEAN, UNKNOWN]}
    assert dependency_audit.verdict(report, strict=True)[0] == 1
    code, lines = dependency_audit.verdict(report, strict=False)
    assert code == 0
    assert "not audited (no record at the vulnerability service): inhouse" in lines


def test_an_unreachable_vulnerability_service_is_a_loud_warning():
    code, lines = dependency_audit.verdict({"dependencies": [UNKNOWN]}, strict=False)
    assert code == 0
    assert lines[-1].startswith("WARNING: the vulnerability data could not be reached")
