"""The default LangGraph graph: a chat node, and a tool loop when tools are given."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import SystemMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolNode, tools_condition


def build_default_graph(
    chat_model: BaseChatModel,
    *,
    tools: Sequence[Any] = (),
    system_prompt: str | None = None,
    checkpointer: BaseCheckpointSaver | None = None,
) -> CompiledStateGraph:
    """A `MessagesState` graph: ``model`` answers; with tools, ``tools`` runs its calls and loops back.

    Args:
        chat_model: usually the agent's :class:`~agent.chat_model.EngineChatModel`.
        tools: LangChain tools the model may call.
        system_prompt: prepended to every model call (not stored in the thread's state).
        checkpointer: keeps each thread's conversation between calls.
    """
    model = chat_model.bind_tools(list(tools)) if tools else chat_model

    def call_model(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        messages = list(state["messages"])
        if system_prompt:
            messages = [SystemMessage(content=system_prompt), *messages]
        return {"messages": [model.invoke(messages, config)]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", call_model)
    graph.add_edge(START, "model")
    if tools:
        graph.add_node("tools", ToolNode(list(tools)))
        graph.add_conditional_edges("model", tools_condition, {"tools": "tools", END: END})
        graph.add_edge("tools", "model")
    else:
        graph.add_edge("model", END)
    return graph.compile(checkpointer=checkpointer)
