"""The console beside what `bus up` starts: its command line, its port, waiting until it serves.

`bus up` runs `bus ui` under the keeper (bus.cli.keeper), foreground or detached, like the
projection service: a console that dies is started again; `bus down` stops it first. It connects
with the home's console credential (`<home>/auth/creds/console.nk`), so the server keeps it
read-only; `bus up --ui-operator` starts it with the admin credential and `--operator` instead
(dead letters can be retried from the page), as `bus ui --operator` does on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

from bus.cli.common import CliError
from bus.console.config import DEFAULT_UI_PORT
from bus.console.serve import url_of
from bus.identity import CredentialRegistry
from bus.server import free_port_outside_ephemeral_range, port_bindable

READY_POLL_S = 0.05


def add_console_options(parser: argparse.ArgumentParser, port_type: Callable[[str], int]) -> None:
    """--no-ui, --ui-port and --ui-operator for `bus up`."""
    parser.add_argument("--no-ui", action="store_true", help="do not start the console (`bus ui`)")
    parser.add_argument(
        "--ui-port", type=port_type, default=None,
        help=f"the console's port on 127.0.0.1 (default {DEFAULT_UI_PORT}, or a free one when that is taken)",
    )
    parser.add_argument(
        "--ui-operator", action="store_true",
        help="start the console as an operator (the admin credential): dead letters can be retried from the page",
    )


def console_command(args: argparse.Namespace, url: str, home: Path) -> tuple[list[str], str] | None:
    """(the console's command line under the keeper, its address), or None with --no-ui.
    Raises CliError when --ui-port is taken."""
    # Callers that build `bus up`'s arguments themselves (the demo's embedded server, stopped at
    # its end) start no console unless they say --no-ui=False.
    if getattr(args, "no_ui", True):
        return None
    port = getattr(args, "ui_port", None)
    if port is None:
        # Named on the console's command line before it binds: outside the ephemeral range, where
        # no outgoing connection can take it meanwhile.
        port = DEFAULT_UI_PORT if port_bindable(DEFAULT_UI_PORT) else free_port_outside_ephemeral_range()
    elif not port_bindable(port):
        suggestion = free_port_outside_ephemeral_range()
        raise CliError(f"--ui-port {port}: 127.0.0.1:{port} is in use; pick another (e.g. --ui-port {suggestion})")
    command = [
        sys.executable, "-m", "bus.cli.keeper",
        "--metrics-home", str(home), "--child", "console", "--namespace", args.namespace, "--",
        sys.executable, "-m", "bus.cli.main", "ui", "--port", str(port),
        "--url", url, "--namespace", args.namespace, "--home", str(home),
    ]
    registry = CredentialRegistry(home)
    operator = getattr(args, "ui_operator", False)
    credential = registry.admin_credential if operator else registry.console_credential
    if not getattr(args, "no_auth", False) and credential.is_file():
        command += ["--creds", str(credential)]
    if operator:
        command.append("--operator")
    return command, url_of("127.0.0.1", port)


async def console_answers(url: str, timeout_s: float = 1.0) -> bool:
    """True when the console at `url` answers `/api/info` with 200."""
    host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            try:
                writer.write(f"GET /api/info HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
                await writer.drain()
                status = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return status.split()[1:2] == [b"200"]


async def wait_console_ready(url: str, exit_code: Callable[[], int | None], timeout_s: float) -> bool:
    """Wait until the console serves; False if it did not within `timeout_s` or its keeper ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if exit_code() is not None:
            return False
        if await console_answers(url):
            return True
        await asyncio.sleep(READY_POLL_S)
    return False


def console_summary(args: argparse.Namespace, home: Path, url: str | None, pid: int | None, ready: bool, *, detached: bool) -> str:
    """What `bus up` says about the console."""
    if url is None:
        return "off (--no-ui)"
    log = f", log {home / 'console.log'}" if detached else ""
    mode = "operator" if getattr(args, "ui_operator", False) else "read-only"
    state = mode if ready else "started, not serving yet"
    return f"{url} (pid {pid}, {state}{log})"
