"""Every long-running Continuum process serves its own metrics, and says where.

    target = ScrapeTarget.of("agent", namespace="default", agent="greeter", replica="0")
    async with serve_metrics(registry, target=target, targets_dir=targets_dir(home)) as endpoint:
        endpoint.address                   # "127.0.0.1:41234"

A process serves Prometheus text on 127.0.0.1 (`/metrics`), on the port it was given or, by
default, on one the kernel picks as the process binds it (port 0: no port is chosen first and
bound later, so two processes never race for one). It then registers itself as a Prometheus
file_sd target: `<home>/metrics-targets/<process>.<...>.json`, written atomically, removed again
on a clean exit. A Prometheus with `file_sd_configs: [{files: ["<home>/metrics-targets/*.json"]}]`
finds every process as it comes and goes; `bus metrics targets` lists them.

Each target's labels say which process it is (`process`, `namespace`, and `agent`, `replica` or
`service`) and give it an `instance` that stays the same across restarts, though the port changes.
A file left by a process that was killed names an address nobody answers: Prometheus shows it as
`up == 0` until the process is started again (which replaces the file) or the file is removed
(`bus metrics targets --prune`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import msgspec
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server

log = logging.getLogger("continuum.metrics")

TARGETS_DIR = "metrics-targets"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class ScrapeTarget(msgspec.Struct, frozen=True, kw_only=True):
    """Who a process is, as Prometheus should label it. `name` is its target file's stem (one
    per process identity: a restarted replica replaces its predecessor's file)."""

    name: str
    labels: dict[str, str]

    @classmethod
    def of(cls, process: str, **identity: str) -> "ScrapeTarget":
        """The target of a `process` (agent, supervisor, projections, bus_up) identified by
        `identity` (label name -> value, in order: namespace first, then the process's name)."""
        parts = [process, *(_UNSAFE.sub("_", value) for value in identity.values())]
        name = ".".join(parts)
        instance = f"{socket.gethostname()}/{'/'.join(parts)}"
        return cls(name=name, labels={"process": process, **identity, "instance": instance})


class TargetGroup(msgspec.Struct, frozen=True):
    """One file_sd target group (Prometheus' format: `targets` and `labels`)."""

    targets: list[str]
    labels: dict[str, str] = {}


class RegisteredTarget(msgspec.Struct, frozen=True, kw_only=True):
    """A target file found under a targets directory."""

    path: Path
    address: str
    labels: dict[str, str]


class MetricsEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where a process serves its metrics (`address` is host:port) and the target file it wrote
    (None when it registered none)."""

    address: str
    target_file: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"


def targets_dir(home: Path) -> Path:
    """The file_sd directory of a state home."""
    return home / TARGETS_DIR


def add_process_metrics(registry: CollectorRegistry) -> None:
    """Register the standard `process_*` (CPU, memory, open files, start time) and `python_info`
    metrics on `registry` (prometheus-client registers them on its global registry otherwise)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


@contextlib.asynccontextmanager
async def serve_metrics(
    registry: CollectorRegistry,
    *,
    port: int | None = None,
    target: ScrapeTarget | None = None,
    targets_dir: Path | None = None,
) -> AsyncIterator[MetricsEndpoint]:
    """Serve `registry` on 127.0.0.1:`port` (None: a port the kernel picks) for the duration of
    the block, from prometheus-client's HTTP thread, and register `target` in `targets_dir`.

    Raises OSError when the port cannot be bound. A target file that cannot be written is
    logged, not raised: the process's work matters more than its registration.
    """
    server, thread = await asyncio.to_thread(start_http_server, port or 0, "127.0.0.1", registry)
    address = f"127.0.0.1:{server.server_port}"
    target_file: Path | None = None
    try:
        if target is not None and targets_dir is not None:
            try:
                target_file = await asyncio.to_thread(_register, targets_dir, target, address)
            except OSError as exc:
                log.warning("serving metrics on %s, but cannot register it in %s: %s", address, targets_dir, exc)
        yield MetricsEndpoint(address=address, target_file=target_file)
    finally:
        if target_file is not None:
            await asyncio.to_thread(_unregister, target_file, address)
        # shutdown() waits for the serving loop's next poll (up to 0.5 s): off the event loop.
        await asyncio.to_thread(_stop_server, server, thread)


def _stop_server(server: WSGIServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=2)


def _register(directory: Path, target: ScrapeTarget, address: str) -> Path:
    """Write `target`'s file atomically (a reader never sees half of it). Raises OSError."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{target.name}.json"
    # Not *.json, so a Prometheus watching the directory ignores it until it is complete.
    tmp = directory / f".{target.name}.{os.getpid()}.tmp"
    tmp.write_bytes(msgspec.json.encode([TargetGroup(targets=[address], labels=target.labels)]))
    tmp.replace(path)
    return path


def _unregister(path: Path, address: str) -> None:
    """Remove our target file, unless another process has taken it over since (a replica
    restarted in our place registers under the same name)."""
    registered = read_target(path)
    if registered is not None and registered.address == address:
        with contextlib.suppress(OSError):
            path.unlink()


def read_target(path: Path) -> RegisteredTarget | None:
    """The target registered in file `path`, or None when it is missing or not ours to read."""
    try:
        groups = msgspec.json.decode(path.read_bytes(), type=list[TargetGroup])
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    if len(groups) != 1 or len(groups[0].targets) != 1:
        return None
    return RegisteredTarget(path=path, address=groups[0].targets[0], labels=groups[0].labels)


def read_targets(directory: Path) -> list[RegisteredTarget]:
    """Every target registered in `directory`, by file name ([] when there is none)."""
    found = (read_target(path) for path in sorted(directory.glob("*.json")))
    return [target for target in found if target is not None]
