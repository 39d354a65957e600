"""Protocol stand-ins for the vLLM and SGLang servers: NOT the real servers, and no model runs in them.

Each is a small FastAPI app, served by uvicorn on a free loopback port in a background thread, that
follows the HTTP protocol the real server documents, so that the real client code of ``VLLMEngine`` and
``SGLangEngine`` can be tested quickly without a GPU or a network:

- ``GET /v1/models``: the base model, then the loaded adapters as cards whose ``parent`` is the base model's
  id and whose ``root`` is the adapter's path (vLLM; SGLang since it lists adapters, with ``max_model_len``
  null); ``StandinState.lists_adapters`` off imitates an older SGLang that lists only the base model;
- ``POST /v1/chat/completions`` and ``/v1/completions``, non-streaming and streaming as server-sent events
  (``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``, a final usage chunk when ``stream_options.include_usage``);
  ``max_tokens``, ``stop`` (cut before the stop string, finish_reason ``stop``) and the other sampling
  fields are honoured or recorded; adapters are chosen by ``model`` (vLLM: the adapter's name; SGLang:
  ``"<base>:<adapter>"``);
- ``POST /tokenize`` (``{"model", "prompt", "add_special_tokens"}`` -> ``{"count", "max_model_len",
  "tokens"}``);
- prompt log-probs: vLLM ``/v1/completions`` with ``echo`` + ``logprobs``; SGLang ``/generate`` with
  ``return_logprob`` + ``logprob_start_len`` (``meta_info.input_token_logprobs`` triples);
- runtime LoRA: vLLM ``/v1/load_lora_adapter`` (``load_inplace``), ``/v1/unload_lora_adapter`` and
  ``/reset_prefix_cache``, each absent (FastAPI's ``{"detail": "Not Found"}``) unless the matching server
  setting is on; SGLang ``/load_lora_adapter`` and ``/unload_lora_adapter`` answering SGLang's
  ``LoRAUpdateOutput`` ``{"success", "error_message", "loaded_adapters"}`` (400 when ``success`` is false),
  where ``loaded_adapters`` maps each loaded name to its path, as SGLang's
  ``LoRAManager.create_lora_update_result`` builds it (the engines do not read it);
- errors in each server's shape: vLLM ``{"error": {"message", "type", "param", "code"}}``, SGLang's flat
  ``{"object": "error", "message", "type", "param", "code"}`` on its OpenAI routes and ``{"error": {"message"}}``
  on ``/generate``; 404 for an unknown vLLM model, 400 for a request longer than the context (with each
  server's wording), 400/404 for a bad adapter path; SGLang's wording for an adapter that is not loaded
  ("The following requested LoRA adapters are not loaded: ..."), for loading a loaded name ("... because
  it is already loaded") and for unloading an unknown one ("LoRA with name ... does not exist"), from its
  ``LoRARegistry`` and ``LoRAManager``.

The toy "model": text is split into tokens at whitespace (``"\\s*\\S+"``), token ids come from a growing
vocabulary (``<s>`` = 1 is the BOS that ``add_special_tokens`` prepends), a chat answer is
``"<tag> says: <last user message>"`` where the tag is ``base`` or ``lora[<directory the adapter's weights
came from>]`` (so a reload is visible), and a token's log-prob is ``-len(token)/10``, minus 0.5 under
an adapter. What the real servers do and these do not: real tokenizers and chat templates, batching,
LoRA weights, exact error wording beyond the phrases the engines key on (those are copied from the
servers' sources and documentation where known, otherwise marked as assumptions below).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

Kind = Literal["vllm", "sglang"]
BASE_MODEL = "standin/base-model"
BOS = "<s>"


@dataclass
class StandinState:
    """What a stand-in server holds and records; tests read and flip these between requests."""

    kind: Kind
    max_model_len: int = 512
    runtime_lora: bool = True
    """vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING (the LoRA routes exist); SGLang: dynamic LoRA available."""
    lists_adapters: bool = True
    """``GET /v1/models`` lists the loaded adapters (off: an SGLang from before it did)."""
    dev_mode: bool = True
    """vLLM: VLLM_SERVER_DEV_MODE (``/reset_prefix_cache`` exists)."""
    load_inplace: bool = True
    """vLLM: the version understands ``load_inplace`` (older ones refuse to load a loaded name)."""
    fail_status: int | None = None
    """Answer generation requests with this HTTP status (e.g. 500) instead of generating."""
    delay_s: float = 0.0
    """Wait this long before answering generation requests."""
    honour_stop: bool = True
    """Cut answers at stop strings (off: leave it to the client, to test its own cut)."""
    tokenize_route: bool = True
    """``/tokenize`` exists."""
    stream_error_after: int | None = None
    """Streams send an error event after this many content chunks (as vLLM does when generation fails)."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Loaded adapters: server name -> path."""
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """Every POST as (path, JSON body)."""
    events: list[str] = field(default_factory=list)
    """Adapter and cache operations, in order: ``load <name> <path>``, ``unload <name>``, ``reset_prefix_cache``."""
    vocab: dict[str, int] = field(default_factory=lambda: {BOS: 1})

    def reset(self) -> None:
        fresh = StandinState(self.kind)
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))

    def bodies(self, path: str) -> list[dict[str, Any]]:
        """The JSON bodies of the POSTs to ``path``."""
        return [body for p, body in self.requests if p == path]

    # -- the toy model ------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        ids = [1] if add_special_tokens else []
        for piece in re.findall(r"\s*\S+", text):
            ids.append(self.vocab.setdefault(piece, len(self.vocab) + 1))
        return ids

    def detokenize(self, ids: list[int]) -> list[str]:
        inverse = {i: piece for piece, i in self.vocab.items()}
        return [inverse[i] for i in ids]

    def logprob(self, piece: str, adapter: str | None) -> float:
        return -len(piece.strip()) / 10 - (0.5 if adapter else 0.0)

    def answer(self, adapter: str | None, prompt: str) -> str:
        tag = "base" if adapter is None else f"lora[{Path(self.adapters[adapter]).name}]"
        return f"{tag} says: {prompt}".strip()


