"""The layering of the product packages, read from their source (no imports executed).

    schemas      the envelope and payload types        imports nothing of the others
    bus          the one NATS transport and the CLI    imports schemas
    projections  the DuckDB views                      imports bus, schemas
    agents       the agent runtime, LLM agents, demo   imports bus, schemas (and projections)

Only `bus/` talks to NATS: no other package imports `nats`, nor reaches into a Bus for its
connection (`.nc`, `.js`, `.transport.nc`). No product module uses a private member of nats-py.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "bus", "projections", "agents")
# What each package may import of the others (imports only point down).
ALLOWED = {
    "schemas": set(),
    "bus": {"schemas"},
    "projections": {"schemas", "bus"},
    "agents": {"schemas", "bus", "projections"},
}
# Attribute chains that hand out a Bus's NATS connection; bus/ alone may use them.
_CONNECTION_REACH = re.compile(r"\b(?:bus|_bus|self\.bus|self\._bus)\.(?:nc|js|transport\.nc|transport\.js)\b")
_NATS_PY_PRIVATE = re.compile(r"\._send_command|_flush_pending|_flush_queue|\._server_info\b|\bnc\._\w")


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) for every import in the file, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_only_point_down(package: str) -> None:
    forbidden = set(PACKAGES) - ALLOWED[package] - {package}
    hits = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in _modules(package)
        for line, module in _imported(path)
        if module in forbidden
    ]
    assert hits == []


@pytest.mark.parametrize("package", ["schemas", "projections", "agents"])
def test_only_bus_imports_nats(package: str) -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in _modules(package)
        for line, module in _imported(path)
        if module == "nats"
    ]
    assert hits == []


@pytest.mark.parametrize("package", ["schemas", "projections", "agents"])
def test_nothing_outside_bus_reaches_for_the_connection(package: str) -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _modules(package)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _CONNECTION_REACH.search(line)
    ]
    assert hits == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_member_of_nats_py(package: str) -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _modules(package)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _NATS_PY_PRIVATE.search(line)
    ]
    assert hits == []


def test_the_checks_see_a_violation(tmp_path: Path) -> None:
    """The scanners are not blind: a module that breaks each rule is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("import nats\nfrom agents.runtime import x\n\ndef f(bus):\n    return bus.nc._server_info\n")
    assert [m for _, m in _imported(bad)] == ["nats", "agents"]
    text = bad.read_text()
    assert _CONNECTION_REACH.search(text) and _NATS_PY_PRIVATE.search(text)
