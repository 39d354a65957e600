"""Unit tests of the OpenAI-compatible protocol helpers (runtime/engines/openai_protocol.py) and of the server-side
adapter names (runtime/engines/served_adapters.py): pure functions, no server.

The error bodies and messages are in the shapes and wordings vLLM, SGLang and OpenAI use (see
tests/http_standins.py for where each comes from).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.engines import ACTIVE, SamplingParams, UnknownAdapterError
from runtime.engines.http_errors import ServerError
from runtime.engines.openai_protocol import (
    chat_messages,
    context_in,
    error_message,
    first_choice,
    first_int,
    is_context_length_error,
    is_missing_adapter_error,
    normalise_base_url,
    prompt_tokens_in,
    reported_success,
    response_json,
    response_message,
    route_missing,
    sampling_body,
    server_path,
    sse_events,
    stream_error,
    to_generation,
)
from runtime.engines.served_adapters import (
    AdapterTable,
    RequestTarget,
    ServedAdapter,
    check_adapter_name,
    revision_name,
    split_revision,
)

SERVER = {"server_kind": "vLLM", "base_url": "http://gpu:8000"}


# -- error bodies -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # vLLM >= 0.11: ErrorResponse(error=ErrorInfo(...))
        ({"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "code": 404}},
         "The model `x` does not exist."),
        ({"error": "Engine loop has died"}, "Engine loop has died"),
        # SGLang and older vLLM: the flat OpenAI-style ErrorResponse
        ({"object": "error", "message": "LoRA adapter is not loaded", "type": "BadRequest", "code": 400},
         "LoRA adapter is not loaded"),
        # SGLang's adapter routes
        ({"success": False, "error_message": "Failed to load LoRA adapter a because it is already loaded",
          "loaded_adapters": {}}, "Failed to load LoRA adapter a because it is already loaded"),
        # FastAPI
        ({"detail": "Not Found"}, "Not Found"),
        ({"detail": [{"loc": ["body", "model"], "msg": "field required"}]},
         json.dumps([{"loc": ["body", "model"], "msg": "field required"}])),
        # an error object without a message falls through to the flat keys
        ({"error": {"type": "X"}, "message": "flat"}, "flat"),
        ({"error": {"message": "nested"}, "message": "flat"}, "nested"),
        (["not", "a", "dict"], "['not', 'a', 'dict']"),
        ({"unrelated": 1}, "{'unrelated': 1}"),
    ],
)
def test_error_message_reads_each_servers_shape(body: Any, expected: str) -> None:
    assert error_message(body) == expected


def test_error_message_is_at_most_1000_characters() -> None:
    assert len(error_message({"detail": {"long": "x" * 5000}})) == 1000
    assert len(error_message({"other": "y" * 5000})) == 1000


def test_response_message_falls_back_to_text_then_reason() -> None:
    assert response_message(httpx.Response(400, json={"message": "bad"})) == "bad"
    assert response_message(httpx.Response(500, text="  Internal Server Error\n")) == "Internal Server Error"
    assert response_message(httpx.Response(502)) == "Bad Gateway"
    assert len(response_message(httpx.Response(500, text="z" * 3000))) == 1000


@pytest.mark.parametrize(
    ("response", "missing"),
    [
        (httpx.Response(404, json={"detail": "Not Found"}), True),  # FastAPI: no such route
        (httpx.Response(404, text="<html>404</html>"), True),  # a proxy's page
        (httpx.Response(405, json={"detail": "Method Not Allowed"}), True),
        # the route exists and says what it did not find
        (httpx.Response(404, json={"error": {"message": "The lora adapter 'a' cannot be found."}}), False),
        (httpx.Response(400, json={"detail": "Not Found"}), False),
        (httpx.Response(200, text="Success"), False),
    ],
)
def test_route_missing_tells_a_missing_route_from_an_error(response: httpx.Response, missing: bool) -> None:
    assert route_missing(response) is missing


def test_reported_success_reads_sglangs_success_field() -> None:
    assert reported_success(httpx.Response(200, json={"success": False, "error_message": "x"})) is False
    assert reported_success(httpx.Response(200, json={"success": True})) is True
    assert reported_success(httpx.Response(200, json={"success": None})) is True  # only an explicit false
    assert reported_success(httpx.Response(200, text="Success: LoRA adapter 'a' added successfully.")) is True


# -- context-length errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("message", "context", "prompt_tokens"),
    [
        # vLLM (chat), as the stand-in words it
        ("This model's maximum context length is 512 tokens. However, you requested 600 tokens (568 in the "
         "messages, 32 in the completion). Please reduce the length of the messages or completion.", 512, 568),
        # vLLM, newer wordings
        ("This model's maximum context length is 2048 tokens. However, your request has 2100 input tokens. "
         "Please reduce the length of the input messages.", 2048, 2100),
        ("'max_tokens' or 'max_completion_tokens' is too large: 100. This model's maximum context length is 512 "
         "tokens and your request has 450 input tokens (100 > 512 - 450).", 512, 450),
        ("The decoder prompt (length 600) is longer than the maximum model length of 512.", 512, 600),
        # SGLang
        ("Requested token count exceeds the model's maximum context length of 512 tokens. You requested a total "
         "of 600 tokens: 568 tokens from the input messages and 32 tokens for the completion.", 512, 568),
        ("The input (600 tokens) is longer than the model's context length (512 tokens).", 512, 600),
        # only one of the two numbers stated
        ("Prompt length of 600 is longer than the maximum model length of 512.", 512, None),
        ("The request exceeds max_model_len = 4096", 4096, None),
        ("context length exceeded", None, None),
    ],
)
def test_context_and_prompt_tokens_are_read_from_the_message(
    message: str, context: int | None, prompt_tokens: int | None
) -> None:
    assert context_in(message) == context
    assert prompt_tokens_in(message) == prompt_tokens
    assert is_context_length_error(400, message)


def test_a_context_length_error_needs_a_client_error_status_and_the_words() -> None:
    message = "This model's maximum context length is 512 tokens."
    assert is_context_length_error(413, message) and is_context_length_error(422, message)
    assert not is_context_length_error(500, message)  # a server failure, even if it mentions the context
    assert not is_context_length_error(400, "temperature must be non-negative")


def test_first_int_uses_the_first_pattern_that_matches_not_the_first_number() -> None:
    message = "limit 10, used 20"
    assert first_int(message, [r"used (\d+)", r"limit (\d+)"]) == 20
    assert first_int(message, [r"LIMIT (\d+)"]) == 10  # case-insensitive
    assert first_int(message, [r"nothing (\d+)"]) is None


# -- missing adapters -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "message", "server_name", "missing"),
    [
        (404, "The model `a@r1` does not exist.", "a@r1", True),  # vLLM
        (400, "The following requested LoRA adapters are not loaded: a\nLoaded adapters: dict_keys([]).", "a",
         True),  # current SGLang
        (400, "LoRA adapter 'a' is not loaded.", "a", True),
        (500, "LoRA with name a does not exist. Loaded LoRAs: dict_keys([])", "a", True),
        (400, "The following requested LoRA adapters are not loaded: b", "a", False),  # another adapter
        (400, "The model `a` does not exist.", None, False),  # the base model: never an adapter error
        (401, "The model `a` does not exist.", "a", False),
        (400, "adapter a: temperature must be non-negative", "a", False),
        (400, "Unknown parameter 'logit_bias_mode'", "a", False),  # "a" only inside other words
        (400, "The following requested LoRA adapters are not loaded: v1.2\nLoaded adapters: dict_keys([])",
         "v1.2", True),
    ],
)
def test_missing_adapter_errors_name_the_adapter(
    status: int, message: str, server_name: str | None, missing: bool
) -> None:
    assert is_missing_adapter_error(status, message, server_name) is missing


# -- server-sent events -----------------------------------------------------------------------------------
def test_sse_events_yields_the_json_objects_until_done() -> None:
    lines = [
        ": a comment",
        "event: message",
        'data: {"choices": [{"delta": {"content": "Hi"}}]}',
        "",
        "data:{\"n\": 2}",  # no space after the colon
        "data:    ",  # an empty payload
        "data: [1, 2]",  # not an object
        "data: 3",
        "data: [DONE]",
        'data: {"after": "done"}',
    ]
    events = list(sse_events(iter(lines), "/v1/chat/completions", **SERVER))
    assert events == [{"choices": [{"delta": {"content": "Hi"}}]}, {"n": 2}]


def test_sse_events_refuses_a_malformed_chunk() -> None:
    lines = iter(['data: {"ok": 1}', "data: {not json", 'data: {"never": 1}'])
    events = sse_events(lines, "/v1/chat/completions", **SERVER)
    assert next(events) == {"ok": 1}
    with pytest.raises(ServerError, match=r"vLLM server at http://gpu:8000 sent a malformed /v1/chat/completions "
                                          r"stream chunk: '\{not json'"):
        next(events)


def test_sse_events_ends_with_the_stream_even_without_done() -> None:
    assert list(sse_events(iter(['data: {"a": 1}']), "/p", **SERVER)) == [{"a": 1}]


def test_stream_error_recognises_error_events_only() -> None:
    assert stream_error({"error": {"message": "Engine loop has died", "code": 500}}) == "Engine loop has died"
    assert stream_error({"object": "error", "message": "bad request", "code": 400}) == "bad request"
    assert stream_error({"object": "chat.completion.chunk", "choices": []}) is None


# -- requests and answers ---------------------------------------------------------------------------------
def test_sampling_body_sends_stop_and_seed_only_when_set() -> None:
    assert sampling_body(SamplingParams()) == {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0}
    stops = ["###"]
    body = sampling_body(SamplingParams(max_new_tokens=8, temperature=0.5, top_p=0.9, stop=stops, seed=0))
    assert body == {"max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "stop": ["###"], "seed": 0}
    body["stop"].append("x")
    assert stops == ["###"]  # a copy


def test_chat_messages_copies_and_refuses_a_string() -> None:
    conversation = [{"role": "user", "content": "Hi"}]
    messages = chat_messages(conversation)
    assert messages == conversation
    messages[0]["content"] = "changed"
    assert conversation[0]["content"] == "Hi"
    with pytest.raises(TypeError, match="not a string"):
        chat_messages("Hi")


def test_to_generation_cuts_at_stop_strings_and_reads_usage() -> None:
    params = SamplingParams(stop=["###"])
    cut = to_generation("answer### more", "length", {"prompt_tokens": 5, "completion_tokens": 4}, params, "a")
    assert (cut.text, cut.finish_reason, cut.prompt_tokens, cut.completion_tokens, cut.adapter) == (
        "answer", "stop", 5, 4, "a",
    )
    full = to_generation("answer", "length", {"prompt_tokens": 5, "completion_tokens": 9}, params, None)
    assert (full.text, full.finish_reason, full.adapter) == ("answer", "length", None)
    assert to_generation("x", None, None, params, None).finish_reason == "stop"
    assert to_generation("x", "eos", None, params, None).finish_reason == "stop"


def test_to_generation_counts_streamed_chunks_without_usage() -> None:
    result = to_generation("a b c", "stop", {"prompt_tokens": "?"}, SamplingParams(), None, streamed_chunks=3)
    assert result.completion_tokens == 3 and result.prompt_tokens == 0
    assert to_generation("", "stop", {}, SamplingParams(), None).completion_tokens == 0


def test_first_choice_needs_choices() -> None:
    assert first_choice({"choices": [{"text": "a"}, {"text": "b"}]}, "/v1/completions") == {"text": "a"}
    for data in ({"choices": []}, {"choices": ["text"]}, {"object": "x"}, ["choices"]):
        with pytest.raises(ServerError, match="answer to /v1/completions has no choices"):
            first_choice(data, "/v1/completions")


def test_response_json_says_when_an_answer_is_not_json() -> None:
    assert response_json(httpx.Response(200, json={"a": 1}), "/tokenize", **SERVER) == {"a": 1}
    with pytest.raises(ServerError, match=r"vLLM server at http://gpu:8000 answered /tokenize with something that "
                                          r"is not JSON: '<html>'"):
        response_json(httpx.Response(200, text="<html>"), "/tokenize", **SERVER)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://localhost:8000", "http://localhost:8000"),
        (" http://localhost:8000/ ", "http://localhost:8000"),
        ("http://localhost:8000/v1", "http://localhost:8000"),
        ("https://host/prefix/v1/", "https://host/prefix"),
        ("http://host/v10", "http://host/v10"),
    ],
)
def test_normalise_base_url(given: str, expected: str) -> None:
    assert normalise_base_url(given) == expected


@pytest.mark.parametrize("bad", ["localhost:8000", "ftp://host", ""])
def test_normalise_base_url_needs_an_http_url(bad: str) -> None:
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        normalise_base_url(bad)


def test_server_path_is_absolute_only_when_it_exists_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "adapter").mkdir()
    monkeypatch.chdir(tmp_path)
    assert server_path("adapter") == str(tmp_path.resolve() / "adapter")
    assert server_path("/srv/adapters/v1") == "/srv/adapters/v1"  # on the server's machine only
    assert server_path(Path("relative/elsewhere")) == "relative/elsewhere"


# -- server-side adapter names ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", " a", "a ", "base:a", "a@r2", 3])
def test_adapter_names_the_servers_cannot_take_are_refused(name: Any) -> None:
    with pytest.raises(ValueError, match="Invalid adapter name"):
        check_adapter_name(name)


def test_valid_adapter_names_pass() -> None:
    for name in ["a", "v1.2-final", "a@r", "a@rx", "user@example"]:
        check_adapter_name(name)


def test_revision_names_round_trip() -> None:
    assert revision_name("a", 3) == "a@r3"
    assert split_revision("a@r3") == ("a", 3)
    assert split_revision("x@y@r12") == ("x@y", 12)
    assert split_revision("plain") == ("plain", 0)
    assert split_revision("a@r") == ("a@r", 0)


def test_adopting_keeps_the_latest_revision_of_each_name() -> None:
    table = AdapterTable()
    for server_name, path in [("x@r2", "/p2"), ("pre", "/pre"), ("x@r5", "/p5"), ("x@r3", "/p3"), ("x", "/p0")]:
        table.adopt(server_name, path)
    assert table.names() == ["x", "pre"]
    assert table.get("x") == ServedAdapter("/p5", "x@r5", 5)
    assert table.target("x") == RequestTarget("x", "x@r5")


def test_the_table_resolves_choices_against_the_active_adapter() -> None:
    table = AdapterTable()
    table.put("a", ServedAdapter("/a", "a@r1", 1), activate=True)
    table.put("b", ServedAdapter("/b", "b"))
    assert table.target(ACTIVE) == RequestTarget("a", "a@r1")
    assert table.target(None) == RequestTarget(None, None)
    assert table.target("b") == RequestTarget("b", "b")
    with pytest.raises(UnknownAdapterError, match="Unknown adapter 'c'; loaded adapters: 'a', 'b'"):
        table.target("c")
    with pytest.raises(TypeError, match="not int"):
        table.target(1)  # type: ignore[arg-type]
    table.remove("a")
    assert table.active is None and table.target(ACTIVE) == RequestTarget(None, None)
    with pytest.raises(UnknownAdapterError):
        table.set_active("a")
