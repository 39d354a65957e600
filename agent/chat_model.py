"""The chat-model bridge: a LangChain `BaseChatModel` backed by a runtime `Engine`.

Every model call it makes is logged to the store (when one is given) with the thread id, the input
messages, the response, the adapter that served it, latency and token counts. The interaction id is put on
the returned message as ``response_metadata["interaction_id"]``, so any LangGraph graph built on this
model (the default one or an app's own) gets logging for free.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field

from runtime.engines import ACTIVE, Generation, SamplingParams

#: Set by `LearningAgent` around a graph run; used when LangGraph metadata carries no thread id.
current_thread_id: ContextVar[str | None] = ContextVar("current_thread_id", default=None)

#: Set by `LearningAgent` around a graph run: the interaction ids logged during the run are appended.
current_run_interactions: ContextVar[list[str] | None] = ContextVar("current_run_interactions", default=None)

#: The `stream` call's config metadata: LangChain does not hand `_stream` a run manager to read it from.
_stream_metadata: ContextVar[dict[str, Any] | None] = ContextVar("_stream_metadata", default=None)

INTERACTION_ID_KEY = "interaction_id"

_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)

_TOOLS_PROMPT = (
    "You can call these tools. To call one, reply with only\n"
    '<tool_call>{{"name": "TOOL_NAME", "arguments": {{...}}}}</tool_call>\n'
    "and wait for its result. Tools:\n{tools}"
)


def messages_to_dicts(messages: Sequence[BaseMessage], tools: Sequence[dict] | None = None) -> list[dict]:
    """LangChain messages as ``{"role", "content"}`` dicts for a chat template (tool calls as text)."""
    out: list[dict] = []
    for msg in messages:
        if isinstance(msg, SystemMessage):
            role = "system"
        elif isinstance(msg, HumanMessage):
            role = "user"
        elif isinstance(msg, AIMessage):
            role = "assistant"
        elif isinstance(msg, ToolMessage):
            role = "tool"
        else:
            role = getattr(msg, "role", None) or msg.type
        content = msg.content if isinstance(msg.content, str) else _flatten_content(msg.content)
        if isinstance(msg, AIMessage) and msg.tool_calls:
            calls = "".join(
                f"<tool_call>{json.dumps({'name': c['name'], 'arguments': c['args']})}</tool_call>"
                for c in msg.tool_calls
            )
            content = f"{content}{calls}"
        out.append({"role": role, "content": content})
    if tools:
        listing = "\n".join(json.dumps(t["function"]) for t in tools)
        tool_text = _TOOLS_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{tool_text}"}
        else:
            out.insert(0, {"role": "system", "content": tool_text})
    return out


def _flatten_content(content: list[Any]) -> str:
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split model output into (plain text, tool calls) from ``<tool_call>{json}</tool_call>`` blocks.

    Malformed blocks are left in the text rather than raising: small models often write broken JSON.
    """
    calls: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        try:
            payload = json.loads(match.group(1))
        except json.JSONDecodeError:
            return match.group(0)
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            return match.group(0)
        args = payload.get("arguments", {})
        calls.append(
            {
                "name": payload["name"],
                "args": args if isinstance(args, dict) else {"input": args},
                "id": f"call_{uuid.uuid4().hex[:12]}",
                "type": "tool_call",
            }
        )
        return ""

    text = _TOOL_CALL_RE.sub(take, text).strip() if "<tool_call>" in text else text
    return text, calls


