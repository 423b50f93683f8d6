"""The agents package's error tree, split by what the caller should do.

    AgentError
    ├── AgentDefinitionError   fix the agent class: bad handler annotation, duplicate handler
    ├── AgentLoadError         fix the `module:Class` spec: not importable, not an Agent
    ├── StepError              misuse of `ctx.step`: nested or concurrent steps, too many steps
    ├── NondeterminismError    the handler did not replay its steps in the recorded order
    │                          (also a bus PermanentError: the message is dead-lettered)
    ├── UnreadableRecord       a record the agent relies on (its state, a step result) does not
    │                          decode (a PermanentError too: retrying reads the same bytes)
    └── SupervisorError        `bus agent start/stop` could not do what was asked
        ├── AlreadyRunning     a supervisor for this agent name is running
        └── NotRunning         no supervisor for this agent name

Bus errors (ConcurrencyConflict, BusUnavailable, ...) pass through unchanged: they come from
bus/errors.py and keep their meaning.
"""

from __future__ import annotations

from bus.errors import PermanentError


class AgentError(Exception):
    """Base of every error the agents package raises."""


class AgentDefinitionError(AgentError, TypeError):
    """An Agent subclass is malformed (the message names the method and how to fix it)."""


class AgentLoadError(AgentError):
    """A `module:Class` spec could not be turned into an Agent class."""


class StepError(AgentError):
    """`ctx.step` was misused: steps must be awaited one at a time, not nested, at most
    `MAX_STEPS` per message."""


class NondeterminismError(AgentError, PermanentError):
    """A redelivered message reached step `index` with a different name than the recorded run.

    Replaying recorded results into different code would be wrong, so the message is
    dead-lettered (this is a PermanentError) with this message as the reason.
    """

    def __init__(self, message: str, *, index: int, recorded: str, called: str) -> None:
        super().__init__(message)
        self.index = index
        self.recorded = recorded
        self.called = called


class UnreadableRecord(AgentError, PermanentError):
    """A stored record this agent reads back (its saved state, a recorded step) is not what it
    wrote: the bytes do not decode, or hold another kind. The message being handled is
    dead-lettered with this reason; the record's subject and sequence are named."""


class SupervisorError(AgentError):
    """A supervisor could not be started, stopped or read."""


class AlreadyRunning(SupervisorError):
    """A supervisor for this agent name is already running."""


class NotRunning(SupervisorError):
    """No supervisor for this agent name is running."""
