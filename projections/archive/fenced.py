"""Verifying segments in a child process, so a reader that aborts is a damaged segment, not a
dead command.

pyarrow's C++ Parquet reader aborts the whole process (`std::terminate`, SIGABRT) on a few
damaged footers (e.g. a flipped byte that turns a column's physical type into an unknown one:
"ColumnMetaData type does not match ColumnDescriptor physical type"), where Python sees no
exception. `bus archive verify` therefore reads every segment in a child (`python -m
projections.archive.fenced`, one for the whole directory, started again after each death): a
child that dies while verifying a segment makes that segment broken (ArchiveCorrupt naming it and
the signal), and the caller carries on as after any broken segment.

The protocol is one JSON line each way per segment: `{"path", "stream", "prev_chain",
"after_seq"}` in, `{"meta": <SegmentMeta>, "file_bytes": n}`, `{"corrupt": "<one line>"}` or
`{"error": "<one line>"}` (ArchiveError: the file could not be read) out. Synchronous: call it off
the event loop.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, cast

import msgspec

from projections.archive.segment import GENESIS, SegmentMeta
from projections.archive.verify import Segment, _check_link, read_meta, segment_paths, verify_file
from projections.errors import ArchiveCorrupt, ArchiveError


class _Request(msgspec.Struct, frozen=True):
    path: str
    stream: str
    prev_chain: str
    after_seq: int


class _Answer(msgspec.Struct, frozen=True, omit_defaults=True):
    meta: SegmentMeta | None = None
    file_bytes: int = 0
    corrupt: str = ""
    error: str = ""


_answers = msgspec.json.Decoder(_Answer)


class FencedVerifier:
    """A child process verifying segments one at a time (see the module docstring). A context
    manager: leaving ends the child (and waits for it)."""

    def __init__(self) -> None:
        self._child: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> FencedVerifier:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop()

    def verify(self, path: Path, *, stream: str, prev_chain: str, after_seq: int) -> Segment:
        """Verify the segment at `path` wholly, as the one after a segment whose chain hash is
        `prev_chain` and last sequence `after_seq`, in the child. Raises ArchiveCorrupt (also
        when the child dies on it), ArchiveError (it could not be read, or no child started)."""
        child = self._started()
        request = msgspec.json.encode(_Request(str(path), stream, prev_chain, after_seq)) + b"\n"
        try:
            cast(IO[bytes], child.stdin).write(request)
            cast(IO[bytes], child.stdin).flush()
            line = cast(IO[bytes], child.stdout).readline()
        except (BrokenPipeError, OSError):
            line = b""
        if not line:
            code = self._reap()
            raise ArchiveCorrupt(f"{path.name}: the Parquet reader {_death(code)} reading it: the file is damaged")
        try:
            answer = _answers.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._stop()
            raise ArchiveError(f"{path.name}: the verifying process answered {line[:200]!r}") from exc
        if answer.corrupt:
            raise ArchiveCorrupt(answer.corrupt)
        if answer.error or answer.meta is None:
            raise ArchiveError(answer.error or f"{path.name}: the verifying process gave no metadata")
        return Segment(path, answer.meta, answer.file_bytes)

    def _started(self) -> subprocess.Popen[bytes]:
        if self._child is None or self._child.poll() is not None:
            try:
                self._child = subprocess.Popen(
                    [sys.executable, "-m", "projections.archive.fenced"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                )
            except OSError as exc:
                raise ArchiveError(f"cannot start a process to verify the archive: {exc}") from exc
        return self._child

    def _reap(self) -> int | None:
        child, self._child = self._child, None
        if child is None:
            return None
        try:
            return child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            return child.wait()

    def _stop(self) -> None:
        child = self._child
        if child is not None and child.stdin is not None:
            try:
                child.stdin.close()
            except OSError:
                pass
        self._reap()


def verify_all_fenced(directory: Path, stream: str) -> Iterator[Segment]:
    """`verify.verify_all`, each segment read in a child process: every segment of `directory`
    verified wholly, in log order, yielded once verified. Raises ArchiveCorrupt at the first
    problem (a child that died on a segment included), ArchiveError."""
    prev_chain, after = GENESIS, 0
    with FencedVerifier() as verifier:
        for path in segment_paths(directory):
            segment = verifier.verify(path, stream=stream, prev_chain=prev_chain, after_seq=after)
            yield segment
            prev_chain, after = segment.meta.chain_sha256, segment.meta.last_seq


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited ({code})"


def _serve() -> None:
    """The child: answer each request line on stdin with one line on stdout, until stdin ends."""
    requests = msgspec.json.Decoder(_Request)
    for line in sys.stdin.buffer:
        request = requests.decode(line)
        path = Path(request.path)
        try:
            segment = read_meta(path)
            _check_link(segment, request.stream, request.prev_chain, request.after_seq)
            meta = verify_file(path, prev_chain=request.prev_chain, after_seq=request.after_seq)
            answer = _Answer(meta=meta, file_bytes=segment.file_bytes)
        except ArchiveCorrupt as exc:
            answer = _Answer(corrupt=str(exc))
        except ArchiveError as exc:
            answer = _Answer(error=str(exc))
        sys.stdout.buffer.write(msgspec.json.encode(answer) + b"\n")
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    _serve()
