"""Entry point of the `bus` command.

Subcommands come from command modules, each exposing `register(subparsers)`; a subcommand sets
`func=` to `async def run(args) -> int`. Modules of layers above the bus (projections, agents) are
looked up by name: the CLI is the composition root, the one place that sees every layer.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from bus.cli.common import CliError, ReaderGone, silence_stdout
from bus.errors import BusError, BusUnavailable, ConfigurationError, PermissionDenied

COMMAND_MODULES = (
    "bus.cli.server_commands",     # up, down
    "bus.cli.message_commands",    # send, broadcast, request, tail
    "bus.cli.ops_commands",        # status, schema
    "bus.cli.stream_commands",     # stream info|update
    "bus.cli.dlq_commands",        # dlq list|show|retry
    "bus.cli.creds_commands",      # creds issue|list|revoke
    "bus.cli.forget_command",      # forget
    "bus.cli.metrics_commands",    # metrics targets
    "bus.cli.bench_command",       # bench
    "bus.cli.smoke_command",       # smoke
    "bus.cli.console_commands",    # ui
    "projections.cli",             # projections run|rebuild|status, query
    "projections.archive.cli",     # archive run|list|verify
    "agents.cli",                  # agent start|ps|stop|logs, trace
    "agents.research.cli",         # demo research, replay
    "agents.mcp.cli",              # mcp
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"error: {message}\n(run `{self.prog} --help` for the options)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bus", description="Continuum: an event-sourced message bus for stateful AI agents.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
                continue  # that layer (or its package) has no commands yet
            raise
        module.register(sub)
    return parser


def _quiet_tls_eof(record: logging.LogRecord) -> bool:
    """Drop asyncio's notice that a stream protocol upgraded to TLS (nats-py's) asked to keep
    a closing connection half-open: harmless, and printed at every TLS disconnect."""
    return "eof_received() has no effect when using ssl" not in record.getMessage()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("asyncio").addFilter(_quiet_tls_eof)
    try:
        code = asyncio.run(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (ReaderGone, BrokenPipeError):
        # The reader of standard output went away (`bus ... | head`): nobody is left to tell.
        silence_stdout()
        return 0
    except (CliError, ConfigurationError, BusUnavailable, PermissionDenied) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except BusError as exc:
        sys.stderr.write(f"error: {type(exc).__name__}: {exc}\n")
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main(os.sys.argv[1:]))
