"""Generated tokens as text a client can be sent piece by piece: the pieces of one row join to exactly the
text of the whole, ``stop`` strings end the text (they are not part of it), and nothing is sent that a
later token could still change.

Each token is decoded with every token before it (a byte-level BPE token may hold half of a character,
and only the whole sequence decodes it right), and the text is released up to the point where it can no
longer change: a trailing replacement character (an unfinished UTF-8 sequence) and a tail that could be
the start of a stop string are held back until the next token settles them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"  # what an unfinished UTF-8 sequence decodes to


class TextStream:
    """The text of one row's generated tokens, released as pieces, cut at the first stop string."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # the text released so far; the whole text once finished
        self.stopped = False  # a stop string was found: the text ends before it

    def add(self, token: int) -> str:
        """Take one more token; returns the text newly released (often empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        # Decoded with every token so far and without clean-up, so that a prefix of the ids decodes to a
        # prefix of the text (clean-up would change " ." to "." once the next token came).
        whole = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        # A stop string may straddle the text released and the new tail: search a little before the tail.
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        found = [i for i in (whole.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            return self._release(whole[: min(found)])
        return self._release(whole[: len(whole) - self._held(whole)])

    def finish(self) -> str:
        """The rest of the text, held back until now (the row ended by its length or end of text)."""
        if self.stopped or not self.ids:
            return ""
        whole = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self._release(whole)

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        piece = upto[len(self.text) :]
        self.text = upto
        return piece

    def _held(self, whole: str) -> int:
        """How many characters at the end of ``whole`` may still change."""
        held = len(whole) - len(whole.rstrip(REPLACEMENT))
        body = whole[: len(whole) - held]
        for stop in self.stops:  # the longest tail that is a proper prefix of a stop string
            for k in range(min(len(stop) - 1, len(body)), 0, -1):
                if body.endswith(stop[:k]):
                    held = max(held, k + (len(whole) - len(body)))
                    break
        return held
