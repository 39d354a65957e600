"""How the CPU is shared between serving and learning.

The learner's worker process takes half the cores and the serving engine the rest, so that a learning
cycle never oversubscribes the machine: with more threads than free cores, PyTorch's thread pool spins
while waiting for a busy core and a 1-second answer can take a minute.
"""

from __future__ import annotations

import os


def learner_cpu_threads() -> int:
    """Threads for a learning worker on CPU: half the cores, at least one."""
    return max(1, (os.cpu_count() or 2) // 2)


def serving_cpu_threads() -> int:
    """Threads for the serving engine on CPU: the cores the learner leaves, at least one."""
    return max(1, (os.cpu_count() or 2) - learner_cpu_threads())
