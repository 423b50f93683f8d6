"""The README's two commands are the ones CI and newcomers run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _first_code_block(text: str) -> list[str]:
    match = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert match, "README has no code block"
    return [line for line in match.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    """The first code block of the README holds two commands; .ci/run runs the second verbatim
    (after installing the browser the console's tests drive, when it is missing)."""
    commands = _first_code_block((ROOT / "README.md").read_text())
    assert len(commands) == 2, commands
    main_command, test_command = commands
    assert "bus " in main_command and "pytest" in test_command
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    *prelude, run = ci_lines
    assert run == test_command
    # Before it, only the console's browser: Chromium installed when missing, and required.
    allowed = ("if [ ! -x /usr/bin/chromium ]; then", "apt-get update && apt-get install -y chromium", "fi",
               "export CONTINUUM_REQUIRE_BROWSER=1")
    assert [line.strip() for line in prelude if line.strip() not in allowed] == [], prelude
