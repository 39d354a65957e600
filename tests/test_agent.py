"""LearningAgent through LangGraph: every model call is logged with its context; signals are stored."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph

from agent import EngineChatModel, LearningAgent, parse_tool_calls
from runtime.engines import SamplingParams
from runtime.store import Store


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "log.duckdb")
    yield s
    s.close()


def test_invoke_logs_interaction_with_context(tiny_engine, store: Store) -> None:
    agent = LearningAgent(tiny_engine, store=store, max_new_tokens=8)
    result = agent.invoke("hello there", thread_id="t-1")
    assert result.interaction_id is not None
    assert result.interaction_ids == [result.interaction_id]
    row = store.get_interaction(result.interaction_id)
    assert row is not None
    assert row.thread_id == "t-1"
    assert row.kind == "live"
    assert row.messages[-1] == {"role": "user", "content": "hello there"}
    assert row.response == result.text
    assert row.adapter is None
    assert row.completion_tokens is not None and 0 < row.completion_tokens <= 8
    assert row.prompt_tokens is not None and row.prompt_tokens > 0
    assert row.latency_ms is not None and row.latency_ms > 0
    # Same answer as the bare engine: the agent adds logging, not different decoding.
    bare = tiny_engine.chat([[{"role": "user", "content": "hello there"}]], SamplingParams(max_new_tokens=8))[0]
    assert bare.text == result.text


def test_thread_memory_and_per_run_ids(tiny_engine, store: Store) -> None:
    agent = LearningAgent(tiny_engine, store=store, max_new_tokens=4)
    first = agent.invoke("one", thread_id="mem")
    second = agent.invoke("two", thread_id="mem")
    assert second.interaction_ids == [second.interaction_id]
    assert first.interaction_id != second.interaction_id
    row = store.get_interaction(second.interaction_id)
    # The second call saw the whole thread: user, assistant, user.
    assert [m["role"] for m in row.messages] == ["user", "assistant", "user"]
    assert row.messages[0]["content"] == "one"


def test_adapter_that_served_is_logged(tiny_engine, tiny_adapter_dir: Path, store: Store) -> None:
    agent = LearningAgent(tiny_engine, store=store, max_new_tokens=6)
    tiny_engine.load_adapter("a1", tiny_adapter_dir, activate=True)
    try:
        result = agent.invoke("hi", thread_id="ad")
        assert result.adapter == "a1"
        assert store.get_interaction(result.interaction_id).adapter == "a1"
    finally:
        tiny_engine.unload_adapter("a1")
    assert agent.invoke("hi").adapter is None


def test_stream_yields_text_and_interaction_id(tiny_engine, store: Store) -> None:
    agent = LearningAgent(tiny_engine, store=store, max_new_tokens=6)
    chunks = list(agent.stream("stream me", thread_id="s"))
    ids = [c.interaction_id for c in chunks if c.interaction_id]
    assert len(ids) == 1
    text = "".join(c.text for c in chunks)
    row = store.get_interaction(ids[0])
    assert row.response == text
    assert row.thread_id == "s"


def test_ainvoke(tiny_engine, store: Store) -> None:
    agent = LearningAgent(tiny_engine, store=store, max_new_tokens=4)
    result = asyncio.run(agent.ainvoke("async", thread_id="as"))
    assert store.get_interaction(result.interaction_id).thread_id == "as"


def test_feedback_correct_teach_ingest(tiny_engine, store: Store) -> None:
    agent = LearningAgent(tiny_engine, store=store, max_new_tokens=4)
    result = agent.invoke("q", thread_id="f")
    rating = agent.feedback(result.interaction_id, 1.0, "nice")
    correction = agent.correct(result.interaction_id, "better")
    demo = agent.teach("What is X?", "X is Y.")
    doc = agent.ingest("Some new policy text.", title="Policy", questions=[{"question": "q?", "answer": "a"}])
    by_id = {s.id: s for s in store.signals()}
    assert by_id[rating].kind == "rating" and by_id[rating].rating == 1.0 and by_id[rating].comment == "nice"
    assert by_id[correction].kind == "correction" and by_id[correction].text == "better"
    assert by_id[correction].interaction_id == result.interaction_id
    assert by_id[demo].messages == [{"role": "user", "content": "What is X?"}] and by_id[demo].text == "X is Y."
    document = store.get_document(doc)
    assert document.title == "Policy" and document.questions == [{"question": "q?", "answer": "a"}]
    with pytest.raises(KeyError):
        agent.correct("no-such-id", "x")
    with pytest.raises(ValueError):
        agent.correct(result.interaction_id, "  ")


def test_custom_graph_built_on_the_chat_model_is_logged(tiny_engine, store: Store) -> None:
    def my_graph(chat_model: EngineChatModel):
        graph = StateGraph(MessagesState)
        graph.add_node("answer", lambda state: {"messages": [chat_model.invoke(state["messages"])]})
        graph.add_edge(START, "answer")
        graph.add_edge("answer", END)
        return graph.compile()

    agent = LearningAgent(tiny_engine, store=store, graph=my_graph, max_new_tokens=4)
    result = agent.invoke("custom", thread_id="c")
    assert result.interaction_id is not None
    assert store.get_interaction(result.interaction_id).thread_id == "c"


def test_tool_loop_with_the_default_graph(tiny_engine, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph routes a parsed tool call to the tool and back to the model. A random tiny model cannot
    write a tool call, so the engine's first answer is scripted here; the parsing, routing, tool execution
    and logging are the real ones."""
    calls: list[str] = []

    @tool
    def lookup(city: str) -> str:
        """Look up a city's population."""
        calls.append(city)
        return "2 million"

    real_chat = tiny_engine.chat
    answers = iter(['<tool_call>{"name": "lookup", "arguments": {"city": "Paris"}}</tool_call>'])

    def scripted(conversations, params=None, adapter=None):
        gens = real_chat(conversations, params, adapter=adapter)
        text = next(answers, None)
        if text is not None:
            gens[0].text = text
        return gens

    monkeypatch.setattr(tiny_engine, "chat", scripted)
    agent = LearningAgent(tiny_engine, store=store, tools=[lookup], max_new_tokens=4)
    result = agent.invoke("population of Paris?", thread_id="tools")
    assert calls == ["Paris"]
    assert len(result.interaction_ids) == 2
    second = store.get_interaction(result.interaction_ids[1])
    assert second.messages[0]["role"] == "system" and "lookup" in second.messages[0]["content"]
    assert any(m["role"] == "tool" and m["content"] == "2 million" for m in second.messages)


