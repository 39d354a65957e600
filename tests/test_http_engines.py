"""Protocol tests of VLLMEngine and SGLangEngine against local stand-in servers (not the real servers).

The stand-ins (tests/http_standins.py) follow vLLM's and SGLang's documented HTTP endpoints and JSON shapes
with a toy model; the engines' real client code runs against them over loopback HTTP. What only a real
server can show (real weights, real tokenizers, the prefix cache itself) is checked by
scripts/vllm_gpu_check.py on a GPU machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.engines import (
    ACTIVE,
    AdapterExistsError,
    AdapterLoadError,
    ContextLengthError,
    EngineError,
    SamplingParams,
    ServerConnectionError,
    ServerContextLengthError,
    ServerError,
    ServerTimeoutError,
    SGLangEngine,
    UnknownAdapterError,
    UnsupportedOperationError,
    VLLMEngine,
)
from runtime.engines.openai_http import OpenAIHTTPEngine
from tests.http_standins import BASE_MODEL, Standin, free_port, run_standin

CHAT_PATH = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]
ENGINES: dict[str, type[OpenAIHTTPEngine]] = {"vllm": VLLMEngine, "sglang": SGLangEngine}


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["vllm", "sglang"])
def running(request: pytest.FixtureRequest) -> Iterator[Standin]:
    with run_standin(request.param) as standin:
        yield standin


@pytest.fixture()
def server(running: Standin) -> Standin:
    running.state.reset()
    return running


@pytest.fixture()
def engine(server: Standin) -> Iterator[OpenAIHTTPEngine]:
    engine = ENGINES[server.state.kind](server.url, timeout=10)
    yield engine
    engine.close()


@pytest.fixture()
def vllm(running: Standin) -> Standin:
    if running.state.kind != "vllm":
        pytest.skip("vLLM-only behaviour")
    running.state.reset()
    return running


@pytest.fixture()
def sglang(running: Standin) -> Standin:
    if running.state.kind != "sglang":
        pytest.skip("SGLang-only behaviour")
    running.state.reset()
    return running


def _adapter_dir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return path


@pytest.fixture()
def v1(tmp_path: Path) -> Path:
    return _adapter_dir(tmp_path, "v1")


@pytest.fixture()
def v2(tmp_path: Path) -> Path:
    return _adapter_dir(tmp_path, "v2")


def _model_field(kind: str, server_name: str | None) -> str:
    if server_name is None:
        return BASE_MODEL
    return server_name if kind == "vllm" else f"{BASE_MODEL}:{server_name}"


# -- discovery and requests -------------------------------------------------------------------------------
def test_discovers_the_served_model_and_context(engine: OpenAIHTTPEngine, server: Standin) -> None:
    assert engine.model_name == BASE_MODEL
    assert engine.context_length == server.state.max_model_len
    assert engine.list_adapters() == [] and engine.active_adapter is None


def test_a_trailing_v1_in_base_url_is_accepted(server: Standin) -> None:
    with ENGINES[server.state.kind](server.url + "/v1/") as engine:
        assert engine.base_url == server.url
        assert engine.chat([HI])[0].text == "base says: Hi"


def test_a_model_the_server_does_not_serve_is_refused(server: Standin) -> None:
    with pytest.raises(EngineError, match=f"does not serve 'other'; it serves '{BASE_MODEL}'"):
        ENGINES[server.state.kind](server.url, model="other")


def test_chat_answers_each_conversation(engine: OpenAIHTTPEngine, server: Standin) -> None:
    answers = engine.chat([HI, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Yo"}]])
    assert [a.text for a in answers] == ["base says: Hi", "base says: Yo"]
    first = answers[0]
    assert first.adapter is None and first.finish_reason == "stop"
    assert first.completion_tokens == 3 and first.prompt_tokens > 0
    bodies = server.state.bodies(CHAT_PATH)
    assert {b["model"] for b in bodies} == {BASE_MODEL}
    assert sorted(b["messages"][-1]["content"] for b in bodies) == ["Hi", "Yo"]


def test_sampling_params_are_passed_through(engine: OpenAIHTTPEngine, server: Standin) -> None:
    params = SamplingParams(max_new_tokens=2, temperature=0.7, top_p=0.9, stop=["###"], seed=5)
    [answer] = engine.chat([HI], params)
    [body] = server.state.bodies(CHAT_PATH)
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["stop"], body["seed"]) == (
        2, 0.7, 0.9, ["###"], 5,
    )
    assert answer.text == "base says:" and answer.finish_reason == "length" and answer.completion_tokens == 2


def test_greedy_request_sends_temperature_zero_and_no_seed(engine: OpenAIHTTPEngine, server: Standin) -> None:
    engine.chat([HI])
    [body] = server.state.bodies(CHAT_PATH)
    assert body["temperature"] == 0.0 and "seed" not in body and "stop" not in body
    assert body["max_tokens"] == SamplingParams().max_new_tokens


def test_stop_strings_end_the_answer(engine: OpenAIHTTPEngine) -> None:
    [answer] = engine.chat([HI], SamplingParams(stop=[" says"]))
    assert answer.text == "base" and answer.finish_reason == "stop"


def test_stop_strings_are_cut_even_when_the_server_does_not(engine: OpenAIHTTPEngine, server: Standin) -> None:
    server.state.honour_stop = False
    [answer] = engine.chat([HI], SamplingParams(stop=[" says"]))
    assert answer.text == "base" and answer.finish_reason == "stop"


def test_generate_uses_the_completions_endpoint(engine: OpenAIHTTPEngine, server: Standin) -> None:
    [answer] = engine.generate(["Once upon"], SamplingParams(max_new_tokens=8))
    assert answer.text == "base says: Once upon" and answer.adapter is None
    [body] = server.state.bodies("/v1/completions")
    assert body["prompt"] == "Once upon" and body["model"] == BASE_MODEL and body["max_tokens"] == 8
    with pytest.raises(TypeError):
        engine.generate("one string")  # type: ignore[arg-type]


def test_empty_batches_send_nothing(engine: OpenAIHTTPEngine, server: Standin) -> None:
    assert engine.chat([]) == [] and engine.generate([]) == [] and engine.score([], []) == []
    assert server.state.requests == []


# -- streaming --------------------------------------------------------------------------------------------
def test_stream_chat_yields_deltas_and_the_final_generation(engine: OpenAIHTTPEngine, server: Standin) -> None:
    stream = engine.stream_chat(HI, SamplingParams(max_new_tokens=10, temperature=0.5))
    deltas = list(stream)
    assert len(deltas) >= 2 and "".join(deltas) == "base says: Hi"
    result = stream.generation
    assert result.text == "base says: Hi" and result.finish_reason == "stop" and result.adapter is None
    assert result.completion_tokens == 3 and result.prompt_tokens > 0  # from the final usage chunk
    [body] = server.state.bodies(CHAT_PATH)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.5 and body["max_tokens"] == 10


def test_stream_reports_length(engine: OpenAIHTTPEngine) -> None:
    stream = engine.stream_chat(HI, SamplingParams(max_new_tokens=2))
    assert "".join(stream) == "base says:" and stream.generation.finish_reason == "length"


def test_stream_never_emits_a_stop_string(engine: OpenAIHTTPEngine, server: Standin) -> None:
    server.state.honour_stop = False  # the client must hold back text that could start a stop string
    stream = engine.stream_chat(HI, SamplingParams(stop=[" says:"]))
    deltas = list(stream)
    assert "".join(deltas) == "base" and not any("says" in d for d in deltas)
    assert stream.generation.text == "base" and stream.generation.finish_reason == "stop"


def test_closing_a_stream_early_leaves_the_engine_usable(engine: OpenAIHTTPEngine) -> None:
    with engine.stream_chat(HI) as stream:
        assert next(stream)
    assert not stream.done
    assert engine.chat([HI])[0].text == "base says: Hi"


def test_an_error_event_in_the_stream_raises(engine: OpenAIHTTPEngine, server: Standin) -> None:
    server.state.stream_error_after = 1
    stream = engine.stream_chat(HI)
    with pytest.raises(ServerError, match="failed while streaming: Engine loop has died"):
        list(stream)


def test_stream_resolves_active_when_it_starts(engine: OpenAIHTTPEngine, server: Standin, v1: Path) -> None:
    engine.load_adapter("a", v1)
    stream = engine.stream_chat(HI)  # ACTIVE: not resolved yet
    engine.set_active_adapter("a")
    assert "".join(stream) == "lora[v1] says: Hi" and stream.generation.adapter == "a"
    with pytest.raises(UnknownAdapterError):
        engine.stream_chat(HI, adapter="nope")  # an explicit unknown name fails at once


# -- adapters ---------------------------------------------------------------------------------------------
def test_adapter_is_chosen_by_the_model_field(engine: OpenAIHTTPEngine, server: Standin, v1: Path) -> None:
    kind = server.state.kind
    engine.load_adapter("a", v1)
    assert server.state.events == [f"load a {v1}"]
    assert engine.list_adapters() == ["a"] and engine.has_adapter("a") and engine.adapter_path("a") == str(v1)
    answers = engine.chat([HI, HI], adapter=[None, "a"])
    assert [(x.text, x.adapter) for x in answers] == [("base says: Hi", None), ("lora[v1] says: Hi", "a")]
    assert sorted(b["model"] for b in server.state.bodies(CHAT_PATH)) == sorted(
        [_model_field(kind, None), _model_field(kind, "a")]
    )
    [completion] = engine.generate(["Go"], adapter="a")
    assert completion.adapter == "a" and completion.text.startswith("lora[v1]")
    assert server.state.bodies("/v1/completions")[0]["model"] == _model_field(kind, "a")


def test_active_adapter_serves_requests_that_pass_active(engine: OpenAIHTTPEngine, v1: Path) -> None:
    engine.load_adapter("a", v1, activate=True)
    assert engine.active_adapter == "a"
    assert engine.chat([HI])[0].adapter == "a"
    assert engine.chat([HI], adapter=ACTIVE)[0].adapter == "a"
    assert engine.chat([HI], adapter=None)[0].adapter is None
    engine.set_active_adapter(None)
    assert engine.chat([HI])[0].adapter is None
    with pytest.raises(UnknownAdapterError, match="Unknown adapter 'nope'; loaded adapters: 'a'"):
        engine.set_active_adapter("nope")


def test_an_unknown_adapter_fails_before_any_request(engine: OpenAIHTTPEngine, server: Standin) -> None:
    with pytest.raises(UnknownAdapterError, match="Unknown adapter 'nope'"):
        engine.chat([HI], adapter="nope")
    with pytest.raises(ValueError, match="2 adapter choices for 1 rows"):
        engine.chat([HI], adapter=[None, None])
    assert server.state.requests == []


def test_unload_removes_it_from_the_server(engine: OpenAIHTTPEngine, server: Standin, v1: Path) -> None:
    engine.load_adapter("a", v1, activate=True)
    engine.unload_adapter("a")
    assert server.state.events == [f"load a {v1}", "unload a"] and server.state.adapters == {}
    assert engine.list_adapters() == [] and engine.active_adapter is None
    with pytest.raises(UnknownAdapterError):
        engine.unload_adapter("a")


def test_loading_a_loaded_name_needs_replace(engine: OpenAIHTTPEngine, server: Standin, v1: Path) -> None:
    engine.load_adapter("a", v1)
    with pytest.raises(AdapterExistsError, match="pass replace=True"):
        engine.load_adapter("a", v1)
    assert server.state.events == [f"load a {v1}"]


@pytest.mark.parametrize("name", ["", "base:a", " a", "a@r2"])
def test_invalid_adapter_names_are_refused(engine: OpenAIHTTPEngine, v1: Path, name: str) -> None:
    with pytest.raises(ValueError, match="Invalid adapter name"):
        engine.load_adapter(name, v1)


def test_vllm_replace_reloads_in_place_and_resets_the_prefix_cache(vllm: Standin, v1: Path, v2: Path) -> None:
    with VLLMEngine(vllm.url) as engine:
        engine.load_adapter("a", v1, activate=True)
        engine.load_adapter("a", v2, replace=True)
        # the reset route is probed once before the first in-place reload, then reset after it
        assert vllm.state.events == [
            f"load a {v1}", "reset_prefix_cache running", f"load a {v2}", "reset_prefix_cache running",
        ]
        assert vllm.state.bodies("/v1/load_lora_adapter")[-1] == {
            "lora_name": "a", "lora_path": str(v2), "load_inplace": True,
        }
        assert engine.list_adapters() == ["a"] and engine.active_adapter == "a"
        assert engine.adapter_path("a") == str(v2)
        assert engine.chat([HI])[0].text == "lora[v2] says: Hi"
        engine.load_adapter("a", v1, replace=True)
        assert vllm.state.events[-2:] == [f"load a {v1}", "reset_prefix_cache running"]  # no second probe


@pytest.mark.parametrize("setting", ["dev_mode", "load_inplace"])
def test_vllm_replace_swaps_names_when_it_cannot_reload_in_place(
    vllm: Standin, v1: Path, v2: Path, setting: str
) -> None:
    setattr(vllm.state, setting, False)  # no /reset_prefix_cache, or a vLLM without load_inplace
    with VLLMEngine(vllm.url) as engine:
        engine.load_adapter("a", v1)
        engine.load_adapter("a", v2, replace=True)
        assert [e for e in vllm.state.events if not e.startswith("reset")] == [
            f"load a {v1}", f"load a@r1 {v2}", "unload a",
        ]
        assert vllm.state.adapters == {"a@r1": str(v2)}
        assert engine.list_adapters() == ["a"]
        [answer] = engine.chat([HI], adapter="a")
        assert answer.adapter == "a" and answer.text == "lora[v2] says: Hi"
        assert vllm.state.bodies(CHAT_PATH)[-1]["model"] == "a@r1"
        engine.unload_adapter("a")
        assert vllm.state.adapters == {}


def test_sglang_replace_loads_under_a_new_name_then_unloads_the_old(sglang: Standin, v1: Path, v2: Path) -> None:
    with SGLangEngine(sglang.url) as engine:
        engine.load_adapter("a", v1)
        engine.load_adapter("a", v2, replace=True)
        assert sglang.state.events == [f"load a {v1}", f"load a@r1 {v2}", "unload a"]
        [answer] = engine.chat([HI], adapter="a")
        assert answer.adapter == "a" and "lora[v2]" in answer.text
        assert sglang.state.bodies(CHAT_PATH)[-1]["model"] == f"{BASE_MODEL}:a@r1"
        engine.load_adapter("a", v1, replace=True)
        assert sglang.state.events[-2:] == [f"load a@r2 {v1}", "unload a@r1"]


def test_a_failed_load_changes_nothing(engine: OpenAIHTTPEngine, server: Standin, v1: Path, tmp_path: Path) -> None:
    engine.load_adapter("a", v1, activate=True)
    missing = tmp_path / "missing"
    with pytest.raises(AdapterLoadError, match="could not load adapter 'a'") as failure:
        engine.load_adapter("a", missing, replace=True)
    assert "unchanged" in str(failure.value) and str(missing) in str(failure.value)
    with pytest.raises(AdapterLoadError):
        engine.load_adapter("b", missing)
    assert engine.list_adapters() == ["a"] and engine.active_adapter == "a" and engine.adapter_path("a") == str(v1)
    assert server.state.adapters == {"a": str(v1)}
    assert engine.chat([HI])[0].text == "lora[v1] says: Hi"


def test_a_server_without_runtime_lora_says_how_to_enable_it(
    engine: OpenAIHTTPEngine, server: Standin, v1: Path
) -> None:
    server.state.runtime_lora = False
    expected = "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" if server.state.kind == "vllm" else "--enable-lora"
    with pytest.raises(AdapterLoadError, match="does not offer runtime LoRA loading") as failure:
        engine.load_adapter("a", v1)
    assert expected in str(failure.value)
    assert engine.list_adapters() == []


def test_a_name_the_server_already_has_is_taken_over(server: Standin, v1: Path, v2: Path) -> None:
    server.state.adapters["a"] = str(v1)  # loaded by an earlier process
    with ENGINES[server.state.kind](server.url) as engine:
        assert engine.list_adapters() == ["a"]  # adopted from GET /v1/models
        engine.unload_adapter("a")
        server.state.adapters["a"] = str(v1)  # loaded again behind the engine's back
        engine.load_adapter("a", v2)
        assert engine.list_adapters() == ["a"]
        assert "lora[v2]" in engine.chat([HI], adapter="a")[0].text


def test_an_older_sglang_that_lists_no_adapters_has_a_loaded_name_taken_over(
    sglang: Standin, v1: Path, v2: Path
) -> None:
    sglang.state.lists_adapters = False
    sglang.state.adapters["a"] = str(v1)
    with SGLangEngine(sglang.url) as engine:
        assert engine.list_adapters() == []
        engine.load_adapter("a", v2)  # SGLang answers "already loaded": loaded under a new name instead
        assert sglang.state.events == [f"load a@r1 {v2}", "unload a"]
        assert engine.list_adapters() == ["a"]
        assert engine.chat([HI], adapter="a")[0].text == "lora[v2] says: Hi"
        assert sglang.state.bodies(CHAT_PATH)[-1]["model"] == f"{BASE_MODEL}:a@r1"


def test_sglang_adopts_the_adapters_it_lists_with_a_parent(sglang: Standin, v1: Path, v2: Path) -> None:
    sglang.state.adapters["pre"] = str(v1)  # e.g. from --lora-paths, or loaded by an earlier runtime
    with SGLangEngine(sglang.url) as engine:
        assert engine.list_adapters() == ["pre"] and engine.adapter_path("pre") == str(v1)
        [answer] = engine.chat([HI], adapter="pre")
        assert answer.adapter == "pre" and answer.text == "lora[v1] says: Hi"
        assert sglang.state.bodies(CHAT_PATH)[-1]["model"] == f"{BASE_MODEL}:pre"
        with pytest.raises(AdapterExistsError):
            engine.load_adapter("pre", v2)
        engine.load_adapter("pre", v2, replace=True)
        assert sglang.state.events == [f"load pre@r1 {v2}", "unload pre"]
        assert sglang.state.adapters == {"pre@r1": str(v2)}
        assert engine.score(["Hello"], [" world"], adapter="pre") == [pytest.approx([-1.0])]  # under the adapter
        assert sglang.state.bodies("/generate")[-1]["lora_path"] == "pre@r1"


def test_listed_adapters_are_adopted_with_their_latest_revision(server: Standin, v1: Path, v2: Path) -> None:
    kind = server.state.kind
    server.state.adapters.update({"pre": str(v1), "x@r2": str(v2)})
    with ENGINES[kind](server.url) as engine:
        assert engine.list_adapters() == ["pre", "x"] and engine.adapter_path("x") == str(v2)
        assert engine.chat([HI], adapter="x")[0].adapter == "x"
        assert server.state.bodies(CHAT_PATH)[-1]["model"] == _model_field(kind, "x@r2")


# -- scoring and tokens -----------------------------------------------------------------------------------
def test_score_returns_the_completion_tokens_log_probs(engine: OpenAIHTTPEngine, v1: Path) -> None:
    engine.load_adapter("a", v1)
    # "Hello wor" + "ld there" -> "Hello world there": " world" spans the boundary, so it is scored
    base, tuned = engine.score(["Hello wor", "Hello wor"], ["ld there", "ld there"], adapter=[None, "a"])
    assert base == pytest.approx([-0.5, -0.5])
    assert tuned == pytest.approx([-1.0, -1.0])
    assert engine.score([""], ["Hi there"]) == [pytest.approx([-0.2, -0.5])]  # the BOS gives the context
    assert engine.score(["Hello"], [""]) == [[]]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        engine.score(["a", "b"], ["c"])


def test_score_uses_each_servers_prompt_logprob_request(engine: OpenAIHTTPEngine, server: Standin) -> None:
    engine.score(["Hello"], [" world"])
    if server.state.kind == "vllm":
        [body] = server.state.bodies("/v1/completions")
        assert body["echo"] is True and body["logprobs"] == 1 and isinstance(body["prompt"], list)
    else:
        [body] = server.state.bodies("/generate")
        assert body["return_logprob"] is True and body["logprob_start_len"] == 0
        assert isinstance(body["input_ids"], list) and body["lora_path"] is None


def test_count_tokens_uses_the_servers_tokenizer(engine: OpenAIHTTPEngine, server: Standin) -> None:
    assert engine.count_tokens("one two three") == 3
    assert server.state.bodies("/tokenize")[-1] == {
        "model": BASE_MODEL, "prompt": "one two three", "add_special_tokens": False,
    }


def test_without_tokenize_counting_and_scoring_say_what_to_use(engine: OpenAIHTTPEngine, server: Standin) -> None:
    server.state.tokenize_route = False
    with pytest.raises(UnsupportedOperationError, match="TransformersEngine") as failure:
        engine.count_tokens("x")
    assert isinstance(failure.value, NotImplementedError)
    with pytest.raises(UnsupportedOperationError):
        engine.score(["a"], [" b"])


# -- errors -----------------------------------------------------------------------------------------------
def test_connection_refused_names_the_url_and_how_to_start_the_server(server: Standin) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    start = "vllm serve" if server.state.kind == "vllm" else "sglang.launch_server"
    with pytest.raises(ServerConnectionError, match="Cannot reach the") as failure:
        ENGINES[server.state.kind](url, connect_timeout=2)
    assert url in str(failure.value) and start in str(failure.value)


def test_a_request_that_does_not_fit_the_context_is_a_context_length_error(engine: OpenAIHTTPEngine) -> None:
    long = [{"role": "user", "content": "word " * 500}]
    with pytest.raises(ContextLengthError) as failure:
        engine.chat([long], SamplingParams(max_new_tokens=32))
    error = failure.value
    assert isinstance(error, ServerContextLengthError)
    assert error.context == 512 and error.max_new_tokens == 32 and error.prompt_tokens is not None
    assert "lower max_new_tokens" in str(error) and "maximum context length" in str(error)
    with pytest.raises(ContextLengthError):
        list(engine.stream_chat(long, SamplingParams(max_new_tokens=32)))


def test_server_errors_carry_the_status_and_the_servers_message(engine: OpenAIHTTPEngine, server: Standin) -> None:
    server.state.fail_status = 500
    with pytest.raises(ServerError, match="HTTP 500: CUDA error: an illegal memory access") as failure:
        engine.chat([HI])
    assert failure.value.status_code == 500 and "server's log" in str(failure.value)
    with pytest.raises(ServerError, match="HTTP 500"):
        list(engine.stream_chat(HI))


def test_timeouts_say_which_request_and_what_to_do(server: Standin) -> None:
    with ENGINES[server.state.kind](server.url, timeout=0.3) as engine:
        server.state.delay_s = 2.0
        with pytest.raises(ServerTimeoutError, match=r"did not answer POST /v1/chat/completions within 0.3s"):
            engine.chat([HI])
        with pytest.raises(ServerTimeoutError):
            list(engine.stream_chat(HI))


def test_an_adapter_the_server_lost_is_an_unknown_adapter(engine: OpenAIHTTPEngine, server: Standin, v1: Path) -> None:
    engine.load_adapter("a", v1)
    server.state.adapters.clear()  # e.g. the server was restarted
    with pytest.raises(UnknownAdapterError, match="does not have adapter 'a'") as failure:
        engine.chat([HI], adapter="a")
    assert "replace=True" in str(failure.value)
    with pytest.raises(UnknownAdapterError, match="does not have adapter 'a'"):
        engine.score(["Hello"], [" world"], adapter="a")  # SGLang: /generate, with its own error shape


def test_a_closed_engine_refuses_requests(server: Standin) -> None:
    engine = ENGINES[server.state.kind](server.url)
    engine.close()
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.chat([HI])
    assert engine.list_adapters() == []


# -- configuration ----------------------------------------------------------------------------------------
def test_create_engine_builds_the_http_engines(server: Standin) -> None:
    from runtime.config import ConfigError, RuntimeConfig
    from runtime.factory import create_engine

    kind = server.state.kind
    with pytest.raises(ConfigError, match=f"engine.kind: {kind} needs engine.base_url"):
        create_engine(RuntimeConfig.model_validate({"engine": {"kind": kind}}))
    engine = create_engine(RuntimeConfig.model_validate({"engine": {"kind": kind, "base_url": server.url}}))
    try:
        assert isinstance(engine, ENGINES[kind]) and engine.model_name == BASE_MODEL
    finally:
        engine.close()


# -- the GPU check script ---------------------------------------------------------------------------------
def test_the_gpu_check_flow_runs_against_the_standin(server: Standin, v1: Path, v2: Path) -> None:
    """Keeps scripts/vllm_gpu_check.py working; passing here says nothing about a real server."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "vllm_gpu_check.py"
    spec = importlib.util.spec_from_file_location("vllm_gpu_check", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with ENGINES[server.state.kind](server.url) as engine:
        checks = module.run(engine, v1, v2, "gpu-check")
    assert [r["check"] for r in checks.results if not r["ok"]] == []
    assert len(checks.results) == 9
