"""The embedded engine: a transformers causal LM in this process, with PEFT LoRA adapters hot-loaded."""

from __future__ import annotations

import copy
import gc
import threading
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList

from runtime.chat_encoding import encode_chat
from runtime.engines.base import (
    ACTIVE,
    AdapterChoice,
    AdapterChoices,
    Conversation,
    Engine,
    Generation,
    SamplingParams,
    StreamResult,
    align_completion,
    resolve_per_row,
    selected_adapter,
)
from runtime.engines.continuous_batching import BatchRow, ContinuousBatcher
from runtime.engines.decoding import CancelCriteria, StopStringTail, StreamDeltas, TokenQueueStreamer, cut_at_stop
from runtime.engines.errors import ContextLengthError, EngineError
from runtime.engines.fair_lock import FairRLock
from runtime.engines.peft_adapters import AdapterSet
from runtime.engines.torch_setup import eos_token_ids, pick_device, pick_dtype
from runtime.models import resolve_model
from runtime.processes import check_not_spawning

__all__ = ["TransformersEngine"]



class TransformersEngine(Engine):
    """A Hugging Face causal LM served in-process, on CPU or GPU, with named LoRA adapters.

    Args:
        model: the alias ``smollm2-135m-instruct`` or a local Hugging Face model directory
            (see :func:`runtime.models.resolve_model`; nothing is downloaded).
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: ``"auto"`` (float32 on CPU; bfloat16 on CUDA when supported, else float32), ``"float32"``,
            ``"bfloat16"`` or ``"float16"``.
        num_threads: sets ``torch.set_num_threads`` (process-wide) when given.
        cache_dir: runtime cache root for converted models.

    Example::

        engine = TransformersEngine("smollm2-135m-instruct")
        engine.load_adapter("v1", "adapters/v1", activate=True)
        [answer] = engine.chat([[{"role": "user", "content": "What is the capital of France?"}]])
        print(answer.text, answer.adapter)

    All methods are thread-safe. Requests and adapter changes are serialised by one re-entrant lock, so
    a request runs entirely on the adapter it started with and a swap never interleaves a forward pass.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        num_threads: int | None = None,
        cache_dir: Path | None = None,
        max_batch_size: int = 1,
        max_queued_requests: int = 256,
    ) -> None:
        check_not_spawning(f"a TransformersEngine for {model}")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.model_name = str(model)
        self.model_path: Path = resolve_model(model, cache_dir)
        self._device = pick_device(device)
        self._dtype = pick_dtype(dtype, self._device)
        self._lock = FairRLock()  # FIFO: loads and evaluations are not starved by a stream of requests
        # Guards `_active` and the adapter table's membership so that switching the active adapter never
        # waits for a generation in flight (those hold `_lock`): a request resolves its adapter once, when
        # it starts, and finishes on it. Lock order: `_lock` before `_switch_lock`, never the reverse.
        self._switch_lock = threading.Lock()
        self._closed = False
        self._closing = threading.Event()  # set by close(): generations in flight stop at the next token
        self._active: str | None = None

        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._tokenizer = tokenizer
        # The first plain encode clears any padding/truncation saved in tokenizer.json; after it, encoding
        # never mutates the Rust tokenizer, so threads can tokenize concurrently without "Already borrowed".
        tokenizer("warm-up", add_special_tokens=False)
        base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self._dtype)
        base.to(self._device).eval()
        self._generation_config = base.generation_config
        self.context_length: int | None = getattr(base.config, "max_position_embeddings", None)
        """Tokens the model can attend to (prompt and completion together), if the config says."""
        self._adapters = AdapterSet(base)
        self._eos_ids = eos_token_ids(base.generation_config.eos_token_id, tokenizer)
        if not self._eos_ids:
            raise EngineError(
                f"{self.model_path} defines no end-of-sequence token: cannot tell when to stop."
            )
        self._batcher: ContinuousBatcher | None = None
        if max_batch_size > 1:  # requests of different clients share the decoding steps
            self._batcher = ContinuousBatcher(
                model_fn=lambda: self._adapters.model, plan=lambda names: self._adapters.plan(names),
                group_of=lambda name: self._adapters.batch_group(name), lock=self._lock, eos_ids=self._eos_ids,
                tokenizer=self._tokenizer, device=self._device, max_batch_size=max_batch_size,
                max_queued=max_queued_requests,
            )

    # -- properties -----------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (left padding; pad token set)."""
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        """Device the model runs on."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the base model."""
        return self._dtype

    # -- requests -------------------------------------------------------------------------------------
    def render_chat(self, conversation: Conversation, *, add_generation_prompt: bool = True) -> str:
        """The conversation rendered with the model's chat template (the text :meth:`chat` feeds it)."""
        if not getattr(self._tokenizer, "chat_template", None):
            raise EngineError(f"The tokenizer of {self.model_path} has no chat template; use generate().")
        messages = [dict(m) for m in conversation]
        return self._tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def chat(
        self,
        conversations: Sequence[Conversation],
        params: SamplingParams | None = None,
        adapter: AdapterChoices = ACTIVE,
    ) -> list[Generation]:
        """Answer a batch of conversations; ``adapter`` may also be a list, one choice per conversation.

        Message text never becomes a control token (:func:`runtime.chat_encoding.encode_chat`)."""
        return self._generate_encoded([self._encode_chat(c) for c in conversations], params, adapter)

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams | None = None,
        adapter: AdapterChoices = ACTIVE,
    ) -> list[Generation]:
        """Continue a batch of raw prompts; ``adapter`` may also be a list, one choice per prompt.

        A prompt gets the tokenizer's special tokens (e.g. BOS) unless it already starts with BOS.
        """
        params = params or SamplingParams()
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        return self._generate_encoded([self._encode(p) or self._bos_only() for p in prompts], params, adapter)

    def _generate_encoded(
        self, encoded: list[list[int]], params: SamplingParams | None, adapter: AdapterChoices
    ) -> list[Generation]:
        params = params or SamplingParams()
        if not encoded:
            return []
        for ids in encoded:
            self._check_fits(len(ids), params.max_new_tokens)
        if self._batcher is not None:
            with self._switch_lock:
                self._check_open()
                names = self._resolve_many(adapter, len(encoded))
            outputs = self._run_batched(encoded, params, names)
            return [self._finish(len(e), out, params, n) for e, out, n in zip(encoded, outputs, names, strict=True)]
        with self._lock:
            self._check_open()
            names = self._resolve_many(adapter, len(encoded))
            outputs = self._run_generate(encoded, params, names)
        return [
            self._finish(len(e), out, params, n) for e, out, n in zip(encoded, outputs, names, strict=True)
        ]

    def stream_chat(
        self,
        conversation: Conversation,
        params: SamplingParams | None = None,
        adapter: AdapterChoice = ACTIVE,
    ) -> StreamResult:
        """Answer one conversation as text deltas; see :class:`~runtime.engines.base.StreamResult`.

        An unknown adapter name raises here; with :data:`ACTIVE` the adapter is fixed when generation
        starts (on the first ``next()``).
        """
        params = params or SamplingParams()
        ids = self._encode_chat(conversation)
        self._check_fits(len(ids), params.max_new_tokens)
        if adapter is not ACTIVE:
            with self._lock:
                self._check_open()
                self._resolve(adapter)
        return StreamResult(self._stream(ids, params, adapter))

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        adapter: AdapterChoices = ACTIVE,
    ) -> list[list[float]]:
        """Per-token log-probs of each completion given its prompt; ``adapter`` may be one per row."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        sequences: list[list[int]] = []
        starts: list[int] = []
        for prompt, completion in zip(prompts, completions, strict=True):
            full, start = self._align(prompt, completion)
            sequences.append(full)
            starts.append(start)
        if not sequences:
            return []
        results: list[list[float]] = []
        for rows, (names,) in self._scoring_chunks(len(sequences), adapter):
            results += self._run_score(sequences[rows], starts[rows], names)
        return results

    def kl_divergence(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        adapter: AdapterChoice = ACTIVE,
        reference: AdapterChoice = None,
    ) -> list[float]:
        """Mean per-token KL(reference || adapter) over each completion's positions, full vocabulary.

        With the defaults this is KL(base || active adapter): how far an adapter moved the model's
        next-token distributions on given text (0 for the base model itself).
        """
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        aligned = [self._align(p, c) for p, c in zip(prompts, completions, strict=True)]
        sequences = [full for full, _ in aligned]
        starts = [start for _, start in aligned]
        if not sequences:
            return []
        result = [0.0] * len(sequences)
        for rows, (ref, new) in self._scoring_chunks(len(sequences), reference, adapter):
            chunk, chunk_starts = sequences[rows], starts[rows]
            ref_lp = {row: lp for row, lp, _ in self._completion_logprobs(chunk, chunk_starts, ref)}
            for row, lp, _ in self._completion_logprobs(chunk, chunk_starts, new):
                p_ref = ref_lp[row]
                result[rows.start + row] = float((p_ref.exp() * (p_ref - lp)).sum(-1).mean())
        return result

    def _scoring_chunks(self, n: int, *choices: AdapterChoices) -> Iterator[tuple[slice, list[list[str | None]]]]:
        """Split ``n`` scoring rows into chunks, each run while the caller holds the engine (the body of the loop
        runs under the lock): ``(rows, adapter names per choice for those rows)``.

        Unbatched, one chunk holds the engine for the whole call. With continuous batching a chunk is at most
        ``max_batch_size`` rows, and the engine is let go between chunks, so a long gate evaluation or KL check
        runs between decoding steps of the traffic instead of stalling it; the adapters are resolved once and
        held (an unload waits) until the last chunk is done."""
        if self._batcher is None:
            with self._lock:
                self._check_open()
                yield slice(0, n), [self._resolve_many(c, n) for c in choices]
            return
        with self._switch_lock:
            self._check_open()
            names = [self._resolve_many(c, n) for c in choices]
        size = self._batcher.max_batch_size
        with self._batcher.holding(name for per_row in names for name in per_row):
            for start in range(0, n, size):
                rows = slice(start, min(start + size, n))
                with self._lock:
                    self._check_open()
                    yield rows, [per_row[rows] for per_row in names]

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` (without added special tokens)."""
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    # -- adapters -------------------------------------------------------------------------------------
    def load_adapter(
        self, name: str, path: str | Path, *, activate: bool = False, replace: bool = False
    ) -> None:
        """Load a PEFT LoRA adapter as ``name`` (see :meth:`Engine.load_adapter`)."""
        if replace:
            self._wait_unused(name)  # a request finishes on the weights it started with
        with self._lock:
            self._check_open()
            self._adapters.load(name, path, replace=replace)
            if activate:
                with self._switch_lock:
                    self._active = name

    def unload_adapter(self, name: str) -> None:
        """Unload ``name``; if it was active, the base model becomes active. Requests on it finish first."""
        self._wait_unused(name)
        with self._lock, self._switch_lock:
            self._check_open()
            self._adapters.unload(name)
            if self._active == name:
                self._active = None

    def set_active_adapter(self, name: str | None) -> None:
        """Make ``name`` (or the base model, for ``None``) the default for requests.

        Takes effect at once for requests that start afterwards, without waiting for those in flight,
        which finish on the adapter they started with.
        """
        with self._switch_lock:
            self._check_open()
            if name is not None:
                self._adapters.check(name)
            self._active = name

    @property
    def active_adapter(self) -> str | None:
        """The default adapter for requests (``None`` = the base model)."""
        return self._active

    def queue_depth(self) -> int:
        """Calls waiting for the engine: for its lock (the one in progress not counted) and, with continuous
        batching, requests waiting to join a batch."""
        return self._lock.waiting + (self._batcher.queued if self._batcher is not None else 0)

    def list_adapters(self) -> list[str]:
        """Loaded adapter names, in load order (does not wait for generations in flight)."""
        with self._switch_lock:
            return self._adapters.names() if not self._closed else []

    def adapter_path(self, name: str) -> Path:
        """Directory the adapter ``name`` was loaded from."""
        with self._lock:
            self._check_open()
            return self._adapters.path(name)

    def close(self) -> None:
        """Free the model (and GPU memory); later calls raise :class:`EngineError`. Generations in flight stop
        at their next token (their answers are cut short) instead of holding the close up."""
        self._closing.set()
        if self._batcher is not None:
            self._batcher.close()
        with self._lock:
            if self._closed:
                return
            with self._switch_lock:
                self._closed = True
                self._active = None
            del self._adapters
            gc.collect()
            if self._device.type == "cuda":
                torch.cuda.empty_cache()

    # -- internals ------------------------------------------------------------------------------------
    def _wait_unused(self, name: str) -> None:
        """With continuous batching, wait until no request runs (or waits) on adapter ``name``."""
        if self._batcher is not None:
            self._batcher.wait_unused(name)

    def _run_batched(self, encoded: list[list[int]], params: SamplingParams, names: list[str | None]
                     ) -> list[list[int]]:
        """Generated token ids per row, through the continuous batcher (each row its own request)."""
        assert self._batcher is not None
        rows = []
        for i, (ids, name) in enumerate(zip(encoded, names, strict=True)):
            row_params = params if params.seed is None else replace(params, seed=params.seed + i)
            rows.append(self._batcher.submit(BatchRow(ids, row_params, name)))
        for row in rows:
            row.done.wait()
        for row in rows:
            if row.error is not None:
                raise row.error
        return [row.generated for row in rows]

    def _deltas(self, tokens: Any, deltas: StreamDeltas, cancel: threading.Event) -> Iterator[str]:
        """The text deltas of token chunks arriving on ``tokens`` (``None`` ends them); at a stop string, ``cancel``
        is set and the deltas end (``deltas.rest`` gives what remains of the final text)."""
        generated: list[int] = []
        while (chunk := tokens.get()) is not None:
            generated.extend(chunk)
            delta, cut = deltas.update(self._tokenizer.decode(generated, skip_special_tokens=True))
            if delta:
                yield delta
            if cut:
                cancel.set()
                return

    def _stream_batched(self, ids: list[int], params: SamplingParams, adapter: AdapterChoice
                        ) -> Generator[str, None, Generation]:
        """:meth:`_stream` through the continuous batcher."""
        assert self._batcher is not None
        with self._switch_lock:
            self._check_open()
            name = self._resolve(adapter)
        row = self._batcher.submit(BatchRow(ids, params, name))
        try:
            deltas = StreamDeltas(params.stop)
            yield from self._deltas(row.tokens, deltas, row.cancel)
            row.done.wait()
            if row.error is not None:
                raise row.error
            result = self._finish(len(ids), row.generated, params, name)
            if rest := deltas.rest(result.text):
                yield rest
            return result
        finally:
            row.cancel.set()
    def _check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if self.context_length is not None and prompt_tokens + max_new_tokens > self.context_length:
            raise ContextLengthError(prompt_tokens, max_new_tokens, self.context_length)

    def _resolve(self, adapter: AdapterChoice) -> str | None:
        name = selected_adapter(adapter, self._active)
        if name is not None and adapter is not ACTIVE:  # the active one is loaded: unloading it resets it
            self._adapters.check(name)
        return name

    def _resolve_many(self, adapter: AdapterChoices, n: int) -> list[str | None]:
        return resolve_per_row(adapter, n, self._resolve)

    def _encode(self, text: str) -> list[int]:
        bos = self._tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return list(self._tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def _encode_chat(self, conversation: Conversation) -> list[int]:
        """The conversation's ids as :meth:`render_chat` renders it, message text never a control token."""
        self.render_chat(conversation)  # the checks (a chat template exists)
        ids = encode_chat(self._tokenizer, [dict(m) for m in conversation])
        bos = self._tokenizer.bos_token_id
        if bos is not None and ids[:1] != [bos] and self._encode("")[:1] == [bos]:
            ids = [bos, *ids]  # as _encode gives a rendered prompt the tokenizer's BOS
        return ids or self._bos_only()

    def _bos_only(self) -> list[int]:
        """Context for an empty prompt: the BOS token."""
        if self._tokenizer.bos_token_id is None:
            raise ValueError("Empty prompt, and the tokenizer has no BOS token to start from")
        return [self._tokenizer.bos_token_id]

    def _align(self, prompt: str, completion: str) -> tuple[list[int], int]:
        """Tokens of prompt+completion and the index of the first completion token (BOS gives the context
        when they share no prefix)."""
        return align_completion(self._encode(prompt), self._encode(prompt + completion), self._bos_only)

    def _pad(self, rows: Sequence[list[int]], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self._tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return ids.to(self._device), mask.to(self._device)

    @contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        """Seed sampling without disturbing the global RNG state (caller holds the lock)."""
        if seed is None:
            yield
            return
        with torch.random.fork_rng(devices=[self._device] if self._device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    def _generation_config_for(self, params: SamplingParams) -> Any:
        config = copy.deepcopy(self._generation_config)
        config.max_new_tokens = params.max_new_tokens
        config.max_length = None
        config.eos_token_id = sorted(self._eos_ids)
        config.pad_token_id = self._tokenizer.pad_token_id
        if params.temperature > 0:
            config.do_sample = True
            config.temperature = params.temperature
            config.top_p = params.top_p
            config.top_k = 0  # no top-k truncation: temperature and top_p only
        else:
            config.do_sample = False
            config.temperature = config.top_p = config.top_k = None
        return config

    def _run_generate(
        self,
        encoded: list[list[int]],
        params: SamplingParams,
        names: list[str | None],
        *,
        streamer: TokenQueueStreamer | None = None,
        cancel: threading.Event | None = None,
    ) -> list[list[int]]:
        """Generated token ids per row (caller holds the lock)."""
        config = self._generation_config_for(params)
        cancels = [self._closing] if cancel is None else [self._closing, cancel]
        outputs: list[list[int]] = [[] for _ in encoded]
        model = self._adapters.model
        with self._seeded(params.seed):
            for part in self._adapters.plan(names):
                input_ids, attention_mask = self._pad([encoded[i] for i in part.rows], left=True)
                criteria = StoppingCriteriaList([CancelCriteria(*cancels)])
                if params.stop:
                    criteria.append(StopStringTail(self._tokenizer, params.stop, input_ids.shape[1]))
                with part.context(), torch.inference_mode():
                    out = model.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        generation_config=config,
                        stopping_criteria=criteria,
                        streamer=streamer,
                        **part.kwargs,
                    )
                width = input_ids.shape[1]
                for j, row in enumerate(part.rows):
                    outputs[row] = out[j, width:].tolist()
        return outputs

    def _run_score(
        self, sequences: list[list[int]], starts: list[int], names: list[str | None]
    ) -> list[list[float]]:
        results: list[list[float]] = [[] for _ in sequences]
        for row, logprobs, targets in self._completion_logprobs(sequences, starts, names):
            results[row] = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()
        return results

    def _completion_logprobs(
        self, sequences: list[list[int]], starts: list[int], names: list[str | None]
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(row, log-softmax over the vocabulary at each completion position, completion token ids)."""
        model = self._adapters.model
        for part in self._adapters.plan(names):
            rows = [sequences[i] for i in part.rows]
            input_ids, attention_mask = self._pad(rows, left=False)
            with part.context(), torch.inference_mode():
                logits = model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **part.kwargs
                ).logits
                for j, row in enumerate(part.rows):
                    start, end = starts[row], len(sequences[row])
                    if start >= end:
                        continue
                    yield row, torch.log_softmax(logits[j, start - 1 : end - 1].float(), dim=-1), input_ids[
                        j, start:end
                    ]

    def _finish(
        self, prompt_tokens: int, generated: list[int], params: SamplingParams, adapter: str | None
    ) -> Generation:
        count, reason = len(generated), "length"
        for i, token in enumerate(generated):
            if token in self._eos_ids:
                count, reason = i + 1, "stop"
                break
        else:  # rows that stopped early on a stop string are right-padded
            pad = self._tokenizer.pad_token_id
            while count and generated[count - 1] == pad:
                count -= 1
        content = generated[: count - 1] if reason == "stop" else generated[:count]  # without the EOS
        text = self._tokenizer.decode(content, skip_special_tokens=True)
        text, cut = cut_at_stop(text, params.stop)
        return Generation(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=count,
            finish_reason="stop" if cut else reason,  # type: ignore[arg-type]
            adapter=adapter,
        )

    def _stream(
        self, ids: list[int], params: SamplingParams, adapter: AdapterChoice
    ) -> Generator[str, None, Generation]:
        if self._batcher is not None:
            return (yield from self._stream_batched(ids, params, adapter))
        streamer = TokenQueueStreamer()
        cancel = threading.Event()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                with self._lock:
                    self._check_open()
                    box["adapter"] = name = self._resolve(adapter)
                    [box["ids"]] = self._run_generate([ids], params, [name], streamer=streamer, cancel=cancel)
            except BaseException as exc:  # handed to the consumer
                box["error"] = exc
            finally:
                streamer.tokens.put(None)

        thread = threading.Thread(target=work, name="engine-stream", daemon=True)
        thread.start()
        try:
            deltas = StreamDeltas(params.stop)
            yield from self._deltas(streamer.tokens, deltas, cancel)
            thread.join()
            if "error" in box:
                raise box["error"]
            result = self._finish(len(ids), box["ids"], params, box["adapter"])
            if rest := deltas.rest(result.text):
                yield rest
            return result
        finally:
            cancel.set()
            thread.join()
