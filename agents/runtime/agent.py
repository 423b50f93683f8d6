"""The `Agent` base class and the discovery of its typed handlers.

    class Greeter(Agent):
        name = "greeter"
        tags = ("team",)

        @handler
        async def on_task(self, task: TaskRequested, ctx: Context) -> TaskCompleted:
            await ctx.send("archivist", Note(text=task.title))
            return TaskCompleted(task_id=ctx.envelope.id)

A handler is an `async def` method marked with `@handler`; the annotation of its first argument
names the payload type(s) it handles (a union handles several). Each payload type has at most
one handler. A handler returning a payload while handling a request answers that request.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

from agents.errors import AgentDefinitionError
from bus.config import ConsumerSettings
from schemas import Payload

if TYPE_CHECKING:
    from agents.runtime.context import Context
    from bus.client import Bus

HandlerMethod = Callable[[Any, "Context"], Awaitable[Any]]

_MARK = "__continuum_handler__"


def handler(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Mark an `async def` method of an Agent as the handler of its first argument's type(s).

    Raises AgentDefinitionError if `fn` is not a coroutine function.
    """
    if not inspect.iscoroutinefunction(fn):
        raise AgentDefinitionError(f"@handler {fn.__qualname__} must be an `async def` method")
    setattr(fn, _MARK, True)
    return fn


class Agent:
    """Base class of an agent: a name, tags, and `@handler` methods.

    Class attributes (all optional; `bus agent start --name/--tags` override the first two):
      name      the agent name (default: the class name in lower case)
      tags      broadcast tags it listens to
      consumer  ConsumerSettings for its consumers (default: the bus config's)

    Override `on_start` / `on_stop` to open and close resources; they run in the agent's
    process, before the first message and after the last. Override `background` for timed work.
    """

    name: ClassVar[str] = ""
    tags: ClassVar[tuple[str, ...]] = ()
    consumer: ClassVar[ConsumerSettings | None] = None

    async def on_start(self, bus: Bus) -> None:
        """Called once the bus is connected, before any message is handled."""

    async def on_stop(self) -> None:
        """Called after the last in-flight message has been handled."""

    async def background(self, bus: Bus) -> None:
        """Timed work beside the handlers (default: none). Runs from when the consumers pull
        until stop, and is cancelled first at stop, before fetching stops; it must let
        CancelledError through, and what it raises ends the replica (the supervisor restarts
        it). An effect on the agent's memory or state belongs in a handler: send the agent a
        message, so it runs as recorded steps, one message at a time."""

    @classmethod
    def default_name(cls) -> str:
        """The class's `name`, or its class name in lower case."""
        return cls.name or cls.__name__.lower()


class HandlerTable:
    """The handlers of one Agent instance, by payload type."""

    def __init__(self, by_type: dict[type, HandlerMethod]) -> None:
        self._by_type = by_type

    @classmethod
    def of(cls, agent: Agent) -> "HandlerTable":
        """The `@handler` methods of `agent`, bound. Raises AgentDefinitionError (see `scan`)."""
        return cls({typ: getattr(agent, attr) for typ, attr in cls.scan(type(agent)).items()})

    @staticmethod
    def scan(agent_cls: type[Agent]) -> dict[type, str]:
        """Payload type -> handler method name for an Agent class, without instantiating it.

        Raises AgentDefinitionError when a handler's first argument is not annotated with
        Payload types, when two handlers claim one type, or when there is no handler at all.
        """
        owner: dict[type, str] = {}
        for attr in sorted(dir(agent_cls)):
            fn = inspect.getattr_static(agent_cls, attr, None)
            if not getattr(fn, _MARK, False):
                continue
            for typ in _handled_types(agent_cls, fn):
                if typ in owner:
                    raise AgentDefinitionError(
                        f"{agent_cls.__name__}: both {owner[typ]} and {attr} handle "
                        f"{typ.__name__} ({typ.__struct_config__.tag!r}); keep one"
                    )
                owner[typ] = attr
        if not owner:
            raise AgentDefinitionError(
                f"{agent_cls.__name__} has no handlers: mark an `async def` method taking "
                "(self, payload: SomePayload, ctx: Context) with @handler"
            )
        return owner

    def get(self, payload_type: type) -> HandlerMethod | None:
        """The handler for `payload_type`, or None."""
        return self._by_type.get(payload_type)

    def types(self) -> list[type]:
        """The handled payload types, in kind order."""
        return sorted(self._by_type, key=lambda t: t.__struct_config__.tag)

    def kinds(self) -> list[str]:
        """The handled payload kinds, sorted."""
        return [t.__struct_config__.tag for t in self.types()]


def _handled_types(agent_cls: type, fn: Callable[..., Any]) -> list[type]:
    params = list(inspect.signature(fn).parameters.values())
    where = f"{agent_cls.__name__}.{fn.__name__}"
    if len(params) != 3:
        raise AgentDefinitionError(f"{where} must take (self, payload, ctx); it takes {len(params)} arguments")
    annotation = _resolve(fn, params[1])
    if annotation is inspect.Parameter.empty:
        raise AgentDefinitionError(f"{where}: annotate its payload argument with the payload type it handles")
    members = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    found = []
    for member in members:
        if not (isinstance(member, type) and issubclass(member, Payload)):
            raise AgentDefinitionError(f"{where}: {member!r} is not a schemas.Payload subclass")
        if not isinstance(member.__struct_config__.tag, str):
            raise AgentDefinitionError(f"{where}: {member.__name__} has no tag='...'")
        found.append(member)
    return found


def _resolve(fn: Callable[..., Any], param: inspect.Parameter) -> Any:
    """The parameter's annotation, evaluated (postponed annotations are strings)."""
    annotation = param.annotation
    if not isinstance(annotation, str):
        return annotation
    try:
        return typing.get_type_hints(fn)[param.name]
    except NameError:
        # Another annotation (e.g. `ctx: Context` imported under TYPE_CHECKING) cannot be
        # resolved; the payload's alone is enough.
        try:
            return eval(annotation, fn.__globals__)  # noqa: S307 - the class's own annotation
        except NameError as exc:
            raise AgentDefinitionError(
                f"{fn.__qualname__}: cannot resolve the payload annotation {annotation!r}: {exc}"
            ) from exc


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)
