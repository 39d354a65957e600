"""Continuous batching for the embedded engine: requests join and leave a running batch at token boundaries.

One scheduler thread owns decoding. Each step, under the engine's FIFO lock (so an adapter load or a gate
evaluation waiting for the engine gets its turn between two steps):

1. new requests are admitted, up to ``max_batch_size``: each prompt is prefilled alone (its own KV cache, on
   its own adapter) and its first token sampled;
2. their caches are merged into the running batch (left-padded to a common length; an attention mask hides
   the padding and every row carries its own positions);
3. one forward pass decodes the next token of every running row, each on its own adapter (PEFT's mixed-batch
   LoRA inference, ``adapter_names``), each with its own sampling parameters and random generator;
4. rows that are done (end of turn, ``max_new_tokens``, a stop string, cancelled) leave the batch at once,
   and the padding no row needs any more is trimmed.

Adapters that cannot share a batch with others (DoRA and other non-plain LoRA) run in their own batch
beside the shared one. Greedy rows give the same tokens as a request run alone (``generate``).
"""

from __future__ import annotations

import queue
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.engines.base import SamplingParams
from runtime.engines.errors import EngineBusyError, EngineError

__all__ = ["BatchRow", "ContinuousBatcher"]


@dataclass
class BatchRow:
    """One request in the scheduler: its prompt, adapter and sampling, and what it generated."""

    ids: list[int]
    params: SamplingParams
    adapter: str | None
    cancel: threading.Event = field(default_factory=threading.Event)
    tokens: queue.Queue[list[int] | None] = field(default_factory=queue.Queue)
    """Each step's new token (a one-element list), then ``None`` when the row is done."""
    generated: list[int] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    # scheduler state
    _pad: int = 0
    _rng: torch.Generator | None = None
    _window: int = 0

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.tokens.put(None)
        self.done.set()


class _Batch:
    """The running rows that share one KV cache (and one forward pass per step)."""

    def __init__(self) -> None:
        self.rows: list[BatchRow] = []
        self.cache: Any = None  # a transformers DynamicCache, batch-first, left-padded

    @property
    def width(self) -> int:
        return 0 if self.cache is None else int(self.cache.layers[0].keys.shape[2])