@dataclass
class Standin:
    """A running stand-in server."""

    url: str
    state: StandinState


def _error(kind: Kind, status: int, message: str, err_type: str = "BadRequestError") -> JSONResponse:
    if kind == "vllm":  # vLLM >= 0.11: ErrorResponse(error=ErrorInfo(...))
        body: dict[str, Any] = {"error": {"message": message, "type": err_type, "param": None, "code": status}}
    else:  # SGLang: the flat OpenAI-style ErrorResponse
        body = {"object": "error", "message": message, "type": err_type, "param": None, "code": status}
    return JSONResponse(body, status_code=status)


def _no_route() -> JSONResponse:
    return JSONResponse({"detail": "Not Found"}, status_code=404)


def _render(messages: list[dict[str, str]]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def create_app(state: StandinState) -> FastAPI:
    """The stand-in app for ``state.kind``."""
    app = FastAPI()
    kind = state.kind

    def adapter_of(model: str) -> str | None | JSONResponse:
        """The adapter a request's ``model`` names, or the error response the server gives."""
        if kind == "vllm":
            if model == BASE_MODEL:
                return None
            if model in state.adapters:
                return model
            return _error(kind, 404, f"The model `{model}` does not exist.", "NotFoundError")
        base, _, adapter = model.partition(":")
        if base != BASE_MODEL:
            return _error(kind, 400, f"Model {base!r} is not served.")  # assumption: SGLang's wording
        if not adapter:
            return None
        if adapter not in state.adapters:
            return _error(kind, 400, _sglang_not_loaded(adapter, state))
        return adapter

    def too_long(prompt_tokens: int, max_tokens: int) -> JSONResponse | None:
        if prompt_tokens + max_tokens <= state.max_model_len:
            return None
        if kind == "vllm":
            message = (
                f"This model's maximum context length is {state.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion."
            )
        else:
            message = (
                f"Requested token count exceeds the model's maximum context length of {state.max_model_len} "
                f"tokens. You requested a total of {prompt_tokens + max_tokens} tokens: {prompt_tokens} tokens "
                f"from the input messages and {max_tokens} tokens for the completion. Please reduce the number "
                f"of tokens in the input messages or the completion to fit within the limit."
            )
        return _error(kind, 400, message)

    def generate(adapter: str | None, prompt_text: str, reply_to: str, body: dict[str, Any]) -> Any:
        """(pieces, finish_reason, prompt_tokens) or an error response."""
        max_tokens = int(body.get("max_tokens") or 16)
        prompt_tokens = len(state.tokenize(prompt_text, add_special_tokens=True))
        if (error := too_long(prompt_tokens, max_tokens)) is not None:
            return error
        pieces = re.findall(r"\s*\S+", state.answer(adapter, reply_to))
        finish = "stop"
        if len(pieces) > max_tokens:
            pieces, finish = pieces[:max_tokens], "length"
        text = "".join(pieces)
        stops = (body.get("stop") or []) if state.honour_stop else []
        cuts = [i for i in (text.find(s) for s in ([stops] if isinstance(stops, str) else stops)) if i >= 0]
        if cuts:
            text, finish = text[: min(cuts)], "stop"
            pieces = re.findall(r"\s*\S+|\s+$", text)
        return pieces, finish, prompt_tokens

    async def common(request: Request, path: str) -> Any:
        body = await request.json()
        state.requests.append((path, body))
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        if state.fail_status is not None:
            return body, _error(kind, state.fail_status, "CUDA error: an illegal memory access was encountered",
                                "InternalServerError")
        return body, None

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [{"id": BASE_MODEL, "object": "model", "root": BASE_MODEL, "parent": None,
                  "max_model_len": state.max_model_len, "owned_by": kind}]
        if state.lists_adapters:
            extra = {"owned_by": "vllm"} if kind == "vllm" else {"max_model_len": None, "owned_by": "sglang"}
            cards += [{"id": name, "object": "model", "root": path, "parent": BASE_MODEL, **extra}
                      for name, path in state.adapters.items()]
        return {"object": "list", "data": cards}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Any:
        if not state.tokenize_route:
            return _no_route()
        body = await request.json()
        state.requests.append(("/tokenize", body))
        tokens = state.tokenize(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
        return {"count": len(tokens), "max_model_len": state.max_model_len, "tokens": tokens}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body, failure = await common(request, "/v1/chat/completions")
        if failure is not None:
            return failure
        adapter = adapter_of(body["model"])
        if isinstance(adapter, JSONResponse):
            return adapter
        user = [m["content"] for m in body["messages"] if m["role"] == "user"]
        result = generate(adapter, _render(body["messages"]), user[-1] if user else "", body)
        if isinstance(result, JSONResponse):
            return result
        pieces, finish, prompt_tokens = result
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
                 "total_tokens": prompt_tokens + len(pieces)}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _chat_chunks(body["model"], pieces, finish, usage if include_usage else None, state),
                media_type="text/event-stream",
            )
        return {
            "id": "chatcmpl-standin", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "finish_reason": finish}],
            "usage": usage,
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body, failure = await common(request, "/v1/completions")
        if failure is not None:
            return failure
        adapter = adapter_of(body["model"])
        if isinstance(adapter, JSONResponse):
            return adapter
        prompt = body["prompt"]
        if isinstance(prompt, list):  # token ids
            if (error := too_long(len(prompt), int(body.get("max_tokens") or 16))) is not None:
                return error
            pieces_in = state.detokenize(prompt)
            text_in = "".join(p for p in pieces_in if p != BOS)
        else:
            pieces_in, text_in = None, prompt
        result = generate(adapter, text_in, text_in, body)
        if isinstance(result, JSONResponse):
            return result
        pieces, finish, prompt_tokens = result
        choice: dict[str, Any] = {"index": 0, "text": "".join(pieces), "finish_reason": finish, "logprobs": None}
        if body.get("echo") and body.get("logprobs") is not None and pieces_in is not None:
            choice["text"] = text_in + choice["text"]
            echoed = pieces_in + pieces
            choice["logprobs"] = {
                "tokens": echoed,
                "token_logprobs": [None] + [state.logprob(p, adapter) for p in echoed[1:]],
                "top_logprobs": None,
                "text_offset": [0] * len(echoed),
            }
        return {
            "id": "cmpl-standin", "object": "text_completion", "created": int(time.time()), "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
                      "total_tokens": prompt_tokens + len(pieces)},
        }

    if kind == "vllm":
        _add_vllm_lora_routes(app, state)
    else:
        _add_sglang_routes(app, state)
    return app


