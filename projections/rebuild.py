"""Rebuilding views: over the bus when a service runs, else on the file directly.

The service does the work in either case (Runner.rebuild): it folds the log from sequence 1
into new generations while the current ones keep serving, then swaps them in at once. When no
service runs, one is started here just for the rebuild (and stops after it), so only one code
path ever writes views.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from bus.errors import BusUnavailable, NoAnswer, NoResponders
from projections.config import ProjectionSettings
from projections.errors import RebuildError
from projections.protocol import (
    ControlFailure,
    ControlResponse,
    RebuildOk,
    RebuildReport,
    RebuildRequest,
    rebuild_subject,
)
from projections.service import ProjectionService

if TYPE_CHECKING:
    from bus import Bus

_response = msgspec.json.Decoder(ControlResponse)


async def request_rebuild(
    bus: Bus, views: Sequence[str], *, timeout_s: float, service: str | None = None
) -> RebuildReport:
    """Ask a running service (any one, or the one named `service`) to rebuild `views` (all when
    empty) and wait for the swap.

    Raises BusUnavailable when no service (or not that one) answers, RebuildError when it refuses
    or fails.
    """
    try:
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


async def rebuild_file(bus: Bus, settings: ProjectionSettings, views: Sequence[str]) -> RebuildReport:
    """Rebuild `views` in the file at `settings.db_path` with a service started for the purpose.

    Raises StoreLocked when another process holds the file, RebuildError when it fails.
    """
    async with ProjectionService(bus, settings) as service:
        report = await service.rebuild(list(views), wait=True)
    return msgspec.structs.replace(report, source="file")
