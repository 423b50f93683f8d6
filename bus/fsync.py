"""Verifying that every server holding the log fsyncs each write before it acks it.

A server's `/varz` says whether it runs with `jetstream { sync_interval: always }`. Only the
server itself can say so, so each node of a cluster is asked on its own monitoring URL
(`BusConfig.monitor_url`, comma-separated). The log's leader and replicas must each be among
the verified nodes; a node that cannot be asked counts as unverified.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
from typing import Any

from bus.config import BusConfig
from bus.errors import ConfigurationError
from bus.server import read_varz

log = logging.getLogger("continuum.bus.fsync")

_HOW = (
    "set `jetstream { sync_interval: always }` in every server's config (the repo's nats.conf "
    "does), or pass require_fsync=False to accept that risk"
)


async def node_fsync(
    monitor_urls: tuple[str, ...], *, enough: frozenset[str] = frozenset()
) -> tuple[dict[str, bool], list[str]]:
    """Ask every monitoring URL at once: ({server name: fsyncs every write}, [URLs that could not
    be read, with the reason]). With `enough` (server names), return as soon as each of them has
    a verdict, without waiting for the other URLs: a hung node (SIGSTOPped, partitioned) answers
    nothing until its timeout, and need not be waited for when it holds no part of the log."""

    async def ask(url: str) -> tuple[str, dict[str, Any] | str]:
        try:
            # A thread: the read blocks. One not waited for ends by its own timeout.
            return url, await asyncio.to_thread(read_varz, url)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            return url, str(exc) or type(exc).__name__

    verdicts: dict[str, bool] = {}
    unread: list[str] = []
    pending = {asyncio.ensure_future(ask(u)) for u in monitor_urls}
    try:
        while pending and not (enough and enough <= verdicts.keys()):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for answer in done:
                url, varz = answer.result()
                if isinstance(varz, str):
                    unread.append(f"{url} ({varz})")
                    continue
                name = str(varz.get("server_name") or varz.get("server_id") or url)
                verdicts[name] = bool(varz.get("jetstream", {}).get("config", {}).get("sync_always"))
    finally:
        for waiting in pending:
            waiting.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return verdicts, sorted(unread)


async def check_fsync(config: BusConfig, log_nodes: list[str]) -> None:
    """Refuse (ConfigurationError) when a node holding the log (`log_nodes`: its leader and
    replicas by server name; empty on a single server) does not fsync every write, or, with
    `require_fsync`, when one cannot be verified. Without monitoring URLs nothing can be checked:
    that is logged at debug level."""
    urls = config.monitor_urls
    if not urls:
        log.debug("no monitor_url: cannot verify that the servers fsync every write")
        return
    verdicts, unread = await node_fsync(urls, enough=frozenset(log_nodes))
    lazy = sorted(name for name, always in verdicts.items() if not always and (not log_nodes or name in log_nodes))
    if lazy and config.require_fsync:
        raise ConfigurationError(
            f"the NATS server{'s' if len(lazy) > 1 else ''} {', '.join(lazy)} do{'es' if len(lazy) == 1 else ''} "
            f"not fsync every write, so acked events can be lost on power failure: {_HOW}"
        )
    unverified = sorted(set(log_nodes) - set(verdicts)) if log_nodes else ([] if verdicts else ["the server"])
    if not unverified:
        if lazy:
            log.warning("%s do not fsync every write (require_fsync is off)", ", ".join(lazy))
        return
    why = f"no monitoring URL answered for {', '.join(unverified)}"
    if unread:
        why += f" (unreadable: {'; '.join(unread)})"
    if config.require_fsync:
        raise ConfigurationError(
            f"cannot verify that every server holding the log fsyncs each write: {why}. Give one "
            "monitoring URL per node in BUS_MONITOR_URL (comma-separated), or pass require_fsync=False"
        )
    log.warning("cannot verify fsync on every server holding the log: %s", why)
