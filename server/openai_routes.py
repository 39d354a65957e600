"""OpenAI-compatible routes: ``POST /v1/chat/completions`` (streaming too) and ``GET /v1/models``."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from server import replica_routes
from server.auth import require_role
from server.errors import APIError, error_body
from server.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ModelCard,
    ModelList,
    ResponseMessage,
    Usage,
)
from server.serving import ClientGone, Completion, Deadline, PreparedRequest, prepare, translate_engine_error
from server.state import ServerState, get_state

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_role("chat"))])

INTERACTION_HEADER = "X-Interaction-Id"
THREAD_HEADER = "X-Thread-Id"


@router.get("/models", response_model=ModelList)
async def list_models(state: ServerState = Depends(get_state)) -> ModelList:
    """The base model and every adapter: the registry's (with status and lineage) and any other loaded one."""
    return await run_in_threadpool(_model_list, state)


def _model_list(state: ServerState) -> ModelList:
    base = state.resolver.base_id
    loaded = set(state.engine.list_adapters())
    active = state.engine.active_adapter
    created = int(time.time())
    cards = [ModelCard(id=base, created=created, root=base, status="base", loaded=True)]
    seen = set()
    for rec in state.store.adapters():
        seen.add(rec.name)
        if rec.role != "serving":
            continue
        cards.append(ModelCard(id=rec.name, created=int(rec.created_at.timestamp()), root=base,
                               parent=rec.parent or base, status=rec.status, loaded=rec.name in loaded,
                               lineage=list(rec.lineage)))
    for name in state.engine.list_adapters():
        if name not in seen:
            status = "active" if name == active else "loaded"
            cards.append(ModelCard(id=name, created=created, root=base, parent=base, status=status, loaded=True))
    return ModelList(data=cards)


@router.post("/chat/completions", response_model=ChatCompletion,
             responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    state: ServerState = Depends(get_state),
    thread_id: str | None = Header(None, alias=THREAD_HEADER),
) -> Any:
    """Answer a conversation with the base model, an adapter, or (by default) the active adapter.

    Each choice is logged as an interaction; its id is on the choice (``interaction_id``), on the response
    and in the ``X-Interaction-Id`` header (comma-separated for ``n > 1``). A streamed response carries the
    id on its last chunk, since it is known only once the answer is complete.
    """
    config = state.config
    prepared = prepare(
        body, limits=state.limits, context_length=getattr(state.engine, "context_length", None),
        default_max_tokens=config.engine.max_new_tokens, system_prompt=config.engine.system_prompt,
        thread_id=thread_id,
    )
    prepared.adapter = await run_in_threadpool(state.resolver.resolve, body.model)
    replica_routes.refuse_default_out_of_step(request, prepared.adapter)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    deadline = Deadline.for_request(config.engine.request_timeout_s, request.headers.get("x-stainless-timeout"))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream_response(state, prepared, completion_id, created, include_usage, deadline)
    try:
        choices = await state.chat.complete(prepared, deadline=deadline, disconnected=lambda: _disconnected(request))
    except ClientGone:  # nobody reads this answer; the generation was stopped
        return Response(status_code=499)
    for c in choices:
        state.metrics.record_tokens(c.adapter, c.prompt_tokens, c.completion_tokens)
    first = choices[0]
    response = ChatCompletion(
        id=completion_id, created=created, model=state.resolver.label(first.adapter),
        choices=[Choice(index=i, message=ResponseMessage(content=c.text), finish_reason=_finish(c),
                        interaction_id=c.interaction_id) for i, c in enumerate(choices)],
        usage=Usage(prompt_tokens=first.prompt_tokens,
                    completion_tokens=sum(c.completion_tokens for c in choices),
                    total_tokens=first.prompt_tokens + sum(c.completion_tokens for c in choices)),
        interaction_id=first.interaction_id, adapter=first.adapter,
    )
    ids = ",".join(c.interaction_id for c in choices if c.interaction_id)
    headers = {INTERACTION_HEADER: ids} if ids else None
    return JSONResponse(response.model_dump(mode="json"), headers=headers)


def _finish(c: Completion) -> Any:
    return c.finish_reason if c.finish_reason in ("stop", "length") else "stop"


async def _disconnected(request: Request) -> None:
    """Return when the client of a request whose body was read disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream_response(state: ServerState, prepared: PreparedRequest, completion_id: str, created: int,
                           include_usage: bool, deadline: Deadline) -> StreamingResponse:
    started = time.perf_counter()
    handle = await state.chat.stream(prepared, deadline=deadline)  # raises the API error before any byte is sent
    label = state.resolver.label(prepared.adapter) if isinstance(prepared.adapter, str | None) else None

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                   "model": label or state.resolver.label(state.engine.active_adapter),
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(payload)}\n\n"

    async def body() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        first = True
        try:
            async for text in handle.events():
                if first and text:
                    state.metrics.first_token.observe(time.perf_counter() - started)
                    first = False
                yield chunk({"content": text})
        except Exception as exc:  # noqa: BLE001 - reported in the stream: the status line is already sent
            api = exc if isinstance(exc, APIError) else translate_engine_error(exc)
            message = api.message if api is not None else f"{type(exc).__name__}: {exc}"
            err = error_body(message, type=api.type if api else "server_error", code=api.code if api else None)
            yield f"data: {json.dumps(err)}\n\n"
            yield "data: [DONE]\n\n"
            return
        result = handle.result
        if result is None:
            yield "data: [DONE]\n\n"
            return
        nonlocal label
        label = state.resolver.label(result.adapter)
        yield chunk({}, _finish(result), interaction_id=result.interaction_id, adapter=result.adapter)
        if include_usage:
            usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                     "total_tokens": result.prompt_tokens + result.completion_tokens}
            final = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": label,
                     "choices": [], "usage": usage}
            yield f"data: {json.dumps(final)}\n\n"
        yield "data: [DONE]\n\n"

    def count_tokens() -> None:
        result = handle.result
        if result is None:
            return
        state.metrics.record_tokens(result.adapter, result.prompt_tokens, result.completion_tokens)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(count_tokens))