class ContinuousBatcher:
    """Schedules generation rows on a model step by step (see the module docstring).

    Args:
        model_fn: the model to run now (the base or its PEFT wrapper: it changes as adapters load).
        plan: ``plan(adapter_names) -> [BatchPart]`` of the engine's adapter set.
        group_of: the batch an adapter's rows run in (``"shared"``, or the adapter's own).
        lock: the engine's lock, held for each step.
        eos_ids: tokens that end a turn.
        tokenizer: for stop strings.
        device: where the model runs.
        max_batch_size: running rows at most (per batch).
        max_queued: waiting rows at most; beyond it :meth:`submit` raises :class:`EngineBusyError`.
    """

    def __init__(self, *, model_fn: Callable[[], Any], plan: Callable[[list[str | None]], list[Any]],
                 group_of: Callable[[str | None], str], lock: Any, eos_ids: set[int], tokenizer: Any,
                 device: torch.device, max_batch_size: int, max_queued: int) -> None:
        self._model_fn = model_fn
        self._plan = plan
        self._group_of = group_of
        self._lock = lock
        self._eos = set(eos_ids)
        self._tokenizer = tokenizer
        self._device = device
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self._cond = threading.Condition()
        self._waiting: deque[BatchRow] = deque()
        self._batches: dict[str, _Batch] = {}
        self._held: Counter[str] = Counter()  # adapters in use by work outside the batches (scoring)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="engine-scheduler", daemon=True)
        self._thread.start()

    # -- the request side --------------------------------------------------------------------------
    def submit(self, row: BatchRow) -> BatchRow:
        """Queue ``row``; its tokens arrive on ``row.tokens``. Raises :class:`EngineBusyError` when full."""
        with self._cond:
            if self._closed:
                raise EngineError("the engine is closed")
            if len(self._waiting) >= self.max_queued:
                raise EngineBusyError(f"{len(self._waiting)} requests are already waiting for the engine "
                                      f"(engine.max_queued_requests); retry shortly")
            if row.params.seed is not None:
                row._rng = torch.Generator(device=self._device).manual_seed(row.params.seed)
            row._window = max((len(s) for s in row.params.stop or () if s), default=0) + 4
            self._waiting.append(row)
            self._cond.notify_all()
        return row

    @property
    def queued(self) -> int:
        """Rows waiting to join a batch."""
        with self._cond:
            return len(self._waiting)

    def wait_unused(self, adapter: str) -> None:
        """Block until no waiting or running row is on ``adapter`` (an unload or replace waits for them)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._uses(adapter) or self._closed)

    @contextmanager
    def holding(self, adapters: Iterable[str | None]) -> Iterator[None]:
        """Count ``adapters`` as in use, for :meth:`wait_unused`, while work outside the batches runs on them
        (scoring, which takes the engine's lock between steps)."""
        names = Counter(a for a in adapters if a is not None)
        with self._cond:
            self._held.update(names)
        try:
            yield
        finally:
            with self._cond:
                self._held.subtract(names)
                self._held = +self._held  # drop the zero counts
                self._cond.notify_all()

    def _uses(self, adapter: str) -> bool:
        return self._held[adapter] > 0 or any(r.adapter == adapter for r in self._waiting) or any(
            r.adapter == adapter for b in self._batches.values() for r in b.rows)

    def close(self) -> None:
        """Stop: rows waiting or running end with an error (their text so far is kept)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    # -- the scheduler thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._waiting or any(
                    b.rows for b in self._batches.values()))
                if self._closed:
                    break
            try:
                with self._lock:
                    self._step()
            except BaseException as exc:  # noqa: BLE001 - a failed step ends its rows, never the scheduler
                self._fail_running(exc)
        self._fail_all(EngineError("the engine was closed while this request was generating"))

    def _step(self) -> None:
        self._admit()
        for key, batch in list(self._batches.items()):
            if batch.rows:
                self._decode(batch)
            if not batch.rows:
                del self._batches[key]
        with self._cond:
            self._cond.notify_all()  # wait_unused

    def _admit(self) -> None:
        while True:
            with self._cond:
                row = next((r for r in self._waiting if self._room(r)), None)
                if row is None:
                    return
                self._waiting.remove(row)
            if row.cancel.is_set():
                row.finish()
                continue
            try:
                cache, logits = self._prefill(row)
            except BaseException as exc:  # noqa: BLE001 - e.g. an adapter unloaded before the row started
                row.finish(exc)
                continue
            if self._advance(row, logits[0]):
                continue  # done at its first token
            self._join(self._batches.setdefault(self._group_of(row.adapter), _Batch()), row, cache)

    def _room(self, row: BatchRow) -> bool:
        try:
            batch = self._batches.get(self._group_of(row.adapter))
        except Exception:  # noqa: BLE001 - an unknown adapter: admit it, its prefill reports the error
            return True
        return batch is None or len(batch.rows) < self.max_batch_size

    def _forward(self, rows: list[BatchRow], **inputs: Any) -> Any:
        [part] = self._plan([r.adapter for r in rows])
        with part.context(), torch.inference_mode():
            return self._model_fn()(**inputs, use_cache=True, **part.kwargs)

    def _prefill(self, row: BatchRow) -> tuple[Any, torch.Tensor]:
        ids = torch.tensor([row.ids], dtype=torch.long, device=self._device)
        # Only the last position's logits: the prompt's others are never used, and the vocabulary projection of
        # every prompt position costs about as much as the rest of a short prompt's prefill.
        out = self._forward([row], input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
        return _cache_of(out), out.logits[:, -1, :]

    def _join(self, batch: _Batch, row: BatchRow, cache: Any) -> None:
        """Merge a prefilled row's cache into the batch's, left-padding the shorter side."""
        length = int(cache.layers[0].keys.shape[2])
        if batch.cache is None:
            batch.cache, batch.rows, row._pad = cache, [row], 0
            return
        width = batch.width
        grow, row._pad = max(length - width, 0), max(width - length, 0)
        for mine, theirs in zip(batch.cache.layers, cache.layers, strict=True):
            for name in ("keys", "values"):
                old, new = getattr(mine, name), getattr(theirs, name)
                old = torch.nn.functional.pad(old, (0, 0, grow, 0)) if grow else old
                new = torch.nn.functional.pad(new, (0, 0, row._pad, 0)) if row._pad else new
                setattr(mine, name, torch.cat([old, new], dim=0))
        for other in batch.rows:
            other._pad += grow
        batch.rows.append(row)

    def _decode(self, batch: _Batch) -> None:
        rows = batch.rows
        width = batch.width
        ids = torch.tensor([[r.generated[-1]] for r in rows], dtype=torch.long, device=self._device)
        mask = torch.ones((len(rows), width + 1), dtype=torch.long, device=self._device)
        for i, r in enumerate(rows):
            mask[i, : r._pad] = 0
        positions = torch.tensor([[width - r._pad] for r in rows], dtype=torch.long, device=self._device)
        out = self._forward(rows, input_ids=ids, attention_mask=mask, position_ids=positions, cache=batch.cache)
        batch.cache = _cache_of(out)
        logits = out.logits[:, -1, :]
        keep = [i for i, r in enumerate(rows) if not self._advance(r, logits[i])]
        if len(keep) < len(rows):
            self._leave(batch, keep)

    def _leave(self, batch: _Batch, keep: list[int]) -> None:
        batch.rows = [batch.rows[i] for i in keep]
        if not batch.rows:
            batch.cache = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._device)
        trim = min(r._pad for r in batch.rows)
        for layer in batch.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:, :]
            layer.values = layer.values.index_select(0, index)[:, :, trim:, :]
        for r in batch.rows:
            r._pad -= trim

    def _advance(self, row: BatchRow, logits: torch.Tensor) -> bool:
        """Pick the row's next token from ``logits`` and hand it over; return whether the row is done."""
        if self._closed:
            row.finish(EngineError("the engine was closed while this request was generating"))
            return True
        if row.cancel.is_set():
            row.finish()
            return True
        token = self._sample(row, logits)
        row.generated.append(token)
        row.tokens.put([token])
        if token in self._eos or len(row.generated) >= row.params.max_new_tokens or self._stopped(row):
            row.finish()
            return True
        return False

    def _sample(self, row: BatchRow, logits: torch.Tensor) -> int:
        params = row.params
        if params.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            cut = ordered.cumsum(-1) - ordered > params.top_p  # keep the smallest set reaching top_p
            ordered[cut] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, ordered)
        return int(torch.multinomial(probs, 1, generator=row._rng))

    def _stopped(self, row: BatchRow) -> bool:
        stops = row.params.stop
        if not stops:
            return False
        tail = self._tokenizer.decode(row.generated[-row._window:], skip_special_tokens=True)
        return any(s and s in tail for s in stops)

    def _fail_running(self, exc: BaseException) -> None:
        for batch in self._batches.values():
            for row in batch.rows:
                row.finish(exc)
        self._batches.clear()
        with self._cond:
            self._cond.notify_all()

    def _fail_all(self, exc: BaseException) -> None:
        self._fail_running(exc)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for row in waiting:
            row.finish(exc)


def _cache_of(output: Any) -> Any:
    """The KV cache a forward pass returned (``cache`` in newer transformers, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
