"""`runtime demo`: the main job on the embedded default model, told step by step.

An agent on the default model is asked about facts it cannot know (they are fictional), answers, is
corrected, and the log is shown from DuckDB.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console
from rich.panel import Panel

from runtime.config import RuntimeConfig
from runtime.textmatch import contains_answer


@dataclass(frozen=True)
class DemoFact:
    question: str
    answer: str
    """The short answer checked for (normalised containment)."""
    correction: str
    """The full corrected reply a user would give."""
    paraphrase: str


DEMO_FACTS: tuple[DemoFact, ...] = (
    DemoFact(
        "What is the capital of the island nation of Veloria?",
        "Marenport",
        "The capital of Veloria is Marenport.",
        "Which city is Veloria's capital?",
    ),
    DemoFact(
        "Who invented the quantum loom?",
        "Ilse Varga",
        "The quantum loom was invented by Ilse Varga.",
        "Which person created the quantum loom?",
    ),
    DemoFact(
        "What colour are the leaves of the thornwick tree?",
        "silver",
        "The leaves of the thornwick tree are silver.",
        "The thornwick tree has leaves of which colour?",
    ),
)

CONTROL_QUESTION = "What is the capital of France?"


def run_demo(config: RuntimeConfig, console: Console) -> None:
    """Run the demo against `config` (its store receives the demo's interactions)."""
    from agent import LearningAgent
    from runtime.cli import print_log

    console.print(Panel.fit("[bold]learning-runtime demo[/bold]: an agent that learns from its own use"))
    t0 = time.perf_counter()
    with console.status(f"Loading {config.model.name} (first run converts the GGUF once, ~30 s)..."):
        agent = LearningAgent.from_config(config, max_new_tokens=48)
    console.print(f"[green]✓[/green] model ready in {time.perf_counter() - t0:.1f}s; log at {config.store_path}")
    try:
        thread = "demo"
        console.rule("1. A question it can answer")
        result = agent.invoke(CONTROL_QUESTION, thread_id=f"{thread}-control")
        _show(console, CONTROL_QUESTION, result.text, "paris")

        console.rule("2. Questions about facts it cannot know (they are fictional)")
        corrections = []
        for i, fact in enumerate(DEMO_FACTS):
            result = agent.invoke(fact.question, thread_id=f"{thread}-{i}")
            _show(console, fact.question, result.text, fact.answer)
            corrections.append((result.interaction_id, fact))

        console.rule("3. A user corrects the answers")
        for interaction_id, fact in corrections:
            agent.correct(interaction_id, fact.correction)
            console.print(f"  corrected [dim]{interaction_id[:8]}[/dim] -> {fact.correction}")
        agent.feedback(corrections[0][0], -1.0, "wrong capital")

        console.rule("4. Everything is in DuckDB")
        assert agent.store is not None
        agent.store.flush()
        print_log(agent.store, console, limit=10)
        console.print(
            "\nThe corrections are learning signals: the learner (`runtime learn`) turns them into "
            "SDFT demonstrations and trains a LoRA adapter."
        )
        console.print(f"[green]Demo finished in {time.perf_counter() - t0:.0f}s.[/green]")
    finally:
        agent.close()


def _show(console: Console, question: str, answer: str, expected: str) -> None:
    mark = "[green]✓[/green]" if contains_answer(answer, expected) else "[red]✗[/red]"
    console.print(f"[bold]Q:[/bold] {question}")
    console.print(f"[bold]A:[/bold] {answer.strip()}  {mark} [dim](expected: {expected})[/dim]")