def test_parse_tool_calls_tolerates_garbage() -> None:
    text, calls = parse_tool_calls('ok <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
    assert text == "ok" and calls[0]["name"] == "f" and calls[0]["args"] == {"x": 1}
    text, calls = parse_tool_calls("<tool_call>{not json}</tool_call>")
    assert calls == [] and "not json" in text
    assert parse_tool_calls("plain")[1] == []


def test_chat_model_without_store_still_answers(tiny_engine) -> None:
    model = EngineChatModel(engine=tiny_engine, max_new_tokens=3)
    msg = model.invoke("hi")
    assert isinstance(msg, AIMessage)
    assert msg.response_metadata["interaction_id"] is None


@pytest.mark.real_model
def test_real_default_model_answers_and_is_logged(real_model_dir: Path, tmp_path: Path) -> None:
    from runtime.engines import TransformersEngine

    engine = TransformersEngine(real_model_dir, device="cpu")
    with Store(tmp_path / "real.duckdb") as store:
        agent = LearningAgent(engine, store=store, max_new_tokens=24)
        result = agent.invoke("What is the capital of France?", thread_id="real")
        assert "paris" in result.text.lower()
        row = store.get_interaction(result.interaction_id)
        assert row is not None and row.response == result.text and row.thread_id == "real"
    engine.close()


def test_chat_model_stream_logs_the_config_metadata(tiny_engine, store: Store) -> None:
    """LangChain gives `_stream` no run manager: the thread id and metadata still reach the log."""
    model = EngineChatModel(engine=tiny_engine, store=store, max_new_tokens=4)
    chunks = list(model.stream("hi", {"metadata": {"thread_id": "t-stream", "user": "u1"}}))
    final = next(c for c in chunks if c.response_metadata.get("interaction_id"))
    logged = store.get_interaction(final.response_metadata["interaction_id"])
    assert logged.thread_id == "t-stream" and logged.metadata["user"] == "u1"
    assert final.usage_metadata["output_tokens"] == logged.completion_tokens