class EngineChatModel(BaseChatModel):
    """A LangChain chat model served by a runtime :class:`~runtime.engines.Engine`.

    Args:
        engine: the engine that generates.
        store: where each call is logged (``None``: no logging).
        adapter: the adapter to use; ``None`` serves the base model, the default follows the engine's
            active adapter at the moment each request starts.
        max_new_tokens, temperature, top_p, seed: sampling defaults; per-call ``stop`` is honoured.
        interaction_kind: ``"live"`` or ``"shadow"``, recorded with each interaction.
        shadow: an object with ``offer(conversation, interaction_id, params)`` (a
            :class:`policies.shadow.ShadowSwitch`) told about every logged live call, for shadow mode.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: Any = Field(exclude=True)
    store: Any = Field(default=None, exclude=True)
    adapter: Any = Field(default=ACTIVE, exclude=True)
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    interaction_kind: str = "live"
    shadow: Any = Field(default=None, exclude=True)

    @property
    def _llm_type(self) -> str:
        return "learning-runtime-engine"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": getattr(self.engine, "model_name", "?"), "max_new_tokens": self.max_new_tokens}

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (LangChain tools, functions or JSON schemas); calls are parsed from the output."""
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=int(kwargs.get("max_new_tokens", kwargs.get("max_tokens", self.max_new_tokens))),
            temperature=float(kwargs.get("temperature", self.temperature)),
            top_p=float(kwargs.get("top_p", self.top_p)),
            stop=list(stop) if stop else None,
            seed=kwargs.get("seed", self.seed),
        )

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        """As LangChain's `stream`; the config's metadata (e.g. ``thread_id``) is logged as with `invoke`."""
        metadata = dict((config or {}).get("metadata") or {})
        inner = super().stream(input, config, stop=stop, **kwargs)
        while True:
            token = _stream_metadata.set(metadata)  # set around each step only: never leaks to the caller
            try:
                chunk = next(inner)
            except StopIteration:
                return
            finally:
                _stream_metadata.reset(token)
            yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        conversation = messages_to_dicts(messages, kwargs.get("tools"))
        params = self._params(stop, kwargs)
        start = time.perf_counter()
        generation = self.engine.chat([conversation], params, adapter=self.adapter)[0]
        latency_ms = (time.perf_counter() - start) * 1000.0
        message = self._to_message(generation, conversation, latency_ms, run_manager, bool(kwargs.get("tools")))
        self._mirror(conversation, message, params)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        conversation = messages_to_dicts(messages, kwargs.get("tools"))
        params = self._params(stop, kwargs)
        start = time.perf_counter()
        stream = self.engine.stream_chat(conversation, params, adapter=self.adapter)
        for delta in stream:
            if not delta:
                continue
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager is not None:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        latency_ms = (time.perf_counter() - start) * 1000.0
        final = self._to_message(stream.generation, conversation, latency_ms, run_manager, False)
        self._mirror(conversation, final, params)
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="", response_metadata=final.response_metadata, usage_metadata=final.usage_metadata
            )
        )

    def _to_message(
        self,
        generation: Generation,
        conversation: list[dict],
        latency_ms: float,
        run_manager: CallbackManagerForLLMRun | None,
        parse_tools: bool,
    ) -> AIMessage:
        text, tool_calls = parse_tool_calls(generation.text) if parse_tools else (generation.text, [])
        interaction_id = self._log(generation, conversation, latency_ms, run_manager)
        metadata = {
            INTERACTION_ID_KEY: interaction_id,
            "adapter": generation.adapter,
            "model_name": getattr(self.engine, "model_name", None),
            "finish_reason": generation.finish_reason,
            "latency_ms": latency_ms,
        }
        usage = {
            "input_tokens": generation.prompt_tokens,
            "output_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        }
        return AIMessage(content=text, tool_calls=tool_calls, response_metadata=metadata, usage_metadata=usage)

    def _mirror(self, conversation: list[dict], message: AIMessage, params: SamplingParams) -> None:
        """Offer a logged live call to shadow mode (never blocks; a shadow answer is logged separately)."""
        interaction_id = message.response_metadata.get(INTERACTION_ID_KEY)
        if self.shadow is not None and interaction_id is not None and self.interaction_kind == "live":
            self.shadow.offer(conversation, interaction_id, params)

    def _log(
        self,
        generation: Generation,
        conversation: list[dict],
        latency_ms: float,
        run_manager: CallbackManagerForLLMRun | None,
    ) -> str | None:
        if self.store is None:
            return None
        if run_manager is not None and run_manager.metadata:
            metadata = dict(run_manager.metadata)
        else:
            metadata = dict(_stream_metadata.get() or {})
        thread_id = metadata.get("thread_id") or current_thread_id.get()
        interaction_id = self.store.log_interaction(
            thread_id=str(thread_id) if thread_id is not None else None,
            messages=conversation,
            response=generation.text,
            adapter=generation.adapter,
            model=getattr(self.engine, "model_name", None),
            latency_ms=latency_ms,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            kind=self.interaction_kind,
            metadata={k: v for k, v in metadata.items() if isinstance(v, str | int | float | bool)},
        )
        collector = current_run_interactions.get()
        if collector is not None:
            collector.append(interaction_id)
        return interaction_id
