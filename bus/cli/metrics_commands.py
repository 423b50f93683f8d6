"""`bus metrics targets`: every process of a state home that registered its metrics endpoint.

    bus metrics targets [--json] [--prune]

Each long-running process (`bus up`, the projection service, agent supervisors and their
replicas) serves Prometheus metrics on 127.0.0.1 and registers a file_sd target under
`<home>/metrics-targets/` (bus.scrape). This lists them and asks each one whether it answers;
`--prune` removes the files of those that do not (left by a process that was killed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import urllib.request
from pathlib import Path

from bus.cli.common import DEFAULT_HOME, out
from bus.scrape import RegisteredTarget, read_targets, targets_dir

_PROBE_TIMEOUT_S = 1.0
_IDENTITY = ("namespace", "agent", "replica", "service")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    metrics = sub.add_parser("metrics", help="where this home's processes serve Prometheus metrics")
    actions = metrics.add_subparsers(dest="metrics_command", metavar="ACTION")
    actions.required = True
    targets = actions.add_parser(
        "targets", help="list the registered scrape targets and whether each answers",
        description=f"List the Prometheus file_sd targets under <home>/metrics-targets (default home "
        f"{DEFAULT_HOME}): one per process serving metrics, with whether it answers now.",
    )
    targets.add_argument("--json", action="store_true", help="one JSON object per target")
    targets.add_argument("--prune", action="store_true", help="remove the files of targets that do not answer")
    targets.add_argument(
        "--home", type=Path, default=Path(os.environ.get("BUS_HOME", DEFAULT_HOME)),
        help="the state home whose processes to list (env BUS_HOME; default %(default)s)",
    )
    targets.set_defaults(func=run_targets)


async def run_targets(args: argparse.Namespace) -> int:
    """List (and with --prune, clean up) the scrape targets of `args.home`."""
    directory = targets_dir(args.home.resolve())
    targets = read_targets(directory)
    answers = await asyncio.gather(*(asyncio.to_thread(_answers, target.address) for target in targets))
    if args.json:
        for target, answering in zip(targets, answers, strict=True):
            out(json.dumps({"address": target.address, "answering": answering, "file": str(target.path),
                            "labels": target.labels}))
    elif not targets:
        out(f"no scrape targets in {directory} (processes register there while they run)")
    else:
        rows = [["PROCESS", "WHO", "ADDRESS", "ANSWERING"]]
        for target, answering in zip(targets, answers, strict=True):
            rows.append([target.labels.get("process", "?"), _who(target), target.address, "yes" if answering else "no"])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            out("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        out(f"(prometheus: file_sd_configs files {directory}/*.json)")
    if args.prune:
        for target, answering in zip(targets, answers, strict=True):
            if not answering:
                with contextlib.suppress(OSError):
                    target.path.unlink()
                    out(f"removed {target.path.name} ({target.address} does not answer)")
    return 0


def _who(target: RegisteredTarget) -> str:
    return " ".join(f"{key}={target.labels[key]}" for key in _IDENTITY if key in target.labels)


def _answers(address: str) -> bool:
    """True if a metrics endpoint answers at `address` (blocking: run it in a thread)."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=_PROBE_TIMEOUT_S) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False
