"""The memory error tree. Every memory error is deterministic (the same input fails the same
way), so each is also a bus `PermanentError`: retrying the message cannot help.

    AgentMemoryError
    ├── BlockNotFound        no held block has that label
    ├── BlockExists          a held block already has that label (or the id is taken)
    ├── BlockLimitExceeded   the write would make the block longer than its limit
    ├── BlockReadOnly        the block may not be written by agents
    ├── BlockEditError       a replace whose `old` text is empty, absent or ambiguous
    ├── FactNotFound         no fact has that id
    ├── FactExists           the same fact (same id) is already recorded
    ├── FactStateError       the fact cannot change that way (already superseded, self-reference)
    ├── ContradictionExists  that pair is already flagged under that rule
    └── ContextOverflow      the fixed part of the context alone exceeds the token budget

Tools turn these into `is_error` tool results the model can act on; they never reach the log.
"""

from __future__ import annotations

from bus.errors import PermanentError


class AgentMemoryError(PermanentError):
    """Base of every memory error."""


class BlockNotFound(AgentMemoryError):
    """No block with that label is held by this agent."""


class BlockExists(AgentMemoryError):
    """A block with that label (or id) already exists."""


class BlockLimitExceeded(AgentMemoryError):
    """A write would exceed the block's character limit."""

    def __init__(self, message: str, *, label: str, limit: int, size: int) -> None:
        super().__init__(message)
        self.label = label
        self.limit = limit
        self.size = size


class BlockReadOnly(AgentMemoryError):
    """The block is read-only for agents."""


class BlockEditError(AgentMemoryError):
    """A replace could not be applied unambiguously."""


class FactNotFound(AgentMemoryError):
    """No fact has that id."""


class FactExists(AgentMemoryError):
    """The fact is already recorded; `fact_id` names it."""

    def __init__(self, message: str, *, fact_id: str) -> None:
        super().__init__(message)
        self.fact_id = fact_id


class FactStateError(AgentMemoryError):
    """The fact's status does not allow that change."""


class ContradictionExists(AgentMemoryError):
    """That contradiction is already flagged; `contradiction_id` names it."""

    def __init__(self, message: str, *, contradiction_id: str) -> None:
        super().__init__(message)
        self.contradiction_id = contradiction_id


class ContextOverflow(AgentMemoryError):
    """System prompt, core blocks and tools alone do not fit the token budget."""
