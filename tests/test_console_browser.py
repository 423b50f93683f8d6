"""The console in headless Chromium after the research team's three days (`bus up`, `bus demo
research`, the four agents started again under their supervisors): the four agents are listed
and alive; day 2's conversation diagram shows its four contradictions (and replays to the same
events); the synthesiser's digest
block shows its version history; the memory inspector shows a model call's context window with
token counts per part; a dead letter is retried from an operator console (`bus ui --operator`)
and the retry is in the log; a new envelope appears in the traffic view while the page is open.

One run of the demo serves the whole module. Without Chromium (or the playwright package) the
tests skip, saying why, unless CONTINUUM_REQUIRE_BROWSER=1 (CI), where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bus.bench.browser import launch_kwargs
from bus.cli.state import read_state
from bus.server import free_port_outside_ephemeral_range
from console_fixtures import skip_module_without_browser
from test_cli import BUS

skip_module_without_browser()

from playwright.sync_api import Page, sync_playwright  # noqa: E402 - only when a browser is there

pytestmark = pytest.mark.timeout(300)
TEAM = ("researcher", "synthesiser", "writer", "reviewer")


@dataclass(frozen=True)
class Demo:
    env: dict[str, str]
    cwd: Path
    console: str          # the read-only console `bus up` started
    operator: str         # a `bus ui --operator` beside it
    day2: str             # day 2's correlation id
    dead_letter_seq: int


def bus(demo_env: dict[str, str], cwd: Path, *args: str, timeout_s: float = 120) -> str:
    done = subprocess.run([*BUS, *args], env=demo_env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)
    assert done.returncode == 0, f"bus {' '.join(args)}: {done.stderr[-3000:]}"
    return done.stdout


def query(demo: Demo, sql: str) -> list[dict[str, Any]]:
    return json.loads(bus(demo.env, demo.cwd, "query", sql, "--format", "json"))


def until(condition: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    cwd = tmp_path_factory.mktemp("console")
    home = cwd / "home"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BUS_", "ANTHROPIC_"))}
    env = {**clean, "BUS_HOME": str(home), "BUS_URL": f"nats://127.0.0.1:{free_port_outside_ephemeral_range()}"}
    operator: subprocess.Popen[str] | None = None
    bus(env, cwd, "up", "--detach", "--monitor-port", str(free_port_outside_ephemeral_range()), "--ui-port", str(free_port_outside_ephemeral_range()))
    try:
        state = read_state(home)
        assert state is not None and state.console_url
        printed = bus(env, cwd, "demo", "research", timeout_s=240)
        [day2] = re.findall(r"^day 2: .* bus replay (\S+)$", printed, re.M)
        for member in TEAM:
            bus(env, cwd, "agent", "start", f"agents.research.team:{member.capitalize()}")
        bus(env, cwd, "send", "reviewer", '{"kind":"ping","text":"nobody handles this"}')
        port = free_port_outside_ephemeral_range()
        operator = subprocess.Popen(
            [*BUS, "ui", "--operator", "--by", "ops-ann", "--port", str(port)], env=env, cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert operator.stdout is not None
        line = operator.stdout.readline()
        assert "console at" in line and "operator" in line, line + operator.stderr.read() if operator.poll() is not None else line
        demo = Demo(env=env, cwd=cwd, console=state.console_url.rstrip("/"), operator=f"http://127.0.0.1:{port}",
                    day2=day2, dead_letter_seq=0)
        letters = until(lambda: query(demo, "SELECT seq FROM dead_letters WHERE agent = 'reviewer'"), 30, "the dead letter")
        until(lambda: len(query(demo, "SELECT name FROM agents WHERE replicas_alive > 0")) >= 4, 30, "four agents alive")
        yield Demo(**{**demo.__dict__, "dead_letter_seq": letters[0]["seq"]})
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(10)
        subprocess.run([*BUS, "agent", "stop", "--all"], env=env, cwd=cwd, capture_output=True, timeout=60, check=False)
        subprocess.run([*BUS, "down", "--grace", "5"], env=env, cwd=cwd, capture_output=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(**launch_kwargs(tmp_path_factory.mktemp("profile")))
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        page.close()
    assert errors == [], errors


def open_view(page: Page, base: str, fragment: str) -> None:
    page.goto(f"{base}/#{fragment}")
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=20_000)


def test_the_four_agents_are_listed_and_alive(demo: Demo, page: Page) -> None:
    """The agents page lists the team, each alive with its replica, linking to its memory."""
    open_view(page, demo.console, "/agents")
    for name in TEAM:
        row = page.locator(f"tr.agent-row[data-agent='{name}']")
        row.wait_for(timeout=20_000)
        page.wait_for_selector(f"tr.agent-row[data-agent='{name}'][data-alive='1']", timeout=20_000)
        assert row.locator("td.state").inner_text() == "alive"
        assert row.locator(f"a[href='#/memory/{name}']").count() == 1


def test_day_two_diagram_shows_the_four_contradictions(demo: Demo, page: Page) -> None:
    """Day 2's conversation is drawn with its four contradictions marked; clicking one opens
    the event in the side panel."""
    open_view(page, demo.console, f"/conversation/{demo.day2}")
    contradictions = page.locator("svg.diagram g.node.mark-contradiction")
    assert contradictions.count() == 4
    assert "4 contradictions" in page.locator("#diagram-summary").inner_text()
    assert page.locator("svg.diagram g.node.mark-model").count() >= 4
    contradictions.first.click()
    page.wait_for_selector("#detail .event-detail", timeout=10_000)
    assert "memory.contradiction.flagged" in page.locator("#detail").inner_text()
    page.locator("#replay").click()  # on the recorded model answers: the same events
    page.wait_for_selector(".replay-result [data-same='true']", timeout=60_000)


def test_the_digest_block_shows_its_version_history(demo: Demo, page: Page) -> None:
    """The synthesiser's memory shows the shared digest with every version, who wrote each,
    and each as a diff against the one before."""
    open_view(page, demo.console, "/memory/synthesiser")
    block = page.locator(".block[data-block='research/digest']")
    versions = block.locator(".version")
    assert versions.count() == 4
    assert block.locator(".version[data-version='4'] .actor").inner_text() == "synthesiser"
    assert set(block.locator(".version .actor").all_inner_texts()) <= set(TEAM)  # who created it varies
    assert block.locator(".version[data-version='3'] .diff .add").count() > 0
    assert block.locator(".version[data-version='3'] .diff .del").count() > 0


def test_as_of_shows_what_the_agent_knew_then(demo: Demo, page: Page) -> None:
    """The "as of" box: at the sequence of the digest's second version, the inspector shows two
    versions and only the model calls made by then."""
    [second] = query(demo, "SELECT seq FROM blocks WHERE block_id = 'research/digest' AND version = 2")
    open_view(page, demo.console, "/memory/synthesiser")
    page.locator("input[name='as_of']").fill(str(second["seq"]))
    page.locator("input[name='as_of']").press("Enter")
    page.wait_for_function(f"location.hash.includes('as_of={second['seq']}') && document.body.dataset.ready === '1'")
    page.wait_for_selector(f"text=what synthesiser knew at seq {second['seq']}")
    assert page.locator(".block[data-block='research/digest'] .version").count() == 2
    seqs = [int(s) for s in page.locator("#memory-calls tbody tr td:first-child").all_inner_texts()]
    assert seqs and max(seqs) <= second["seq"]


def test_the_memory_inspector_shows_a_context_window_with_token_counts(demo: Demo, page: Page) -> None:
    """A model call's context window, part by part (tools, system prompt, core memory and its
    blocks, summaries, each message), each with its token count, beside the model's own."""
    open_view(page, demo.console, "/memory/synthesiser")
    page.wait_for_selector("#context .part", timeout=10_000)
    sections = page.locator("#context .part").evaluate_all("parts => parts.map(p => p.dataset.section)")
    assert {"tools", "system", "block", "message"} <= set(sections)
    tokens = page.locator("#context .part .tokens").all_inner_texts()
    assert len(tokens) == len(sections) and all(re.fullmatch(r"[\d,]+ tokens", t) for t in tokens)
    total = page.locator("#context-total").inner_text()
    assert re.fullmatch(r"[\d,]+ tokens estimated", total)
    assert "input tokens reported by the model" in page.locator("#context").inner_text()


