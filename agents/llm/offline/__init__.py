"""The offline model: deterministic, no network, Messages-API shaped (see `model`)."""

from agents.llm.offline.model import OFFLINE_MODEL, OfflineModel, Policy
from agents.llm.offline.research import ResearchPolicy
from agents.llm.offline.view import BlockInfo, Decision, RequestView, ToolCall

__all__ = [
    "OFFLINE_MODEL",
    "BlockInfo",
    "Decision",
    "OfflineModel",
    "Policy",
    "RequestView",
    "ResearchPolicy",
    "ToolCall",
]
