"""Replay: answer from recorded calls instead of calling a model again.

A past decision is reproduced by feeding the agent the responses recorded in its
`llm.call.completed` events, matched by the request's fingerprint. If the replayed agent asks
something that was never recorded, its decisions have diverged and `ReplayMismatch` says so;
nothing is silently re-asked of a live model.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable

from agents.llm.errors import ReplayMismatch
from agents.llm.model import request_fingerprint
from schemas.payloads.llm import LlmCallCompleted, ModelRequest, ModelResponse


class ReplayModel:
    """`Model` answering each request with the response recorded for an equal request.

    The same request recorded several times is answered in recorded order.
    """

    provider = "replay"

    def __init__(self, calls: Iterable[LlmCallCompleted]) -> None:
        self._responses: dict[str, deque[ModelResponse]] = defaultdict(deque)
        for call in calls:
            self._responses[call.request_sha256].append(call.response)

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """The recorded response. Raises ReplayMismatch when none is left for this request."""
        key = request_fingerprint(request)
        queue = self._responses.get(key)
        if not queue:
            raise ReplayMismatch(
                f"no recorded response for request {key[:16]} (model {request.model}, "
                f"{len(request.messages)} messages): the replayed agent diverged from the recording"
            )
        return queue.popleft()

    @property
    def remaining(self) -> int:
        """Recorded responses not yet replayed."""
        return sum(len(q) for q in self._responses.values())
