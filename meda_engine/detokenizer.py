"""Incremental detokenisation with stop strings, one object per request (vLLM v1's detokenizer, small).

Each new token id is turned into its new text in O(1) with tokenizers' ``DecodeStream`` (it keeps
the few ids a multi-byte or merged piece still needs, and returns ``None`` until the piece is
complete), instead of re-decoding the whole sequence at every step. Stop strings are searched only
in the tail the new text can complete (the last ``len(stop) - 1`` characters plus the new ones), and
while stop strings are set the last ``max(len(stop)) - 1`` characters are held back from the stream,
so a stop string is never streamed and then retracted.

A tokenizer without a ``tokenizers`` backend falls back to decoding a sliding window of recent ids
(prefix/read offsets, as vLLM's slow-tokenizer path does).
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    """``push(token_id) -> (delta, stopped)``; ``flush() -> delta`` once the request has finished.

    ``text`` is the output so far (cut before the stop string, if one was found); the concatenation
    of every delta `push` and `flush` returned equals the final ``text``.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] | list[str] = (), *, skip_special_tokens: bool = True):
        self.stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._text = ""  # all decoded text (not cut)
        self._emitted = 0  # characters of _text already streamed
        self.stopped = False
        self._cut: int | None = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        else:  # slow tokenizer: windowed re-decode
            self._tok = tokenizer
            self._skip = skip_special_tokens
            self._ids: list[int] = []
            self._prefix = self._read = 0

    @property
    def text(self) -> str:
        return self._text if self._cut is None else self._text[: self._cut]

    def _new_text(self, token_id: int) -> str:
        if self._backend is not None:
            return self._stream.step(self._backend, int(token_id)) or ""
        self._ids.append(int(token_id))
        prefix = self._tok.decode(self._ids[self._prefix : self._read], skip_special_tokens=self._skip)
        full = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full[len(prefix) :]
        return ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one generated token; return the text that may be streamed now, and whether a stop
        string was found (the text is then cut before it and the request should finish)."""
        if self.stopped:
            return "", True
        new = self._new_text(token_id)
        if new and self.stop:
            start = max(0, len(self._text) - self._hold)
            self._text += new
            hits = [i for s in self.stop if (i := self._text.find(s, start)) >= 0]
            if hits:
                self._cut = min(hits)
                self.stopped = True
                return self.flush(), True
        else:
            self._text += new
        limit = len(self._text) - self._hold if self.stop else len(self._text)
        if limit <= self._emitted:
            return "", False
        delta = self._text[self._emitted : limit]
        self._emitted = limit
        return delta, False

    def flush(self) -> str:
        """The held-back rest of the text (call once the request has finished)."""
        text = self.text
        delta = text[self._emitted :]
        self._emitted = max(self._emitted, len(text))
        return delta
