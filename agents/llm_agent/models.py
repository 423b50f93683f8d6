"""Which model an LLM agent talks to: Claude when a key is configured, else the offline model.

Read from the environment only here, in the agent process's entry (`LLMAgent.on_start`):

    ANTHROPIC_API_KEY     set: Claude through the Anthropic SDK; unset: the offline model
    CONTINUUM_MODEL       the Claude model name (default DEFAULT_MODEL)
    ANTHROPIC_BASE_URL    another endpoint (a proxy, a gateway)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec

from agents.llm import AnthropicSettings, Model, OfflineModel
from agents.llm.offline import OFFLINE_MODEL

DEFAULT_MODEL = "claude-sonnet-5-5"


class ModelChoice(msgspec.Struct, frozen=True, kw_only=True):
    """The model to build: provider, model name, and Claude's settings when it is Claude."""

    provider: str
    model: str
    anthropic: AnthropicSettings | None = None


def choose_model(env: Mapping[str, str] | None = None) -> ModelChoice:
    """The choice the environment makes (see the module docstring)."""
    env = os.environ if env is None else env
    key = env.get("ANTHROPIC_API_KEY", "").strip()
    model = env.get("CONTINUUM_MODEL", "").strip() or DEFAULT_MODEL
    if not key:
        return ModelChoice(provider="offline", model=OFFLINE_MODEL)
    settings = AnthropicSettings(api_key=key)
    base_url = env.get("ANTHROPIC_BASE_URL", "").strip()
    if base_url:
        settings = msgspec.structs.replace(settings, base_url=base_url)
    return ModelChoice(provider="anthropic", model=model, anthropic=settings)


def build_model(choice: ModelChoice) -> Model:
    """The Model for `choice` (no I/O until its first call)."""
    if choice.anthropic is not None:
        from agents.llm.claude import AnthropicModel  # imports the SDK: only when Claude is used

        return AnthropicModel(choice.anthropic)
    return OfflineModel()
