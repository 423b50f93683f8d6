"""A replica's log file is rotated by size by the process writing to it: descriptors 1 and 2 move
to a fresh file, old files shift to .1 .. .keep, nothing written is lost. Run in a real child
process (its own descriptors), not in the test's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agents.runtime.output_log import rotate_if_large, rotated_paths

_CHILD = """
import os, sys
from pathlib import Path
from agents.runtime.output_log import rotate_if_large
path = Path(sys.argv[1])
for round_ in range(5):
    for i in range(100):
        print(f"out {round_} {i} " + "x" * 80)
        sys.stderr.write(f"err {round_} {i}\\n")
        os.write(1, f"raw {round_} {i}\\n".encode())  # below Python's buffers
    sys.stdout.flush()
    rotate_if_large(path, max_bytes=4000, keep=2)
print("last line")
"""


def test_a_growing_log_rotates_keeping_the_newest_files_and_every_line_in_order(tmp_path: Path) -> None:
    log = tmp_path / "replica-0.log"
    with open(log, "ab") as file:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(log)], stdout=file, stderr=file, timeout=60, check=False,
            cwd=Path(__file__).resolve().parents[1],
        )
    assert done.returncode == 0
    older = rotated_paths(log, 2)
    assert all(p.exists() for p in older) and not log.with_name(f"{log.name}.3").exists()
    # The fresh file holds only what came after the last rotation; .1 the round before it.
    assert log.read_text().strip() == "last line"
    newest_old = older[0].read_text()
    assert "out 4 0 " in newest_old and "err 4 99" in newest_old and "raw 4 99" in newest_old
    assert "round 3" not in newest_old and "out 3 " not in newest_old
    assert "out 3 99 " in older[1].read_text()  # .2: the round before; rounds 0-2 were dropped


def test_nothing_rotates_under_the_bound_or_for_a_file_not_ours(tmp_path: Path) -> None:
    log = tmp_path / "small.log"
    log.write_text("a little\n")
    with open(log, "ab") as file:
        assert rotate_if_large(log, max_bytes=1000, keep=2, fds=(file.fileno(),)) is False
        other = tmp_path / "other.log"
        other.write_text("y" * 5000)
        # Our descriptor writes to small.log, not other.log: never rename a file we do not write.
        assert rotate_if_large(other, max_bytes=1000, keep=2, fds=(file.fileno(),)) is False
    assert log.read_text() == "a little\n" and not rotated_paths(log, 1)[0].exists()
