"""The agent: `LearningAgent`, its default LangGraph graph and the engine-backed chat model."""

from agent.chat_model import EngineChatModel, messages_to_dicts, parse_tool_calls
from agent.graph import build_default_graph
from agent.learning_agent import AgentChunk, AgentResult, LearningAgent

__all__ = [
    "AgentChunk",
    "AgentResult",
    "EngineChatModel",
    "LearningAgent",
    "build_default_graph",
    "messages_to_dicts",
    "parse_tool_calls",
]
