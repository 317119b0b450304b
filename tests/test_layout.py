"""The package layout's rules: the library (flowscale/) never imports launch/ or data_prep/
(they plug their commands in through the ``flowscale.commands`` entry points), and a command
imports no tool it does not run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import flowscale
from helpers import imported_packages

LIBRARY = Path(flowscale.__file__).resolve().parent
OUTSIDE = {"launch", "data_prep"}


def imports_outside(path: Path) -> set[str]:
    """The top-level packages of OUTSIDE that ``path`` imports (anywhere in it)."""
    return imported_packages(path) & OUTSIDE


def test_the_library_never_imports_launch_or_data_prep():
    offenders = {str(p.relative_to(LIBRARY)): sorted(imports_outside(p)) for p in LIBRARY.rglob("*.py")}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"the library imports the packages beside it: {offenders}"


def test_the_rule_sees_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    from launch.submit import submit\n    import data_prep.cli\n")
    assert imports_outside(bad) == {"launch", "data_prep"}


def _modules_after(argv: list[str]) -> set[str]:
    code = ("import sys; from flowscale.cli import build_parser; build_parser(sys.argv[1:]); "
            "print('\\n'.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_a_command_imports_only_its_own_tool():
    train = _modules_after(["train", "demo", "train.steps=1"])
    assert not {m for m in train if m.startswith(("flowscale.tools", "launch", "data_prep"))}, sorted(train)
    plan = _modules_after(["plan", "demo"])
    assert "flowscale.tools.plan" in plan and not {m for m in plan if m.startswith(("flowscale.tools.bench", "launch"))}
    every = _modules_after(["--help-is-not-parsed-here"])  # no command named: every command is there (for --help)
    assert {"flowscale.tools.bench", "flowscale.tools.plan", "launch.submit", "data_prep.cli"} <= every


def test_plug_in_commands_come_through_the_entry_points():
    from importlib.metadata import entry_points

    from flowscale.cli import COMMANDS, build_parser

    assert {ep.name: ep.value for ep in entry_points(group=COMMANDS)} == {
        "submit": "launch.submit:add_command", "prep": "data_prep.cli:add_command"}
    ns = build_parser(["submit", "demo", "--dry-run"]).parse_args(["submit", "demo", "--dry-run"])
    assert ns.dry_run and ns.func.__module__ == "launch.submit"
