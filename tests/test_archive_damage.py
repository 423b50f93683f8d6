"""A damaged segment cannot take the projection service down.

`bus archive verify` reads each segment in a child process, because pyarrow's full read of a
segment aborts the process on a few flipped footer bytes (test_archive.FOOTER_ABORTS). The
service reads segments another way: their metadata and the fold's columns (rebuilds, and views
behind the log's start), and DuckDB's own Parquet reader for queries over the archive. These
tests flip footer bytes and run exactly those reads in a child process, so that an abort fails
the test instead of killing it: each read must end in an error or a result, never a signal.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import admin_env

from bus.server import EmbeddedServer
from test_archive import FOOTER_ABORTS, _footer_abort_segment
from test_cli import cli_env, run_bus  # noqa: F401 - the fixture is used by name

# In a child: for each footer offset given, flip that byte (XOR 0x5A) in a copy of the segment
# and run the service's reads of it in a fork of the child; print the offsets whose fork was
# killed by a signal, with the signal and the read that was running.
_SCAN = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import duckdb
    from projections.archive.reader import read_batch, usable_segments
    from projections.archive.verify import verify_file

    source, stream, offsets, wanted = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4].split(",")
    whole = source.read_bytes()
    footer_at = len(whole) - 8 - int.from_bytes(whole[-8:-4], "little")
    directory = source.parent.parent / "scan"
    directory.mkdir(exist_ok=True)
    target = directory / source.name

    def fold_read():
        segments, _ = usable_segments(directory, stream)
        for segment in segments:
            read_batch(segment, 0)

    def query_read():
        con = duckdb.connect()
        con.execute(f"SELECT count(*), max(seq), sum(length(data)) FROM read_parquet('{target}')").fetchall()

    def full_read():  # as `bus archive verify` reads (in its child): the control
        verify_file(target, prev_chain="0" * 64, after_seq=0)

    reads = {"fold": fold_read, "query": query_read, "full": full_read}
    killed = []
    for offset in offsets:
        damaged = bytearray(whole)
        damaged[footer_at + offset] ^= 0x5A
        target.write_bytes(bytes(damaged))
        for name in wanted:
            read = reads[name]
            pid = os.fork()
            if pid == 0:
                try:
                    read()
                except Exception:
                    pass  # an error is the wanted outcome as much as a result
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                killed.append([offset, name, os.WTERMSIG(status)])
    print(json.dumps(killed))
""")


def _killed(tmp_path: Path, offsets: list[int], reads: str = "fold,query") -> tuple[list[list[int]], int]:
    """Scan `offsets` (all when empty) of a fixed segment's footer with `reads`; returns (the
    killed reads as [offset, read, signal], the footer's length)."""
    path = _footer_abort_segment(tmp_path / "archive")
    whole = path.read_bytes()
    footer = int.from_bytes(whole[-8:-4], "little")
    wanted = [o for o in offsets if o < footer] if offsets else list(range(footer))
    done = subprocess.run(
        [sys.executable, "-c", _SCAN, str(path), "CONTINUUM_DEFAULT", json.dumps(wanted), reads],
        capture_output=True, text=True, timeout=1800, cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), footer


def test_the_service_reads_survive_the_footer_bytes_that_abort_a_full_read(tmp_path: Path) -> None:
    """The three footer bytes that abort pyarrow's full read (as `verify` reads), and every 41st
    other byte of the footer: the fold's read and a DuckDB query of the damaged segment end in
    an error or a result, none in a signal. The control: the full read is killed on each of the
    three (so the scan does see an abort)."""
    control, _ = _killed(tmp_path / "control", list(FOOTER_ABORTS), reads="full")
    assert control == [[offset, "full", signal.SIGABRT] for offset in FOOTER_ABORTS]
    killed, footer = _killed(tmp_path / "service", sorted({*FOOTER_ABORTS, *range(0, 4_908, 41)}))
    assert footer > 1_212
    assert killed == []


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_no_single_footer_byte_kills_the_service_reads(tmp_path: Path) -> None:
    """Every byte of the footer, flipped one at a time (~5,000 segments, a few minutes): no read the
    service makes of a segment is killed."""
    killed, _ = _killed(tmp_path, [])
    assert killed == []


async def test_a_run_and_a_trim_over_a_segment_that_aborts_a_full_read_refuse_in_one_line(
    nats_server: EmbeddedServer, admin_credentials: str, cli_env: dict[str, str], tmp_path: Path,  # noqa: F811
) -> None:
    """The archive's last segment has a footer byte that aborts pyarrow's full read: `bus
    archive run` (which verifies the last segment before it writes the next) and `bus archive
    trim` (which verifies what it trims against) each refuse with one line naming the segment
    and the signal, exit 2, instead of dying by SIGABRT; nothing is purged."""
    directory = tmp_path / "archive"
    path = _footer_abort_segment(directory)
    whole = bytearray(path.read_bytes())
    whole[len(whole) - 8 - int.from_bytes(whole[-8:-4], "little") + FOOTER_ABORTS[0]] ^= 0x5A
    path.write_bytes(bytes(whole))
    env = admin_env(cli_env, nats_server, admin_credentials)
    for command in (("archive", "run", "--dir", str(directory)), ("archive", "trim", "--dir", str(directory))):
        refused = await run_bus(*command, env=env, cwd=tmp_path)
        assert refused.code == 2, (command, refused.code, refused.stderr)
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and path.name in lines[0] and "SIGABRT" in lines[0], (command, refused.stderr)
