"""`bus ui`: the console, a live web page of the bus, on this machine.

    bus ui [--port 4280] [--host 127.0.0.1] [--operator [--by NAME]]

It connects with --creds/BUS_CREDS when given, else with the home's console credential
(`<home>/auth/creds/console.nk`, which `bus up` writes: the server lets it read and query, nothing
more), or with `--operator` the home's admin credential; it prints its address once it serves and
runs until Ctrl-C or SIGTERM. Read-only unless `--operator`, which needs the admin credential (one
the home's registry or the file itself says is another identity's is refused at once; the server
enforces the rest): then dead letters can be retried from the page (recorded with `--by`). A home
set up before the console had a credential of its own: the admin's, read-only by the console's
own choice. It listens on loopback only: the page has no login of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
from pathlib import Path

from bus.cli.common import (
    CliError,
    add_connection_options,
    admin_credentials,
    bus_config,
    credentials_for,
    out,
    port_number,
    probe_server,
)
from bus.config import check_name
from bus.console.config import DEFAULT_UI_PORT, LOOPBACK_HOSTS, ConsoleConfig
from bus.errors import ConfigurationError
from bus.identity import CredentialRegistry, Role
from bus.identity.keys import load_credential


def register(sub: argparse._SubParsersAction) -> None:
    ui = sub.add_parser(
        "ui", help="serve the console: a live web page of agents, traffic, conversations, memory and model calls",
        description="Serve the console on this machine until Ctrl-C. Read-only unless --operator.",
    )
    ui.add_argument("--port", type=port_number_or_zero, default=DEFAULT_UI_PORT,
                    help="TCP port to serve on (default %(default)s; 0 picks a free one)")
    ui.add_argument("--host", default="127.0.0.1", help="loopback address to listen on (default %(default)s)")
    ui.add_argument("--operator", action="store_true",
                    help="allow operator actions (retry dead letters); needs the admin credential")
    ui.add_argument("--by", default=None, help="with --operator: the name actions are recorded under "
                    "(default console-<your user name>)")
    add_connection_options(ui)
    ui.set_defaults(func=run_ui)


def port_number_or_zero(text: str) -> int:
    """An argparse type: a TCP port, or 0 for a free one."""
    return 0 if text.strip() == "0" else port_number(text)


def console_config(args: argparse.Namespace) -> ConsoleConfig:
    """The console's config from `bus ui`'s options. Raises CliError for a host that is not
    loopback, or --operator without the admin credential."""
    from bus.console.routes import default_operator_name

    if args.host not in LOOPBACK_HOSTS:
        raise CliError(
            f"--host {args.host}: the console listens on loopback only ({', '.join(LOOPBACK_HOSTS)}); it has no login "
            "of its own, so reach it from elsewhere through an SSH tunnel (ssh -L 4280:127.0.0.1:4280 host)"
        )
    operator_name = args.by or default_operator_name()
    check_name(operator_name, "--by name")
    if args.operator:
        given = credentials_for(args)
        role = None if given is None else credential_role(given, Path(args.home))
        if role is not None and role != Role.ADMIN.value:
            admin = admin_credentials(Path(args.home))
            raise CliError(
                f"--operator needs the admin credential ({admin or '<home>/auth/creds/admin.nk'}); {given} is "
                f"{'an' if role[0] in 'aeiou' else 'a'} {role}'s: the console would be refused what it tries"
            )
    return ConsoleConfig(host=args.host, port=args.port, operator=args.operator, operator_name=operator_name)


def console_credentials(args: argparse.Namespace) -> Path | None:
    """The credential the console connects with: --creds (or BUS_CREDS); else, read-only, the
    home's console credential when there is one; else (--operator, or an older home) the home's
    admin credential; None without authorization. Raises CliError for a --creds file that does
    not exist."""
    if getattr(args, "creds", None) is None and not args.operator:
        console = CredentialRegistry(Path(args.home)).console_credential
        if console.is_file():
            return console
    return credentials_for(args)


def credential_role(path: Path, home: Path) -> str | None:
    """The role of the credential in `path` (admin, service, agent, console) as the home's registry knows
    its key, else as the file says; None when neither tells. Raises CliError for an unreadable
    file."""
    try:
        credential = load_credential(path)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    for identity in CredentialRegistry(home).identities():
        if identity.public_key == credential.public_key:
            return identity.role.value
    first = path.read_text(errors="replace").splitlines()[:1]
    said = re.match(r"# Continuum credential: (\w+) ", first[0]) if first else None
    return said.group(1) if said else None


async def run_ui(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM. Raises CliError (no server, the port is taken)."""
    from bus.console.serve import serve

    config = console_config(args)
    credentials = console_credentials(args)
    settings = bus_config(args, name="console", **({} if credentials is None else {"credentials": str(credentials)}))
    await probe_server(settings.url, shown=settings.shown_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def ready(url: str) -> None:
        mode = "operator: dead letters can be retried" if config.operator else "read-only"
        out(f"console at {url} ({mode}; Ctrl-C to stop)")

    try:
        await serve(config, settings, stop=stop, ready=ready)
    except OSError as exc:
        raise CliError(f"cannot serve the console on {args.host}:{args.port}: {exc}; pick another --port") from exc
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
