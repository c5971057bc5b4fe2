"""METEOR 1.5 as coco-caption runs it for the E2E scorer: ``meteor-1.5.jar - - -stdio -l en -norm``.

We drive the jar over its stdio protocol ourselves, in the calling thread: one ``SCORE`` line per segment
returns that segment's sufficient statistics, and one ``EVAL`` line with all of them returns each segment's
score and then the corpus score. The corpus score is METEOR over the pooled statistics (not the mean of the
segment scores); it is the number the official scorer reports.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Sequence
from types import TracebackType
from typing import IO

from lorakit.scoring.java import java_executable, meteor_jar

# SCORE requests are sent in batches and their answers read back after each batch. A batch's answers
# (about 60 bytes each) must fit the pipe buffer, or METEOR would block writing while we block writing.
_BATCH = 200


class Meteor:
    """A running METEOR 1.5 process (English, ``-norm``, with the paraphrase table).

    Starting it costs a JVM start plus loading the paraphrase table (several seconds), so one instance can
    score many corpora. Use it as a context manager, or call ``close()``.
    """

    def __init__(self) -> None:
        java = java_executable()
        jar = meteor_jar()
        # Closed in close(); a file rather than a pipe so that nobody has to drain it while we talk.
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        # The same heap limit and flags as coco-caption; cwd is the jar's folder as there.
        cmd = [java, "-jar", "-Xmx2G", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            cmd, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )

    def __enter__(self) -> Meteor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the METEOR process (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        self._stderr.close()

    def _failure(self, what: str) -> RuntimeError:
        self._stderr.seek(0)
        tail = self._stderr.read().decode("utf-8", "replace").strip()[-2000:]
        return RuntimeError(f"METEOR {what}: {tail or 'no message'}")

    def _exchange(self, lines: Sequence[str], answers: int) -> list[str]:
        if self._proc is None:
            raise RuntimeError("this Meteor scorer is closed")
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write("".join(line + "\n" for line in lines).encode("utf-8"))
            stdin.flush()
        except BrokenPipeError:
            raise self._failure("exited early") from None
        replies = []
        for _ in range(answers):
            reply = stdout.readline()
            if not reply:
                raise self._failure("exited early")
            replies.append(reply.decode("utf-8").strip())
        return replies

    def score(
        self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]
    ) -> tuple[float, list[float]]:
        """Corpus METEOR (0–1) and the per-segment scores, for already tokenized, lowercased texts."""
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} outputs but {len(references)} reference groups")
        if not hypotheses:
            raise ValueError("nothing to score: no outputs")
        requests = []
        for hyp, refs in zip(hypotheses, references, strict=True):
            if not refs:
                raise ValueError("every output needs at least one reference")
            # coco-caption cleans only the hypothesis this way; the field separator must not appear in it.
            hyp = hyp.replace("|||", "").replace("  ", " ")
            requests.append(" ||| ".join(["SCORE", *refs, hyp]))
        stats: list[str] = []
        for start in range(0, len(requests), _BATCH):
            batch = requests[start : start + _BATCH]
            stats.extend(self._exchange(batch, len(batch)))
        replies = self._exchange([" ||| ".join(["EVAL", *stats])], len(stats) + 1)
        try:
            values = [float(r) for r in replies]
        except ValueError:
            raise self._failure(f"gave an unexpected answer {replies[:3]!r}") from None
        return values[-1], values[:-1]


def corpus_meteor(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], scorer: Meteor | None = None
) -> float:
    """Corpus METEOR 1.5 of tokenized texts; runs its own METEOR process unless ``scorer`` is given."""
    if scorer is not None:
        return scorer.score(hypotheses, references)[0]
    with Meteor() as own:
        return own.score(hypotheses, references)[0]
