"""`LearningAgent`: a LangGraph agent whose every model call is logged, and which takes feedback.

Typical use::

    from agent import LearningAgent

    agent = LearningAgent.from_config("runtime.yaml", background_learning=True)
    result = agent.invoke("What is the refund window?", thread_id="user-42")
    agent.correct(result.interaction_id, "The refund window is 45 days.")
    agent.close()

With ``background_learning=True`` the runtime's learning loop runs in this process on the policy's
schedule (see :mod:`orchestration.loop`); ``agent.service`` promotes, rolls back and reports on shadow mode.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.messages.utils import convert_to_messages
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph.state import CompiledStateGraph

from agent.chat_model import (
    INTERACTION_ID_KEY,
    EngineChatModel,
    current_run_interactions,
    current_thread_id,
    messages_to_dicts,
)
from agent.graph import build_default_graph
from orchestration.service import RuntimeService
from policies.schema import Policy, SignalTrust
from policies.signal_trust import arrival_state, release_agreed
from runtime.config import RuntimeConfig
from runtime.engines import Engine
from runtime.store import Store
from runtime.store.models import LearningState

AgentInput = str | Sequence[BaseMessage | dict[str, Any] | tuple[str, str]] | dict[str, Any]
GraphFactory = Callable[[EngineChatModel], CompiledStateGraph]


@dataclass
class AgentResult:
    """What `LearningAgent.invoke` returns."""

    text: str
    """The final assistant message's text."""
    interaction_id: str | None
    """The logged interaction of the final model call (pass it to `correct` or `feedback`)."""
    thread_id: str
    messages: list[BaseMessage]
    """The thread's messages after the run."""
    interaction_ids: list[str] = field(default_factory=list)
    """Every model call of this run, in order (more than one when tools were called)."""
    adapter: str | None = None
    """The adapter that served the final answer (`None` = base model)."""


@dataclass
class AgentChunk:
    """One piece of `LearningAgent.stream`: a text delta, or the end of a model call."""

    text: str
    interaction_id: str | None = None
    """Set on the chunk that closes a model call."""
    adapter: str | None = None


