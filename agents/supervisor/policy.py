"""Restart policy and circuit breaker: pure decisions over a replica's crash history.

    delay after the n-th consecutive crash = min(backoff_max_s, backoff_initial_s * factor**(n-1))
    a replica that ran `stable_after_s` before crashing starts its backoff over
    `max_crashes` crashes within `window_s` open the circuit: no more restarts

The decision takes the clock as an argument, so it is tested as a table, without sleeping.
"""

from __future__ import annotations

from collections import deque

import msgspec

from bus.errors import ConfigurationError


class RestartPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How a supervisor restarts a crashed replica, and when it gives up (a crash loop)."""

    backoff_initial_s: float = 0.1
    backoff_max_s: float = 10.0
    backoff_factor: float = 2.0
    stable_after_s: float = 30.0
    # The circuit breaker. The default lets one poison message kill a replica on each of its
    # max_deliver (default 5) attempts without opening the circuit.
    max_crashes: int = 10
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s or self.backoff_factor < 1:
            raise ConfigurationError("restart backoff needs 0 <= initial <= max and factor >= 1")
        if self.max_crashes < 1 or self.window_s <= 0:
            raise ConfigurationError("the circuit breaker needs max_crashes >= 1 and window_s > 0")

    def delay_s(self, consecutive: int) -> float:
        """The backoff before restarting after the `consecutive`-th crash in a row (1-based)."""
        exponent = max(0, consecutive - 1)
        # Capped before the power so a long crash history cannot overflow the float.
        if exponent > 64:
            return self.backoff_max_s
        return min(self.backoff_max_s, self.backoff_initial_s * self.backoff_factor**exponent)


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """What to do after a crash: restart after `delay_s`, or stop (`circuit_open`)."""

    delay_s: float
    recent_crashes: int
    circuit_open: bool


class CrashHistory:
    """The crashes of one replica, and the verdict on each new one."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.consecutive = 0
        self._recent: deque[float] = deque()

    def crashed(self, *, now: float, uptime_s: float) -> Verdict:
        """Record a crash at monotonic time `now` after `uptime_s` of running; return the verdict."""
        policy = self.policy
        self.consecutive = 1 if uptime_s >= policy.stable_after_s else self.consecutive + 1
        self._recent.append(now)
        while self._recent and self._recent[0] <= now - policy.window_s:
            self._recent.popleft()
        recent = len(self._recent)
        return Verdict(
            delay_s=policy.delay_s(self.consecutive),
            recent_crashes=recent,
            circuit_open=recent >= policy.max_crashes,
        )
