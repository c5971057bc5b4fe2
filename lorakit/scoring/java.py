"""The Java side of the E2E scorer: finding a JRE and the jars that the ``pycocoevalcap`` package ships.

The official scorer runs two Java programs through coco-caption: Stanford CoreNLP 3.4.1's PTBTokenizer
(before METEOR, ROUGE-L and CIDEr) and METEOR 1.5. The PyPI package ``pycocoevalcap`` (1.2) carries both
jars and METEOR's English paraphrase table; we only read its files and run the jars ourselves.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lorakit.errors import UserError

_PTB_JAR = ("tokenizer", "stanford-corenlp-3.4.1.jar")
_METEOR_JAR = ("meteor", "meteor-1.5.jar")
_METEOR_PARAPHRASES = ("meteor", "data", "paraphrase-en.gz")

# coco-caption drops exactly these tokens after tokenizing. The bracket names are upper case while the
# tokenizer (run with -lowerCase) emits "-lrb-" etc., so brackets survive; we keep that behaviour.
COCO_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# Characters that str.splitlines() treats as line ends: the tokenizer would start a new line at several of
# them and so misalign outputs. The official scorer never sees them inside a line (it reads files with
# codecs, which splits there); we turn them into spaces, as coco-caption does for "\n".
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def java_executable() -> str:
    """Path of the ``java`` launcher, or a UserError that says how to install one."""
    java = shutil.which("java")
    if java is None:
        raise UserError(
            "METEOR and the coco tokenizer need Java, and no `java` was found on PATH; install a Java "
            "runtime (e.g. `apt-get install default-jre-headless`) and try again"
        )
    return java


def coco_resource(*parts: str) -> Path:
    """A file shipped in the ``pycocoevalcap`` package, e.g. ``coco_resource("meteor", "meteor-1.5.jar")``."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "E2E scoring needs the `pycocoevalcap` package: pip install 'lorakit[nlg]' (pycocoevalcap==1.2)"
        )
    for root in spec.submodule_search_locations:
        path = Path(root, *parts)
        if path.is_file():
            return path
    raise UserError(f"the installed pycocoevalcap lacks {'/'.join(parts)}; reinstall pycocoevalcap==1.2")


def meteor_jar() -> Path:
    """meteor-1.5.jar; METEOR finds its paraphrase table in ``data/`` beside it, which we check for."""
    coco_resource(*_METEOR_PARAPHRASES)
    return coco_resource(*_METEOR_JAR)


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Tokenize each text as coco-caption does: PTBTokenizer, lowercased, coco punctuation tokens dropped.

    Returns one space-joined string per input, in order. PTB conventions apply (``"isn't"`` becomes
    ``"is n't"``, ``"£"`` becomes ``"#"``, brackets become ``"-lrb-"``/``"-rrb-"``).
    """
    if not texts:
        return []
    java = java_executable()
    jar = coco_resource(*_PTB_JAR)
    # A file rather than stdin, as coco-caption does, so that the same reader code path is used.
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as fh:
        fh.write("\n".join(t.translate(_LINE_BREAKS) for t in texts))
        input_path = fh.name
    try:
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
        proc = subprocess.run(cmd + [input_path], capture_output=True, check=False)
    finally:
        os.unlink(input_path)
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise RuntimeError(f"PTBTokenizer failed with exit status {proc.returncode}: {tail}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) < len(texts):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(texts)} inputs")
    return [
        " ".join(t for t in line.rstrip().split(" ") if t not in COCO_PUNCTUATION)
        for line in lines[: len(texts)]
    ]
