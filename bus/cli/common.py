"""What every `bus` subcommand shares: building config from arguments, metrics, output, errors."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server

from bus.config import DEFAULT_URL, BusConfig, check_name, split_urls
from bus.errors import ConfigurationError
from bus.scrape import MetricsEndpoint, ScrapeTarget, add_process_metrics, serve_metrics, targets_dir

if TYPE_CHECKING:
    from bus.client import Bus
    from schemas import PayloadRegistry

# Where `bus up` keeps its server, pid and state unless told otherwise (relative to cwd).
DEFAULT_HOME = Path(".continuum")


class CliError(Exception):
    """A user-facing failure: printed as `error: <message>` and exit code 2. Say what was wrong
    and how to fix it."""


class ReaderGone(Exception):
    """Whoever read standard output went away (`bus tail | head -2`): the command has nobody to
    answer and ends quietly, exit code 0."""


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """--url, --namespace, --home and --creds, with defaults from BUS_URL, BUS_NAMESPACE,
    BUS_HOME and BUS_CREDS."""
    parser.add_argument(
        "--creds", type=Path, default=Path(os.environ["BUS_CREDS"]) if os.environ.get("BUS_CREDS") else None,
        metavar="FILE",
        help="nkey credential file to connect with (env BUS_CREDS; default: the admin credential "
        "`bus up` wrote under <home>/auth/creds/, when there is one)",
    )
    parser.add_argument(
        "--url", default=os.environ.get("BUS_URL", DEFAULT_URL),
        help="NATS server URL, or a cluster's seed URLs comma-separated (env BUS_URL; default %(default)s)",
    )
    parser.add_argument(
        "--namespace", default=os.environ.get("BUS_NAMESPACE", "default"),
        help="namespace: one log stream per namespace (env BUS_NAMESPACE; default %(default)s)",
    )
    parser.add_argument(
        "--home", type=Path, default=Path(os.environ.get("BUS_HOME", DEFAULT_HOME)),
        help="directory for the embedded server's store, pid file and views (env BUS_HOME; default %(default)s)",
    )


def add_metrics_option(parser: argparse.ArgumentParser, *, always: bool = False) -> None:
    """--metrics-port for long-running commands (`always`: they serve metrics on a port of the
    kernel's choosing without it, registered under <home>/metrics-targets)."""
    help_text = "serve Prometheus metrics on 127.0.0.1:PORT/metrics while running"
    if always:
        help_text += (" (default: a free port, registered as a Prometheus file_sd target in "
                      "<home>/metrics-targets; see `bus metrics targets`)")
    parser.add_argument("--metrics-port", type=int, default=None, help=help_text)


def bus_config(args: argparse.Namespace, *, name: str = "cli", **overrides: object) -> BusConfig:
    """The BusConfig for a command, from its connection options (and the monitor URL that
    `bus up` recorded, so the fsync check runs against the embedded server)."""
    from bus.cli.state import read_state  # local: state depends on common for CliError

    monitor_url = os.environ.get("BUS_MONITOR_URL") or None
    state = read_state(args.home)
    # The servers `bus up` started, named in full or in part (one node of a cluster).
    ours = state is not None and bool(set(split_urls(state.url)) & set(split_urls(args.url)))
    if monitor_url is None and ours:
        monitor_url = state.monitor_url
    fields: dict[str, object] = {"url": args.url, "namespace": args.namespace, "name": name, "monitor_url": monitor_url}
    tls_from_env = any(os.environ.get(k) for k in ("BUS_TLS_CA", "BUS_TLS_CERT", "BUS_TLS_KEY"))
    if ours and state.tls is not None and not tls_from_env:
        fields["tls"] = state.tls  # the CA `bus up --tls` made
    credentials = credentials_for(args)
    if credentials is not None:
        fields["credentials"] = str(credentials)
    fields.update(overrides)
    # The rest (BUS_REPLICAS, BUS_PLACEMENT_TAGS, TLS, inbox prefix) from the environment.
    return BusConfig.from_env(**fields)


def credentials_for(args: argparse.Namespace) -> Path | None:
    """The credential file a command connects with: --creds (or BUS_CREDS), else the admin
    credential of the home `bus up` set authorization up in, else None. Raises CliError for a
    --creds file that does not exist."""
    given = getattr(args, "creds", None)
    if given is not None:
        if not Path(given).is_file():
            raise CliError(f"the credential file {given} does not exist (--creds / BUS_CREDS)")
        return Path(given)
    home = getattr(args, "home", None)
    return None if home is None else admin_credentials(Path(home))


def admin_credentials(home: Path) -> Path | None:
    """The admin credential `bus up` wrote in `home`, or None when authorization was never set
    up there."""
    from bus.identity import CredentialRegistry

    admin = CredentialRegistry(home).admin_credential
    return admin if admin.is_file() else None


@contextlib.contextmanager
def metrics_server(registry: CollectorRegistry, port: int | None) -> Iterator[None]:
    """Serve `registry` on 127.0.0.1:`port` for the duration of the block (no-op when None).

    Raises CliError when the port cannot be bound.
    """
    if port is None:
        yield
        return
    try:
        server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    except OSError as exc:
        raise CliError(f"cannot serve metrics on 127.0.0.1:{port}: {exc}; pick another --metrics-port") from exc
    try:
        yield
    finally:
        server.shutdown()
        thread.join(timeout=2)


@contextlib.asynccontextmanager
async def metrics_endpoint(
    registry: CollectorRegistry, port: int | None, target: ScrapeTarget, home: Path
) -> AsyncIterator[MetricsEndpoint]:
    """Serve a long-running command's metrics (with the `process_*` ones) on 127.0.0.1:`port`, or
    on a port of the kernel's choosing when None, registered as a scrape target under `home`
    (bus.scrape). Raises CliError when the port cannot be bound."""
    add_process_metrics(registry)
    async with contextlib.AsyncExitStack() as stack:
        try:
            endpoint = await stack.enter_async_context(
                serve_metrics(registry, port=port, target=target, targets_dir=targets_dir(home))
            )
        except OSError as exc:
            raise CliError(f"cannot serve metrics on 127.0.0.1:{port}: {exc}; pick another --metrics-port") from exc
        yield endpoint


NO_SERVER_HINT = "run `bus up --detach` to start the embedded server, or set BUS_URL (or --url) to a running one"


async def probe_server(url: str | tuple[str, ...], timeout_s: float = 2.0, *, shown: str | None = None) -> None:
    """Raise CliError saying how to start a server when nothing accepts connections at `url`
    (any of its comma-separated URLs), or when a URL cannot be used."""
    from bus.client import server_reachable

    try:
        reachable = await server_reachable(url, timeout_s)
    except ConfigurationError as exc:
        raise CliError(f"cannot use the NATS URL: {exc}") from exc
    if not reachable:
        raise CliError(f"no NATS server is running at {shown or url}: {NO_SERVER_HINT}")


@contextlib.asynccontextmanager
async def open_bus(
    args: argparse.Namespace,
    *,
    name: str = "cli",
    registry: "PayloadRegistry | None" = None,
    metrics_registry: CollectorRegistry | None = None,
) -> AsyncIterator["Bus"]:
    """A connected `Bus` for a command, after checking a server answers at `args.url`.

    Raises CliError (exit 2) when no server is running or the connection cannot be made.
    """
    from bus.client import Bus
    from bus.errors import BusUnavailable

    config = bus_config(args, name=name)
    await probe_server(config.url, shown=config.shown_url)
    bus = Bus(config, registry=registry, metrics_registry=metrics_registry)
    try:
        async with asyncio.timeout(config.connect_timeout_s + 10.0):
            await bus.__aenter__()
    except (BusUnavailable, TimeoutError) as exc:
        raise CliError(f"cannot connect to NATS at {config.shown_url} ({exc or 'timed out'}): {NO_SERVER_HINT}") from exc
    try:
        yield bus
    except BaseException as exc:
        await bus.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    await bus.__aexit__(None, None, None)


def _whole(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1..65535 (else a message saying what was wrong)."""
    value = _whole(text, "a port number")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 1..65535")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (else a message saying what was wrong)."""
    value = _whole(text, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def niceness(text: str) -> int:
    """An argparse type: a CPU niceness, 0 (normal) to 19 (lowest)."""
    value = _whole(text, "a whole number")
    if not 0 <= value <= 19:
        raise argparse.ArgumentTypeError(f"{value} is not a niceness: use 0 (normal) to 19 (lowest)")
    return value


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_time(text: str, *, now: datetime | None = None) -> datetime:
    """An argparse type: a moment, as an ISO time (`2026-12-07T09:30`, local time unless it names
    a zone) or an age back from now (`90s`, `10m`, `2h`, `1d`). Returned in UTC."""
    text = text.strip()
    now = now or datetime.now(timezone.utc)
    unit = _AGE_UNITS.get(text[-1:].lower())
    if unit is not None and text[:-1].replace(".", "", 1).isdigit():
        return now - timedelta(seconds=float(text[:-1]) * unit)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO time (2026-12-07T09:30) nor an age (90s, 10m, 2h, 1d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time, as a person typing it means
    if moment > now + timedelta(minutes=1):
        raise argparse.ArgumentTypeError(f"{text!r} is in the future")
    return moment.astimezone(timezone.utc)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0 (else a message saying what was wrong)."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number of 0 or more (else a message saying what was wrong)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def out(line: str) -> None:
    """Print one line of command output and flush (output is often piped and watched live).
    Raises ReaderGone when the reader of standard output closed it."""
    write_out(line + "\n")


def write_out(text: str) -> None:
    """Write `text` to standard output and flush. Raises ReaderGone when its reader closed it
    (standard output then points at /dev/null, so nothing later fails on it, the interpreter's
    own flush at exit included)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
        raise ReaderGone() from None


def silence_stdout() -> None:
    """Point standard output at /dev/null: what is still buffered for a reader that is gone
    would otherwise fail again at the next flush."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)


def user_sender_name() -> str:
    """The OS user's name when it is a valid sender name, else "cli": who a command's recorded
    operator action (a retry, a stop) names when not told."""
    try:
        return check_name(getpass.getuser(), "user name")
    except (OSError, KeyError, ConfigurationError):
        return "cli"
