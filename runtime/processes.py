"""Process helpers: recognising a ``spawn`` child that is re-importing the main script."""

from __future__ import annotations

import multiprocessing

MAIN_GUARD_HINT = (
    "learning runs in a worker process started with multiprocessing's 'spawn' method, which imports your main "
    "script again in the child; code at the top level of that script runs again there. Put the code that "
    'builds the agent or runs learning under `if __name__ == "__main__":` (see the README, "Embedding '
    'LearningAgent").'
)


class StartedWhileSpawning(RuntimeError):
    """The runtime was created while a ``spawn`` child process was importing the main script."""


def spawn_bootstrapping() -> bool:
    """Whether this process is a ``spawn`` child still importing the parent's main script."""
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def check_not_spawning(what: str) -> None:
    """Refuse to create `what` (a store, an engine) in a ``spawn`` child that is re-running the main script."""
    if spawn_bootstrapping():
        raise StartedWhileSpawning(f"{what} was created while a worker process was starting: {MAIN_GUARD_HINT}")
