"""Decoding helpers: stop strings, incremental text for streaming, and hooks into ``generate``."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

__all__ = [
    "CancelCriteria",
    "StopStringTail",
    "StreamDeltas",
    "TokenQueueStreamer",
    "cut_at_stop",
    "safe_stream_length",
]


def cut_at_stop(text: str, stops: Sequence[str] | None, start: int = 0) -> tuple[str, bool]:
    """Cut ``text`` before the earliest occurrence of any stop string (searched from ``start``); return (text,
    whether it was cut)."""
    positions = [i for i in (text.find(s, start) for s in stops or ()) if i >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True


def safe_stream_length(text: str, stops: Sequence[str] | None) -> int:
    """How much of a still-growing ``text`` can be emitted: all of it, except an unfinished UTF-8
    character and any tail that could be the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":  # a multi-byte character whose bytes are still arriving
        end -= 1
    held = 0
    for stop in stops or ():
        for k in range(min(len(stop) - 1, end), held, -1):
            if text[end - k : end] == stop[:k]:
                held = k
                break
    return end - held


class StreamDeltas:
    """Turns a growing generated text into the deltas a stream may emit, holding back what could still turn
    out to be a stop string (or an unfinished character) and never emitting a stop string or what follows it.

    Feed the whole text so far to :meth:`update` after each new piece; once generation is over, emit
    :meth:`rest` of the final text (its deltas then concatenate to the final text).
    """

    def __init__(self, stops: Sequence[str] | None) -> None:
        self._stops = stops
        self.emitted = 0
        """Characters emitted so far."""

    def update(self, text: str) -> tuple[str, bool]:
        """The delta to emit now for the text so far (``""`` when none) and whether it reached a stop string
        (then the text is complete: stop generating)."""
        # What was emitted holds no stop string nor the start of one (held back below), so only the text
        # since then is searched: the cost follows the new text, not all of it.
        shown, cut = cut_at_stop(text, self._stops, self.emitted)
        end = len(shown) if cut else safe_stream_length(shown, self._stops)
        if end <= self.emitted:
            return "", cut
        delta, self.emitted = shown[self.emitted : end], end
        return delta, cut

    def rest(self, final_text: str) -> str:
        """What of ``final_text`` was not emitted yet (``""`` when nothing)."""
        return final_text[self.emitted :] if len(final_text) > self.emitted else ""


class TokenQueueStreamer(BaseStreamer):
    """Receives token ids from ``generate`` (batch of one) and queues them; ``None`` marks the end."""

    def __init__(self) -> None:
        self.tokens: queue.Queue[list[int] | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first passes the whole prompt
            self._prompt_seen = True
            return
        self.tokens.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.tokens.put(None)


class CancelCriteria(StoppingCriteria):
    """Stops generation as soon as any of ``events`` is set (the request's, the engine's closing)."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full(  # type: ignore[return-value]
            (input_ids.shape[0],), any(e.is_set() for e in self.events), dtype=torch.bool, device=input_ids.device
        )


class StopStringTail(StoppingCriteria):
    """Stops each row whose generated text ends in one of ``stops``, checking only the newest tokens.

    Each step decodes the last ``max(len(stop)) + 4`` generated tokens of a row (a stop string of ``n``
    characters spans at most ``n`` tokens, plus partial-byte tokens at its ends), so a check costs what the
    longest stop string costs, never the text generated so far, and nothing is precomputed over the
    vocabulary (transformers' ``StopStringCriteria`` builds tables that grow with the stop strings' length).
    The text is cut at the stop string afterwards (:func:`cut_at_stop`).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.window = max((len(s) for s in self.stops), default=0) + 4
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_width
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if generated <= 0 or not self.stops:
            return done  # type: ignore[return-value]
        start = input_ids.shape[1] - min(generated, self.window)
        for row, tail in enumerate(input_ids[:, start:].tolist()):
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            if any(stop in text for stop in self.stops):
                done[row] = True
        return done  # type: ignore[return-value]
