"""Agent processes under supervision: launch, heartbeats, restart with backoff, circuit breaker.

`Supervisor` runs K replica processes of one agent (in-process, e.g. from tests and benches);
`control` starts and stops detached supervisor processes for the `bus agent` commands.
"""

from agents.supervisor.policy import CrashHistory, RestartPolicy, Verdict
from agents.supervisor.recorder import EventRecorder
from agents.supervisor.state import AgentPaths, ReplicaStatus, SupervisorStatus
from agents.supervisor.supervisor import AgentSpec, Supervisor, SupervisorSettings

__all__ = [
    "AgentPaths",
    "AgentSpec",
    "CrashHistory",
    "EventRecorder",
    "ReplicaStatus",
    "RestartPolicy",
    "Supervisor",
    "SupervisorSettings",
    "SupervisorStatus",
    "Verdict",
]
