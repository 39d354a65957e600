"""Decoding helpers: stop strings, incremental text for streaming, and hooks into ``generate``."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

__all__ = ["CancelCriteria", "StreamDeltas", "TokenQueueStreamer", "cut_at_stop", "safe_stream_length"]


def cut_at_stop(text: str, stops: Sequence[str] | None) -> tuple[str, bool]:
    """Cut ``text`` before the earliest occurrence of any stop string; return (text, whether it was cut)."""
    positions = [i for i in (text.find(s) for s in stops or ()) if i >= 0]
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
        shown, cut = cut_at_stop(text, self._stops)
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
    """Stops generation as soon as ``event`` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full(  # type: ignore[return-value]
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )
