"""Rebuilding views: over the bus when a service runs, else on the file directly.

The service does the work in either case (Runner.rebuild): it folds the log from sequence 1
into new generations while the current ones keep serving, then swaps them in at once. When no
service runs, one is started here just for the rebuild (and stops after it), so only one code
path ever writes views.

Given a `ProgressLine` that is shown (a terminal), either way asks the service for its status
twice a second while it waits and draws how far the building views are against the log's end.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import msgspec

from bus.cli.progress_line import ProgressLine, polling
from bus.errors import BusUnavailable, NoAnswer, NoResponders
from projections.config import ProjectionSettings
from projections.errors import RebuildError
from projections.protocol import (
    ControlFailure,
    ControlResponse,
    RebuildOk,
    RebuildReport,
    RebuildRequest,
    StatusReport,
    rebuild_subject,
)
from projections.service import ProjectionService
from projections.status import request_status

if TYPE_CHECKING:
    from bus import Bus

_response = msgspec.json.Decoder(ControlResponse)

# How often a shown progress line asks for the status: each answer takes the service's writer
# thread for a moment between two folded batches.
PROGRESS_POLL_S = 0.5


async def request_rebuild(
    bus: Bus, views: Sequence[str], *, timeout_s: float, service: str | None = None,
    progress: ProgressLine | None = None, progress_every_s: float = PROGRESS_POLL_S,
) -> RebuildReport:
    """Ask a running service (any one, or the one named `service`) to rebuild `views` (all when
    empty) and wait for the swap, drawing `progress` meanwhile (the status asked every
    `progress_every_s`).

    Raises BusUnavailable when no service (or not that one) answers, RebuildError when it refuses
    or fails.
    """
    async def status() -> StatusReport:
        return await request_status(bus, service=service, timeout_s=max(1.0, progress_every_s * 4))

    try:
        async with showing(progress, status, interval_s=progress_every_s):
            msg = await bus.transport.request(
                rebuild_subject(bus.subjects, service), msgspec.json.encode(RebuildRequest(views=list(views))),
                timeout_s=timeout_s,
            )
    except NoResponders as exc:
        raise BusUnavailable("no projection service is running") from exc
    except NoAnswer as exc:
        raise RebuildError(
            f"the rebuild did not finish within {timeout_s:g}s; it goes on in the service "
            "(see `bus projections status`)"
        ) from exc
    response = _response.decode(msg.data)
    if isinstance(response, ControlFailure):
        raise RebuildError(response.message)
    if not isinstance(response, RebuildOk):
        raise RebuildError(f"unexpected answer to a rebuild request: {type(response).__name__}")
    return response.report


async def rebuild_file(
    bus: Bus, settings: ProjectionSettings, views: Sequence[str], *,
    progress: ProgressLine | None = None, progress_every_s: float = PROGRESS_POLL_S,
) -> RebuildReport:
    """Rebuild `views` in the file at `settings.db_path` with a service started for the purpose,
    drawing `progress` meanwhile (the status asked every `progress_every_s`).

    Raises StoreLocked when another process holds the file, RebuildError when it fails.
    """
    async with ProjectionService(bus, settings) as service:
        async with showing(progress, service.status, interval_s=progress_every_s):
            report = await service.rebuild(list(views), wait=True)
    return msgspec.structs.replace(report, source="file")


def showing(
    line: ProgressLine | None, status: Callable[[], Awaitable[StatusReport]], *, interval_s: float = PROGRESS_POLL_S
) -> AbstractAsyncContextManager[None]:
    """While the block runs, draw on `line` (if any, and shown) how far the building views are:
    the least applied sequence of the views being built, of the log's last sequence."""
    shown = line or ProgressLine("rebuild", unit="events", is_tty=False)
    counted = False

    async def poll() -> None:
        nonlocal counted
        report = await status()
        building = [view.applied_seq for view in report.views if view.state == "building"]
        if building and report.log_last_seq:
            shown.update(min(min(building), report.log_last_seq), total=report.log_last_seq)
            counted = True
        elif not counted:  # not begun yet (once the views are swapped in, the line just stays)
            shown.update(note="starting")

    return polling(shown, poll, interval_s=interval_s)