def test_a_dead_letter_is_retried_from_the_page_and_the_retry_is_in_the_log(demo: Demo, page: Page) -> None:
    """The read-only console offers no retry; the operator console retries the dead letter, and
    the log holds the retry, recorded by the operator's name."""
    open_view(page, demo.console, "/dead")
    page.locator(f"tr.dead-row[data-seq='{demo.dead_letter_seq}']").click()
    page.wait_for_selector("#detail .dead-detail", timeout=10_000)
    assert page.locator("#retry").is_disabled()

    open_view(page, demo.operator, "/dead")
    page.locator(f"tr.dead-row[data-seq='{demo.dead_letter_seq}']").click()
    page.wait_for_selector("#retry:not([disabled])", timeout=10_000)
    page.locator("#retry").click()
    page.wait_for_selector("#detail .retry-result.done", timeout=10_000)
    assert "sent again to reviewer" in page.locator("#detail .retry-result").inner_text()
    retried = until(lambda: query(demo, "SELECT sender, agent FROM events JOIN (SELECT 'reviewer' AS agent) ON true "
                                  "WHERE kind = 'delivery.dead_letter.retried'"), 20, "the retry in the log")
    assert retried[0]["sender"] == "ops-ann"


def test_a_new_envelope_appears_in_the_traffic_view_while_it_is_open(demo: Demo, page: Page) -> None:
    """With the traffic view open, an envelope sent from the command line shows up in it."""
    open_view(page, demo.console, "/traffic")
    page.wait_for_selector("#status.live", timeout=10_000)
    sent = json.loads(bus(demo.env, demo.cwd, "send", "visitor", '{"kind":"note","text":"seen live?"}', "--json"))
    row = page.locator(f"tr.traffic-row[data-id='{sent['id']}']")
    row.wait_for(timeout=10_000)
    assert "note" in row.inner_text() and "visitor" in row.inner_text()


def test_an_agent_is_stopped_from_the_page_through_the_bus(demo: Demo, page: Page) -> None:
    """The read-only console offers no Stop; on the operator console, Stop asks the agent's
    supervisor through the bus: the page says it is stopping, the request is in the log by the
    operator's name, and the agent's replica stops."""
    bus(demo.env, demo.cwd, "agent", "start", "agents.examples.greeter:Greeter", "--name", "sentry")
    until(lambda: query(demo, "SELECT name FROM agents WHERE name = 'sentry' AND replicas_alive > 0"), 30, "sentry alive")
    open_view(page, demo.console, "/agent/sentry")
    assert page.locator("#stop-agent").is_disabled()

    open_view(page, demo.operator, "/agent/sentry")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#stop-agent:not([disabled])").click()
    page.wait_for_selector(".stop-result.done", timeout=10_000)
    assert "stops 1 replica(s)" in page.locator(".stop-result").inner_text()
    asked = until(lambda: query(demo, "SELECT sender FROM events WHERE kind = 'agent.stop.requested'"), 20, "the request in the log")
    assert asked[0]["sender"] == "ops-ann"
    until(lambda: query(demo, "SELECT name FROM agents WHERE name = 'sentry' AND replicas_alive = 0"), 30, "sentry stopped")
