"""`runtime demo`: the main job on the embedded default model, told step by step.

An agent on the default model is asked about facts it cannot know (they are fictional) and answers
wrongly; a user corrects it; one learning cycle trains a LoRA adapter in a worker process; the new adapter
serves, and the same questions, paraphrases of them, and a reading-comprehension question with a passage
in context are asked again. The log is shown from DuckDB.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.console import Console
from rich.panel import Panel

from cli.common import ConfigOption, console, load, training_progress
from cli.log_commands import print_log
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


PASSAGE = (
    "The Harrow Street library opened in 1921. Its first librarian was Agnes Mowbray, who bought the "
    "building's famous brass clock from a ship's chandler in Leith."
)
PASSAGE_QUESTION = "Who was the first librarian of the Harrow Street library?"
PASSAGE_ANSWER = "Agnes Mowbray"


def run_demo(config: RuntimeConfig, console: Console, *, method: str | None = None) -> None:
    """Run the demo in a fresh ``<data_dir>/demo`` (its own store and adapters)."""
    from agent import LearningAgent  # LangGraph: imported when the demo runs, not for every command

    demo_dir = config.data_dir / "demo"
    shutil.rmtree(demo_dir, ignore_errors=True)
    config = config.model_copy(deep=True)
    config.data_dir = demo_dir
    config.store.path = None
    config.learning.adapters_dir = None
    method = method or config.learning.method

    console.print(Panel.fit("[bold]learning-runtime demo[/bold]: an agent that learns from its own use"))
    t0 = time.perf_counter()
    with console.status(f"Loading {config.model.name} (the first run converts the GGUF once, ~30 s)..."):
        agent = LearningAgent.from_config(config, max_new_tokens=40)
    console.print(f"[green]✓[/green] model ready in {time.perf_counter() - t0:.1f}s; log at {config.store_path}")
    try:
        console.rule("1. Questions about facts it cannot know (they are fictional)")
        corrections = []
        for i, fact in enumerate(DEMO_FACTS):
            result = agent.invoke(fact.question, thread_id=f"demo-{i}")
            _show(console, fact.question, result.text, fact.answer, result.adapter)
            corrections.append((result.interaction_id, fact))
        rc_before = agent.invoke(_passage_prompt(), thread_id="demo-reading")
        _show(console, PASSAGE_QUESTION + " [dim](passage in context)[/dim]", rc_before.text, PASSAGE_ANSWER,
              rc_before.adapter)

        console.rule("2. A user corrects the wrong answers")
        for interaction_id, fact in corrections:
            agent.correct(interaction_id, fact.correction)
            console.print(f"  corrected [dim]{interaction_id[:8]}[/dim] -> {fact.correction}")

        console.rule(f"3. A learning cycle ({method}) in a low-priority worker process")
        with training_progress(console, f"  {method}") as progress:
            assert agent.service is not None
            cycle = agent.service.learn_now(method, progress=progress, phase=progress.phase)
        console.print(f"  {cycle.status}: {cycle.message}  [dim]{cycle.counts}[/dim]")
        if cycle.status != "activated":
            return
        console.print(f"  serving adapter: [bold]{agent.engine.active_adapter}[/bold]")

        console.rule("4. The same questions, paraphrases, and reading comprehension, on the new adapter")
        learned = 0
        for i, fact in enumerate(DEMO_FACTS):
            for question in (fact.question, fact.paraphrase):
                result = agent.invoke(question, thread_id=f"demo-after-{i}")
                learned += _show(console, question, result.text, fact.answer, result.adapter)
        rc_after = agent.invoke(_passage_prompt(), thread_id="demo-reading-after")
        _show(console, PASSAGE_QUESTION + " [dim](passage in context)[/dim]", rc_after.text, PASSAGE_ANSWER,
              rc_after.adapter)
        console.print(f"  answered rightly: {learned}/{2 * len(DEMO_FACTS)} (questions and paraphrases)")

        console.rule("5. Everything is in DuckDB")
        assert agent.store is not None
        print_log(agent.store, console, limit=8)
        console.print(
            f"[green]Demo finished in {time.perf_counter() - t0:.0f}s.[/green] "
            f"Look again with: RUNTIME_DATA_DIR={demo_dir} runtime log   (and the same with `runtime adapters "
            "list`)"
        )
    finally:
        agent.close()


def _passage_prompt() -> str:
    return f"Read the passage and answer the question.\n\nPassage: {PASSAGE}\n\nQuestion: {PASSAGE_QUESTION}"


def _show(console: Console, question: str, answer: str, expected: str, adapter: str | None) -> bool:
    right = contains_answer(answer, expected)
    mark = "[green]✓[/green]" if right else "[red]✗[/red]"
    console.print(f"[bold]Q:[/bold] {question}")
    console.print(
        f"[bold]A:[/bold] {' '.join(answer.split())}  {mark} [dim](expected: {expected}; {adapter or 'base'})[/dim]"
    )
    return right


def demo_cmd(
    config: ConfigOption = None,
    method: Annotated[
        str | None, typer.Option("--method", "-m", help="a learning method, e.g. rewrite, sdft, sft (default: config)")
    ] = None,
) -> None:
    """The main job on the embedded default: ask, be corrected, learn, and answer again."""
    run_demo(load(config), console, method=method)
