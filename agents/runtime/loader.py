"""Turn a `module:Class` spec into an Agent class (like uvicorn's `module:app`)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from agents.errors import AgentLoadError
from agents.runtime.agent import Agent


def load_agent_class(target: str, workdir: str | Path | None = None) -> type[Agent]:
    """Import `module:Class` and return the class. `workdir` (the directory `bus agent start`
    ran in) is put first on sys.path, so modules next to the user's files import.

    Raises AgentLoadError saying what is wrong and how to fix it.
    """
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise AgentLoadError(f"agent {target!r} is not of the form module:Class (e.g. myagents.greeter:Greeter)")
    if workdir is not None and str(workdir) not in sys.path:
        sys.path.insert(0, str(workdir))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AgentLoadError(
            f"cannot import module {module_name!r} for agent {target!r}: {exc} "
            "(run from the directory that holds it, or install it)"
        ) from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise AgentLoadError(f"module {module_name!r} has no attribute {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise AgentLoadError(f"{target!r} is not a subclass of agents.runtime.Agent")
    return cls
