"""`bus demo research` and `bus replay`.

    bus demo research              # all three days; starts the embedded server if none runs
    bus demo research --day 2      # one day (again: it finds nothing new and says so)
    bus replay <correlation-id>    # re-run a day's handlers on the recorded model responses

`demo research` uses the server at --url when one answers; otherwise it starts the embedded
default (server + projection service, as `bus up --detach` does, in --home) and stops it at the
end: the log stays in <home>/nats for `bus up` and `bus query` later.
"""

from __future__ import annotations

import argparse
import contextlib
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

from bus.cli.common import CliError, add_connection_options, open_bus, out
from bus.cli.progress_line import ProgressLine
from bus.cli.server_commands import LOCAL_HOSTS



def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    demo = subparsers.add_parser("demo", help="run a demo (research: the four-agent research team)")
    demos = demo.add_subparsers(dest="demo_name", metavar="DEMO", parser_class=type(demo))
    demos.required = True
    research = demos.add_parser(
        "research", help="four LLM agents read three days of papers, record facts, flag contradictions, report",
        description="Run the research team (researcher, synthesiser, writer, reviewer; each its own supervised "
        "process) over the sodium-ion electrolyte corpus. Claude when ANTHROPIC_API_KEY is set "
        "(CONTINUUM_MODEL picks the model), else the deterministic offline model.",
    )
    research.add_argument("--day", type=int, choices=(1, 2, 3), help="run only this day (default: all three)")
    research.add_argument("--timeout", type=float, default=300.0, help="seconds a day may take (default %(default)s)")
    add_connection_options(research)
    research.set_defaults(func=run_demo)

    replay = subparsers.add_parser(
        "replay", help="re-run a recorded workflow's handlers on the recorded model responses",
        description="Rebuild each agent's memory as it stood, re-run its handler with the recorded model "
        "responses (no model is called), and compare a content hash of the produced events with the "
        "recorded ones. Exit 0 when every handling produced the same events.",
    )
    replay.add_argument("correlation_id", help="the workflow's correlation id (printed by `bus demo research`)")
    replay.add_argument(
        "--agent", action="append", default=[], metavar="NAME=module:Class",
        help="an LLM agent to replay besides the research team (repeatable; imported from the current directory)",
    )
    add_connection_options(replay)
    replay.set_defaults(func=run_replay)



@contextlib.asynccontextmanager
async def _server(args: argparse.Namespace) -> AsyncIterator[bool]:
    """A server at args.url: the running one, or the embedded default started (and stopped)
    here. Yields whether it was started here."""
    from bus.cli.common import probe_server

    try:
        await probe_server(args.url, timeout_s=1.0)
        yield False
        return
    except CliError:
        pass
    parsed = urllib.parse.urlsplit(args.url if "://" in args.url else f"nats://{args.url}")
    if "," in args.url or parsed.hostname not in LOCAL_HOSTS:
        raise CliError(f"no NATS server answers at {args.url}; start it, or drop --url to use the embedded default")
    from bus.cli.server_commands import run_down, run_up

    out(f"no server at {args.url}: starting the embedded one in {args.home.resolve()} (stopped at the end)")
    up = argparse.Namespace(
        port=parsed.port or 4222, monitor_port=None, store=None, config=None, detach=True, no_projections=False,
        start_timeout=30.0, home=args.home, namespace=args.namespace, metrics_port=None, cluster=1,
        no_auth=False, tls=False, tls_cert=None, tls_key=None, tls_ca=None, listen="127.0.0.1",
    )
    await run_up(up)
    try:
        yield True
    finally:
        await run_down(argparse.Namespace(home=args.home, grace=10.0))


