"""Token ids → text for a stream: incremental detokenization and stop strings.

`IncrementalDetokenizer` emits text only once it is complete: a byte-level tokenizer may
split one character over several tokens, and decoding a prefix then shows U+FFFD, so text
ending in U+FFFD is held back until the next token completes it. It decodes a short window
of preceding tokens with the new ones, so tokenizers that add spaces between tokens or
strip a leading space still produce the right text.

`StopMatcher` cuts the text before the first stop string and holds back just enough text
to never emit the start of a stop string that has not been completed yet.

`TextStream` puts the two together and feeds them one token at a time, so the text sent
after the first k tokens is a function of those k tokens alone, however they arrived in
deltas: a router replica that takes a stream over after k tokens replays them and goes on
with exactly the text the client would have got (no gap, no duplicate, in text too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]
REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, decode: Decode, prompt_token_ids: Sequence[int]) -> None:
        self._decode = decode
        self._ids = list(prompt_token_ids)
        self._prefix = max(len(self._ids) - CONTEXT_TOKENS, 0)
        self._read = len(self._ids)

    def add(self, token_ids: Sequence[int]) -> str:
        """The text that the new tokens complete ("" while a character is incomplete)."""
        self._ids.extend(token_ids)
        return self._step(final=False)

    def flush(self) -> str:
        """At the end of the stream: whatever is left, as the tokenizer decodes it."""
        return self._step(final=True)

    def _step(self, *, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix: self._read])
        text = self._decode(self._ids[self._prefix:])
        if not final and (len(text) <= len(prefix_text) or text.endswith(REPLACEMENT)):
            return ""
        if not text.startswith(prefix_text):
            # Later tokens changed how earlier ones decode: emit only what is new.
            prefix_text = text[: len(prefix_text)]
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text):]


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text safe to emit now; sets `stopped` once a stop string is seen."""
        if self.stopped:
            return ""
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = min(self._hold, len(self._pending))
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


class TextStream:
    def __init__(self, decode: Decode, prompt_token_ids: Sequence[int],
                 stops: Sequence[str]) -> None:
        self._detok = IncrementalDetokenizer(decode, prompt_token_ids)
        self._stops = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        """A stop string was seen: no more text."""
        return self._stops.stopped

    def add(self, token_ids: Sequence[int]) -> str:
        return "".join(self._stops.feed(self._detok.add((token,))) for token in token_ids)

    def finish(self) -> str:
        """The text held back, at the end of the stream."""
        if self._stops.stopped:
            return ""
        text = self._stops.feed(self._detok.flush())
        return text + self._stops.flush()
