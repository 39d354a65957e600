"""Continuous batching in the embedded engine (issue 16): concurrent requests share decoding steps, each
with its own adapter, sampling and stop strings; greedy answers equal a request run alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runtime.engines import EngineBusyError, SamplingParams, TransformersEngine
from runtime.store import Store
from server import create_app
from tests.test_server import serve_in_thread, tiny_config

GREEDY = SamplingParams(max_new_tokens=20)
CONVERSATIONS = [[{"role": "user", "content": f"Question {i}: tell me {'more ' * i}about it."}] for i in range(6)]


@pytest.fixture(scope="module")
def batched(tiny_model_dir: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine(tiny_model_dir, device="cpu", num_threads=1, max_batch_size=4, max_queued_requests=8)
    yield engine
    engine.close()


def _concurrently(fn, n: int) -> list:
    out: list = [None] * n
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_greedy_requests_equal_each_request_alone(batched, tiny_engine, tiny_adapter_dir: Path) -> None:
    """Six clients at once, over the base model and an adapter, more clients than the batch holds: each answer
    is the one a request run alone gets (the unbatched engine), token for token."""
    batched.load_adapter("a", tiny_adapter_dir)
    tiny_engine.load_adapter("a", tiny_adapter_dir)
    try:
        adapters = [None, "a", None, "a", "a", None]
        alone = [tiny_engine.chat([c], GREEDY, adapter=a)[0] for c, a in zip(CONVERSATIONS, adapters, strict=True)]
        together = _concurrently(lambda i: batched.chat([CONVERSATIONS[i]], GREEDY, adapter=adapters[i])[0], 6)
        streamed = _concurrently(lambda i: "".join(batched.stream_chat(CONVERSATIONS[i], GREEDY,
                                                                       adapter=adapters[i])), 6)
        one_call = batched.chat(CONVERSATIONS, GREEDY, adapter=adapters)  # a batch in one call, too
    finally:
        batched.unload_adapter("a")
        tiny_engine.unload_adapter("a")
    assert [g.text for g in together] == [g.text for g in alone] == streamed == [g.text for g in one_call]
    assert [g.completion_tokens for g in together] == [g.completion_tokens for g in alone]
    assert [g.finish_reason for g in together] == [g.finish_reason for g in alone]
    assert [g.adapter for g in together] == adapters
    assert alone[0].text != alone[1].text or alone[2].text != alone[3].text  # the adapter changes answers


def test_a_request_joins_a_running_batch_between_tokens(batched, tiny_engine) -> None:
    long = SamplingParams(max_new_tokens=40)
    stream = batched.stream_chat(CONVERSATIONS[0], long)
    first = next(stream)  # the first request is generating
    joined = batched.chat([CONVERSATIONS[1]], GREEDY)[0]  # the second joins and finishes while it runs
    rest = "".join(stream)
    assert first + rest == tiny_engine.chat([CONVERSATIONS[0]], long)[0].text
    assert joined.text == tiny_engine.chat([CONVERSATIONS[1]], GREEDY)[0].text


def test_stop_strings_seeds_and_a_cancelled_row(batched, tiny_engine) -> None:
    full = tiny_engine.chat([CONVERSATIONS[2]], GREEDY)[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full.find(full[i:i + 2]) == i)
    cut = batched.chat([CONVERSATIONS[2]], SamplingParams(max_new_tokens=20, stop=[stop]))[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    assert batched.chat([CONVERSATIONS[3]], sampled)[0].text == batched.chat([CONVERSATIONS[3]], sampled)[0].text
    stream = batched.stream_chat(CONVERSATIONS[4], SamplingParams(max_new_tokens=200))
    next(stream)
    stream.close()  # the client left: its row leaves the batch at the next step
    assert batched.chat([CONVERSATIONS[5]], GREEDY)[0].text == tiny_engine.chat([CONVERSATIONS[5]], GREEDY)[0].text


def test_unloading_an_adapter_waits_for_its_requests(batched, tiny_adapter_dir: Path) -> None:
    batched.load_adapter("b", tiny_adapter_dir)
    stream = batched.stream_chat(CONVERSATIONS[0], SamplingParams(max_new_tokens=30), adapter="b")
    next(stream)
    unloaded = threading.Event()
    unloader = threading.Thread(target=lambda: (batched.unload_adapter("b"), unloaded.set()))
    unloader.start()
    assert not unloaded.is_set()  # the request started on "b" finishes on it
    rest = "".join(stream)
    unloader.join()
    assert unloaded.is_set() and not batched.has_adapter("b")
    assert stream.generation.adapter == "b" and rest is not None


def test_scoring_runs_in_chunks_between_steps_and_holds_its_adapter(batched, tiny_engine,
                                                                     tiny_adapter_dir: Path) -> None:
    """Scores and KL of more rows than the batch holds (so several chunks, the engine let go between them) are
    those of the unbatched engine; an unload waits for a scoring call on the adapter to finish."""
    prompts = [f"Question {i}:" for i in range(6)]
    completions = [" tell me more" * (i + 1) for i in range(6)]
    batched.load_adapter("s", tiny_adapter_dir)
    tiny_engine.load_adapter("s", tiny_adapter_dir)
    try:
        got = batched.score(prompts, completions, adapter="s")
        want = tiny_engine.score(prompts, completions, adapter="s")
        kl_got = batched.kl_divergence(prompts, completions, adapter="s")
        kl_want = tiny_engine.kl_divergence(prompts, completions, adapter="s")
        chunks = batched._scoring_chunks(6, "s")
        rows, (names,) = next(chunks)  # a chunk in progress: the engine is held, the adapter in use
        assert rows == slice(0, 4) and names == ["s"] * 4
        unloaded = threading.Event()
        unloader = threading.Thread(target=lambda: (batched.unload_adapter("s"), unloaded.set()))
        unloader.start()
        rows, (names,) = next(chunks)  # the engine was let go between the chunks, the adapter was not
        assert rows == slice(4, 6) and batched.has_adapter("s") and not unloaded.is_set()
        assert batched._run_score([[5, 6, 7]] * 2, [1, 1], names)  # still servable on "s"
        chunks.close()  # the last chunk done: the unload goes ahead
        unloader.join()
        assert unloaded.is_set()
    finally:
        tiny_engine.unload_adapter("s")
        if batched.has_adapter("s"):
            batched.unload_adapter("s")
    assert [len(r) for r in got] == [len(r) for r in want]
    assert all(abs(a - b) < 1e-4 for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    assert all(abs(a - b) < 1e-5 for a, b in zip(kl_got, kl_want, strict=True)) and max(kl_got) > 0


def test_a_full_queue_is_refused_and_the_server_answers_429(tiny_model_dir: Path, tmp_path: Path) -> None:
    engine = TransformersEngine(tiny_model_dir, device="cpu", num_threads=1, max_batch_size=2, max_queued_requests=1)
    try:
        engine._lock.acquire()  # the engine is busy (a gate evaluation, say): nothing joins a batch
        try:
            waiting = threading.Thread(target=lambda: engine.chat([CONVERSATIONS[0]], GREEDY))
            waiting.start()
            while engine.queue_depth() < 1:  # the first request is queued (a guard loop, not a timing check)
                threading.Event().wait(0.01)
            with pytest.raises(EngineBusyError, match="max_queued_requests"):
                engine.chat([CONVERSATIONS[1]], GREEDY)
            config = tiny_config(tmp_path, tiny_model_dir)
            with Store(config.store_path) as store:
                app = create_app(config, engine=engine, store=store, background_learning=False)
                with serve_in_thread(app) as url:
                    busy = httpx.post(url + "/v1/chat/completions",
                                      json={"messages": [{"role": "user", "content": "hi"}]}, timeout=120)
        finally:
            engine._lock.release()
        waiting.join()
    finally:
        engine.close()
    assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
    assert busy.json()["error"]["code"] == "engine_busy"