async def _chat_chunks(
    model: str, pieces: list[str], finish: str, usage: dict[str, int] | None, state: StandinState
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, str], finish_reason: str | None) -> str:
        payload = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": int(time.time()),
                   "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(payload)}\n\n"

    yield chunk({"role": "assistant", "content": ""}, None)
    for i, piece in enumerate(pieces):
        if i == state.stream_error_after:
            error = {"message": "Engine loop has died", "type": "InternalServerError", "param": None, "code": 500}
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        yield chunk({"content": piece}, None)
        await asyncio.sleep(0)
    yield chunk({}, finish)
    if usage is not None:
        payload = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": int(time.time()),
                   "model": model, "choices": [], "usage": usage}
        yield f"data: {json.dumps(payload)}\n\n"
    yield "data: [DONE]\n\n"


def _is_adapter_dir(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _add_vllm_lora_routes(app: FastAPI, state: StandinState) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> Response:
        if not state.runtime_lora:
            return _no_route()
        body = await request.json()
        state.requests.append(("/v1/load_lora_adapter", body))
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return _error("vllm", 400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        inplace = bool(body.get("load_inplace")) and state.load_inplace
        if name in state.adapters and not inplace:
            return _error("vllm", 400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        if not _is_adapter_dir(path):
            return _error("vllm", 404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        state.adapters[name] = path
        state.events.append(f"load {name} {path}")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> Response:
        if not state.runtime_lora:
            return _no_route()
        body = await request.json()
        state.requests.append(("/v1/unload_lora_adapter", body))
        name = body.get("lora_name")
        if name not in state.adapters:
            return _error("vllm", 404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del state.adapters[name]
        state.events.append(f"unload {name}")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache(request: Request) -> Response:
        if not state.dev_mode:
            return _no_route()
        running = request.query_params.get("reset_running_requests", "false")
        state.events.append("reset_prefix_cache" + (" running" if running == "true" else ""))
        return Response(status_code=200)


def _sglang_not_loaded(adapter: str, state: StandinState) -> str:
    """SGLang's LoRARegistry message for a request naming an adapter it does not have."""
    return f"The following requested LoRA adapters are not loaded: {adapter}\nLoaded adapters: {state.adapters.keys()}."


def _add_sglang_routes(app: FastAPI, state: StandinState) -> None:
    def result(success: bool, message: str = "") -> JSONResponse:
        body = {"success": success, "error_message": message, "loaded_adapters": dict(state.adapters)}
        return JSONResponse(body, status_code=200 if success else 400)

    @app.post("/load_lora_adapter")
    async def load(request: Request) -> Response:
        if not state.runtime_lora:
            return _no_route()
        body = await request.json()
        state.requests.append(("/load_lora_adapter", body))
        name, path = body["lora_name"], body["lora_path"]
        if name in state.adapters:
            return result(False, f"Failed to load LoRA adapter {name} because it is already loaded")
        if not _is_adapter_dir(path):  # assumption: the wording of the error SGLang reports here
            return result(False, f"Failed to load LoRA adapter {name}: can't find adapter_config.json in {path}")
        state.adapters[name] = path
        state.events.append(f"load {name} {path}")
        return result(True)

    @app.post("/unload_lora_adapter")
    async def unload(request: Request) -> Response:
        if not state.runtime_lora:
            return _no_route()
        body = await request.json()
        state.requests.append(("/unload_lora_adapter", body))
        name = body["lora_name"]
        if name not in state.adapters:  # assumption: answered as a failed update, not a 500
            return result(False, f"LoRA with name {name} does not exist. Loaded LoRAs: {state.adapters.keys()}")
        del state.adapters[name]
        state.events.append(f"unload {name}")
        return result(True)

    @app.post("/generate")
    async def generate(request: Request) -> Any:
        body = await request.json()
        state.requests.append(("/generate", body))
        adapter = body.get("lora_path")
        if adapter is not None and adapter not in state.adapters:  # /generate's own error shape
            return JSONResponse({"error": {"message": _sglang_not_loaded(adapter, state)}}, status_code=400)
        ids = body["input_ids"]
        pieces = state.detokenize(ids)
        start = body.get("logprob_start_len", -1)
        triples = [[None if i == 0 else state.logprob(p, adapter), tid, None]
                   for i, (p, tid) in enumerate(zip(pieces, ids, strict=True))]
        meta = {"prompt_tokens": len(ids), "completion_tokens": 1, "finish_reason": {"type": "length", "length": 1},
                "input_token_logprobs": triples[start:] if body.get("return_logprob") and start >= 0 else None}
        return {"text": " x", "meta_info": meta}


def free_port() -> int:
    """A loopback port nothing listens on (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def run_standin(kind: Kind) -> Iterator[Standin]:
    """Serve a stand-in of ``kind`` on a free loopback port for the duration of the block."""
    state = StandinState(kind)
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(state), log_level="warning", lifespan="off", timeout_graceful_shutdown=0.1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"{kind}-standin", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the {kind} stand-in server did not start")
        time.sleep(0.01)
    try:
        yield Standin(f"http://127.0.0.1:{port}", state)
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()
