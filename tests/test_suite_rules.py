"""Rules of the test suite itself: shared helpers live in one place (helpers.py, fixtures in
conftest.py), so no test module imports another test module, or conftest (pytest loads it
itself; importing it runs it a second time under another name)."""

from __future__ import annotations

from pathlib import Path

from helpers import imported_packages

TESTS = Path(__file__).resolve().parent


def local_imports(path: Path) -> set[str]:
    """The modules of tests/ that ``path`` imports (anywhere in it, inside functions too)."""
    return imported_packages(path) & {p.stem for p in TESTS.glob("*.py")}


def test_no_test_module_imports_another_or_conftest():
    offenders = {p.name: sorted(local_imports(p) - {"helpers"}) for p in sorted(TESTS.glob("*.py"))
                 if p.name != "helpers.py"}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"move what these share into tests/helpers.py (fixtures: conftest.py): {offenders}"


def test_the_rule_sees_imports(tmp_path):
    """The check can fail: it finds test modules imported at the top and inside a function."""
    bad = tmp_path / "test_bad.py"
    bad.write_text("import os\nfrom test_train import SMALL\n\n\ndef f():\n    import conftest\n"
                   "    from helpers import free_port\n")
    assert local_imports(bad) == {"test_train", "conftest", "helpers"}
