"""Demonstrations and a LoRA shape shared by the learners' tests on the tiny model."""

from __future__ import annotations

from learners import DemoExample, LoraSettings

EXAMPLES = [
    DemoExample.from_question("What is the capital of France?", "Paris is the capital.", source_id="s1"),
    DemoExample.from_question("Who founded Melbexquin?", "Melbexquin was founded by Kasgri Renkasnor.", source_id="s2"),
]
"""A fact the tiny model's corpus holds and one it cannot (its answer adds two new words)."""

LORA = LoraSettings(r=8, alpha=16)
