"""Restart backoff and the circuit breaker, as tables over a crash history (no processes, no
sleeping: the clock is an argument)."""

from __future__ import annotations

import pytest

from agents.supervisor import CrashHistory, RestartPolicy
from bus import ConfigurationError

POLICY = RestartPolicy(
    backoff_initial_s=0.1, backoff_max_s=1.0, backoff_factor=2.0, stable_after_s=30.0, max_crashes=4, window_s=60.0
)


@pytest.mark.parametrize(
    ("consecutive", "delay"), [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (50, 1.0), (10_000, 1.0)]
)
def test_backoff_doubles_up_to_its_cap(consecutive: int, delay: float) -> None:
    """The delay after the n-th crash in a row is initial * factor^(n-1), capped at max."""
    assert POLICY.delay_s(consecutive) == pytest.approx(delay)


def test_crashes_in_a_row_back_off_then_open_the_circuit() -> None:
    """Quick crashes back off further each time; the 4th within the window opens the circuit."""
    history = CrashHistory(POLICY)
    verdicts = [history.crashed(now=t, uptime_s=0.5) for t in (0.0, 1.0, 2.0, 3.0)]
    assert [v.delay_s for v in verdicts] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert [v.recent_crashes for v in verdicts] == [1, 2, 3, 4]
    assert [v.circuit_open for v in verdicts] == [False, False, False, True]


def test_a_replica_that_ran_long_enough_starts_its_backoff_over() -> None:
    """A crash after stable_after_s of running is not part of a crash loop's backoff."""
    history = CrashHistory(POLICY)
    history.crashed(now=0.0, uptime_s=0.1)
    history.crashed(now=1.0, uptime_s=0.1)
    assert history.crashed(now=100.0, uptime_s=99.0).delay_s == pytest.approx(0.1)


def test_crashes_outside_the_window_do_not_count_toward_the_circuit() -> None:
    """Only crashes within window_s count: slow, spread-out crashes never open the circuit."""
    history = CrashHistory(POLICY)
    verdicts = [history.crashed(now=t * 25.0, uptime_s=1.0) for t in range(10)]
    assert max(v.recent_crashes for v in verdicts) == 3
    assert not any(v.circuit_open for v in verdicts)


@pytest.mark.parametrize(
    "fields",
    [{"backoff_initial_s": -1}, {"backoff_max_s": 0.01, "backoff_initial_s": 1}, {"backoff_factor": 0.5},
     {"max_crashes": 0}, {"window_s": 0}],
)
def test_invalid_policies_are_refused(fields: dict[str, float]) -> None:
    """A policy that could not work is a ConfigurationError at construction."""
    with pytest.raises(ConfigurationError):
        RestartPolicy(**fields)  # type: ignore[arg-type]