class LearningAgent:
    """A LangGraph agent on a runtime engine that logs every model call and collects learning signals.

    Args:
        engine: the serving engine (e.g. :class:`~runtime.engines.TransformersEngine`).
        store: the interaction log; ``None`` disables logging and the feedback methods.
        graph: ``None`` for the default chat graph (with ``tools``, a tool loop); a compiled LangGraph
            graph built on :attr:`chat_model`; or a function that receives the chat model and returns the
            compiled graph. The graph's state must have a ``messages`` key.
        tools: tools for the default graph.
        system_prompt: system message for the default graph.
        max_new_tokens, temperature: sampling defaults of the chat model.
        service: the :class:`~orchestration.service.RuntimeService` around `engine` and `store` (learning,
            promotion, shadow mode); :meth:`from_config` creates one.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        store: Store | None = None,
        graph: CompiledStateGraph | GraphFactory | None = None,
        tools: Sequence[Any] = (),
        system_prompt: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        service: RuntimeService | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.service = service
        self.chat_model = EngineChatModel(
            engine=engine, store=store, max_new_tokens=max_new_tokens, temperature=temperature,
            shadow=service.shadow if service is not None else None,
        )
        if graph is None:
            self.graph = build_default_graph(
                self.chat_model, tools=tools, system_prompt=system_prompt, checkpointer=InMemorySaver()
            )
        elif isinstance(graph, CompiledStateGraph):
            if tools:
                raise ValueError("`tools` applies to the default graph only; give them to your own graph")
            self.graph = graph
        elif callable(graph):
            self.graph = graph(self.chat_model)
        else:
            raise TypeError(f"graph must be a compiled LangGraph graph or a factory, got {type(graph)!r}")
        self._owned = ExitStack()

    @classmethod
    def from_config(
        cls,
        config: RuntimeConfig | str | Path | None = None,
        *,
        policy: Policy | str | Path | None = None,
        background_learning: bool = False,
        **kwargs: Any,
    ) -> LearningAgent:
        """Build the runtime (engine, store, policy, active adapter) from a config: a `RuntimeConfig`, a
        YAML path, or the defaults. `policy` (a `Policy` or a YAML path) replaces the config's ``policy``
        file. With `background_learning`, the learning loop starts in this process.

        The agent owns the runtime and closes it in :meth:`close`.
        """
        with ExitStack() as owned:
            service = owned.enter_context(RuntimeService.from_config(config, policy=policy))
            config = service.config
            kwargs.setdefault("system_prompt", config.engine.system_prompt)
            kwargs.setdefault("max_new_tokens", config.engine.max_new_tokens)
            kwargs.setdefault("temperature", config.engine.temperature)
            agent = cls(service.engine, store=service.store, service=service, **kwargs)
            if background_learning:
                service.start_background()
            agent._owned = owned.pop_all()
        return agent

    # --- running -------------------------------------------------------------------------------------

    def invoke(
        self, input: AgentInput, *, thread_id: str | None = None, config: RunnableConfig | None = None
    ) -> AgentResult:
        """Run the graph on a user message (or messages) in a thread; returns the answer and its ids."""
        thread_id, run_config = self._config(thread_id, config)
        state = self._state(input)
        with _run_scope(thread_id) as run_ids:
            out = self.graph.invoke(state, run_config)
        return self._result(out, thread_id, run_ids)

    async def ainvoke(
        self, input: AgentInput, *, thread_id: str | None = None, config: RunnableConfig | None = None
    ) -> AgentResult:
        """Async :meth:`invoke`."""
        thread_id, run_config = self._config(thread_id, config)
        state = self._state(input)
        with _run_scope(thread_id) as run_ids:
            out = await self.graph.ainvoke(state, run_config)
        return self._result(out, thread_id, run_ids)

    def stream(
        self, input: AgentInput, *, thread_id: str | None = None, config: RunnableConfig | None = None
    ) -> Iterator[AgentChunk]:
        """Stream the answer's text as it is generated; a chunk carrying the interaction id closes each
        model call."""
        thread_id, run_config = self._config(thread_id, config)
        with _run_scope(thread_id):
            for message, _meta in self.graph.stream(self._state(input), run_config, stream_mode="messages"):
                chunk = self._chunk(message)
                if chunk is not None:
                    yield chunk

    async def astream(
        self, input: AgentInput, *, thread_id: str | None = None, config: RunnableConfig | None = None
    ) -> AsyncIterator[AgentChunk]:
        """Async :meth:`stream`."""
        thread_id, run_config = self._config(thread_id, config)
        with _run_scope(thread_id):
            async for message, _meta in self.graph.astream(
                self._state(input), run_config, stream_mode="messages"
            ):
                chunk = self._chunk(message)
                if chunk is not None:
                    yield chunk

    # --- learning signals ----------------------------------------------------------------------------

    def feedback(self, interaction_id: str, score: float, comment: str | None = None, *,
                 principal: str | None = None) -> str:
        """Rate an answer (e.g. 1 good, -1 bad). Returns the signal id. ``principal``: who rates (see
        :meth:`correct`)."""
        store = self._require_store()
        self._require_interaction(interaction_id)
        return self._admit(lambda state, reason: store.add_signal(
            "rating", interaction_id=interaction_id, rating=float(score), comment=comment, principal=principal,
            state=state, state_reason=reason), principal)

    def correct(self, interaction_id: str, better_answer: str, *, principal: str | None = None) -> str:
        """Give the answer the agent should have given; it becomes a demonstration for learning.

        ``principal`` names the sender (the server passes the API key's); the policy's ``signals`` section
        decides whether it is learned directly or waits for review (:mod:`policies.signal_trust`)."""
        store = self._require_store()
        if not better_answer or not better_answer.strip():
            raise ValueError("better_answer must be a non-empty string")
        self._require_interaction(interaction_id)
        return self._admit(lambda state, reason: store.add_signal(
            "correction", interaction_id=interaction_id, text=better_answer, principal=principal, state=state,
            state_reason=reason), principal)

    def teach(self, prompt: str | Sequence[BaseMessage | dict[str, Any]], demonstration: str, *,
              principal: str | None = None) -> str:
        """Teach an answer directly: `prompt` (a user message or a conversation) -> `demonstration`.
        ``principal`` as for :meth:`correct`."""
        store = self._require_store()
        if not demonstration or not demonstration.strip():
            raise ValueError("demonstration must be a non-empty string")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _as_dicts(prompt)
        return self._admit(lambda state, reason: store.add_signal(
            "demonstration", text=demonstration, messages=messages, principal=principal, state=state,
            state_reason=reason), principal)

    def ingest(self, text: str, title: str | None = None, questions: Sequence[Any] | None = None, *,
               principal: str | None = None) -> str:
        """Store a new document for knowledge learning; `questions` (optional) are its evaluation set,
        each a string or a ``{"question", "answer"}`` dict. Returns the document id. ``principal`` as for
        :meth:`correct`."""
        store = self._require_store()
        if not text or not text.strip():
            raise ValueError("text must be a non-empty document")
        return self._admit(lambda state, reason: store.add_document(
            text, title=title, questions=list(questions) if questions else None, principal=principal, state=state,
            state_reason=reason), principal)

    def _admit(self, add: Callable[[LearningState, str | None], str], principal: str | None) -> str:
        """Add a signal in the state its sender's trust gives; a signal awaiting review may be released at once
        by agreement with other senders."""
        trust = self.service.policy.signals if self.service is not None else SignalTrust()
        state, reason = arrival_state(trust, principal)
        signal_id = add(state, reason)
        if state == "review" and trust.min_agreeing_principals > 1:
            release_agreed(self._require_store(), trust, signal_id)  # its reads wait for the queued signal
        return signal_id

    def close(self) -> None:
        """Flush the log and release what `from_config` created."""
        if self.store is not None and not self.store.closed:
            self.store.flush()
        self._owned.close()

    def __enter__(self) -> LearningAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------------------

    def _config(self, thread_id: str | None, config: RunnableConfig | None) -> tuple[str, RunnableConfig]:
        run_config: RunnableConfig = dict(config or {})  # type: ignore[assignment]
        configurable = dict(run_config.get("configurable", {}))
        thread_id = thread_id or configurable.get("thread_id") or uuid.uuid4().hex
        configurable["thread_id"] = thread_id
        run_config["configurable"] = configurable
        return thread_id, run_config

    @staticmethod
    def _state(input: AgentInput) -> dict[str, Any]:
        if isinstance(input, str):
            return {"messages": [HumanMessage(content=input)]}
        if isinstance(input, dict):
            return input
        return {"messages": convert_to_messages(list(input))}

    @staticmethod
    def _result(out: dict[str, Any], thread_id: str, run_ids: list[str]) -> AgentResult:
        messages = list(out.get("messages", []))
        last = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
        meta = last.response_metadata if last is not None else {}
        return AgentResult(
            text=last.text if last is not None else "",
            interaction_id=meta.get(INTERACTION_ID_KEY),
            thread_id=thread_id,
            messages=messages,
            interaction_ids=list(run_ids),
            adapter=meta.get("adapter"),
        )

    @staticmethod
    def _chunk(message: Any) -> AgentChunk | None:
        if not isinstance(message, AIMessageChunk | AIMessage):
            return None
        interaction_id = message.response_metadata.get(INTERACTION_ID_KEY)
        text = message.text
        if not text and interaction_id is None:
            return None
        return AgentChunk(text=text, interaction_id=interaction_id, adapter=message.response_metadata.get("adapter"))

    def _require_store(self) -> Store:
        if self.store is None:
            raise RuntimeError("this agent has no store: create it with store=Store(...) or from_config()")
        return self.store

    def _require_interaction(self, interaction_id: str) -> None:
        if self._require_store().get_interaction(interaction_id) is None:
            raise KeyError(f"no interaction with id {interaction_id!r} in the store")


@contextmanager
def _run_scope(thread_id: str) -> Iterator[list[str]]:
    """Tell the chat model the thread id, and collect the interaction ids it logs during one run."""
    ids: list[str] = []
    t_token = current_thread_id.set(thread_id)
    r_token = current_run_interactions.set(ids)
    try:
        yield ids
    finally:
        current_run_interactions.reset(r_token)
        current_thread_id.reset(t_token)


def _as_dicts(messages: Sequence[BaseMessage | dict[str, Any]]) -> list[dict[str, Any]]:
    return messages_to_dicts(convert_to_messages(list(messages)))
