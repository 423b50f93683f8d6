"""Replaying a conversation from the page: `bus replay <correlation-id>` run for it, its verdict
and its report shown.

A replay re-runs the recorded handlers on the recorded model answers in a process of its own
(no model is called, nothing is written to the log) and compares what they produce with what
the log holds. The console runs the `bus` command rather than importing the agents layer: like
the CLI, it composes the layers from outside. One replay runs at a time, each within
`timeout_s`; it connects as the console does (same servers, namespace, credential, TLS CA).
"""

from __future__ import annotations

import asyncio
import os
import sys

import msgspec

from bus.config import BusConfig

MAX_OUTPUT_CHARS = 20_000


class ReplayBusy(Exception):
    """Another replay is running (HTTP 409)."""


class ReplayResult(msgspec.Struct, frozen=True, kw_only=True):
    """`same`: the replay produced exactly the recorded events (None: it could not run);
    `exit_code` of `bus replay`; its report (standard output, then standard error)."""

    correlation_id: str
    same: bool | None
    exit_code: int | None
    output: str


class ReplayRunner:
    """Runs `bus replay` for the console, one at a time."""

    def __init__(self, config: BusConfig, timeout_s: float = 120.0) -> None:
        self._config = config
        self._timeout_s = timeout_s
        self._lock = asyncio.Lock()

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
        env["BUS_URL"] = ",".join(self._config.servers)
        env["BUS_NAMESPACE"] = self._config.namespace
        if self._config.credentials:
            env["BUS_CREDS"] = self._config.credentials
        if self._config.tls is not None and self._config.tls.ca_file:
            env["BUS_TLS_CA"] = self._config.tls.ca_file
        if self._config.monitor_url:
            env["BUS_MONITOR_URL"] = self._config.monitor_url
        return env

    async def run(self, correlation_id: str) -> ReplayResult:
        """Replay `correlation_id` (an id already checked by the caller). Raises ReplayBusy."""
        if self._lock.locked():
            raise ReplayBusy("a replay is running already; try again when it has finished")
        async with self._lock:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bus.cli.main", "replay", correlation_id, env=self._env(),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            try:
                async with asyncio.timeout(self._timeout_s):
                    stdout, stderr = await proc.communicate()
            except TimeoutError:
                proc.kill()
                await proc.wait()
                return ReplayResult(correlation_id=correlation_id, same=None, exit_code=None,
                                    output=f"the replay did not finish within {self._timeout_s:.0f}s")
            except BaseException:
                proc.kill()
                await proc.wait()
                raise
        output = (stdout.decode(errors="replace") + stderr.decode(errors="replace"))[-MAX_OUTPUT_CHARS:]
        same = True if proc.returncode == 0 and "same events: yes" in output else (False if proc.returncode in (0, 1) else None)
        return ReplayResult(correlation_id=correlation_id, same=same, exit_code=proc.returncode, output=output)