async def run_demo(args: argparse.Namespace) -> int:
    from agents.llm_agent import choose_model
    from agents.research.demo import DemoError, DemoSettings, ResearchDemo

    days = [args.day] if args.day else [1, 2, 3]
    choice = choose_model()
    on = "the offline model (set ANTHROPIC_API_KEY for Claude)" if choice.anthropic is None else f"Claude ({choice.model})"
    out(f"research team on {on}: researcher, synthesiser, writer, reviewer")
    results = []
    async with _server(args) as started_here, open_bus(args, name="coordinator") as bus:
        demo = ResearchDemo(
            bus, DemoSettings(home=str(args.home.resolve()), day_timeout_s=args.timeout), say=out,
            progress=ProgressLine("team", unit="agents ready", rate=False),
            credentials=await _team_credentials(args),
        )
        try:
            async with demo.team():
                for i, day in enumerate(days):
                    if i:
                        await demo.night()
                    result = await demo.run_day(day)
                    results.append(result)
                    _print_report(result)
        except BaseExceptionGroup as group:
            failed = group.subgroup(DemoError)
            if failed is None:
                raise
            raise CliError(str(_first(failed))) from None
    out("")
    for r in results:
        out(f"day {r.day}: {r.new_findings} new findings, {r.contradictions} contradictions, {r.corrections} "
            f"corrections, {r.llm_calls} model calls, {r.seconds:.2f}s   bus replay {r.correlation_id}")
    if started_here:
        out(f"the log is kept in {args.home.resolve() / 'nats'}: `bus up --detach` then "
            "`bus query \"select * from facts\"`")
    else:
        out("query it: bus query \"select subject, value, source_ref from facts\"")
    return 0


async def _team_credentials(args: argparse.Namespace) -> dict[str, str]:
    """Each team member's own credential (issued, loaded by the servers, consumers created),
    when the home has authorization; else none (they connect as the CLI does)."""
    from agents.research.team import TEAM, target
    from agents.runtime.loader import load_agent_class
    from bus.cli.creds_commands import provision_agent

    credentials = {}
    for name in TEAM:
        tags = list(load_agent_class(target(name), Path.cwd()).tags)
        provisioned = await provision_agent(args, name, tags)
        if provisioned is None:
            return {}
        credentials[name] = str(provisioned[0])
    return credentials


def _first(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup) and group.exceptions:
        group = group.exceptions[0]
    return group


def _print_report(result: object) -> None:
    from agents.research.demo import DayResult

    assert isinstance(result, DayResult)
    head = f" report of day {result.day} "
    out("")
    out(f"┌{head:─^78}┐")
    for line in result.report.splitlines():
        out(f"│ {line}")
    out("└" + "─" * 78 + "┘")
    if result.nothing_new:
        out(f"day {result.day} had nothing new: every finding was already recorded")
    out("")


async def run_replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agents.errors import AgentDefinitionError, AgentLoadError
    from agents.research.replay import replay_workflow
    from agents.research.team import AGENT_CLASSES
    from agents.runtime.loader import load_agent_class

    classes: dict = dict(AGENT_CLASSES)
    for item in args.agent:
        name, _, spec = item.partition("=")
        if not name or not spec:
            raise CliError(f"--agent {item!r}: write NAME=module:Class")
        try:
            classes[name] = load_agent_class(spec, Path.cwd())
        except (AgentLoadError, AgentDefinitionError) as exc:
            raise CliError(f"--agent {item!r}: {exc}") from exc
    async with open_bus(args, name="replay") as bus:
        report = await replay_workflow(bus, args.correlation_id, classes)
    if not report.handlings:
        raise CliError(f"no handled messages with correlation id {args.correlation_id} in the log")
    out(f"replaying {args.correlation_id}: {len(report.handlings)} handled messages, no model called")
    for h in report.handlings:
        mark = "same" if h.same else "DIFFERENT"
        out(f"  seq {h.inbound_seq:>6}  {h.agent:<12} {h.llm_calls:>2} recorded responses  "
            f"{h.recorded:>3} recorded / {h.replayed:>3} replayed events  {h.recorded_sha256[:16]} "
            f"{'==' if h.same else '!='} {h.replayed_sha256[:16]}  {mark}{'  ' + h.error if h.error else ''}")
    out("same events: yes" if report.same else "same events: NO")
    return 0 if report.same else 1
