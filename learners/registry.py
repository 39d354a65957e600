"""The learning methods: one registry entry each, mapping a name to its settings, its training and its checks.

Everything that asks "which methods are there, what settings does this one take, how does it train" asks
here: the configuration loader (settings are checked when ``runtime.yaml`` loads, with file, line and key),
the learning cycle, the worker, ``auto``'s candidates, the server's ``POST /admin/learn`` and the CLI.

=========  =============================================================================================
method     what runs
=========  =============================================================================================
rewrite    the model restates each demonstration in its own words, then LoRA SFT on that (Yang et al.,
           2024); **the default**, measured best at the default model's scale
sdft       on-policy self-distillation (Shenfeld et al., 2026) on TRL's ``SDFTTrainer``
sft        LoRA SFT on the demonstrations (the baseline)
auto       trains candidates of the methods above and keeps the one that learns with the least forgetting
seal       knowledge from documents through self-edits (Zweiger et al., 2025)
=========  =============================================================================================

Adding a method is one entry in :data:`LEARNING_METHODS`: its settings class (``x_config.py``) and, for a
method that learns from demonstrations, its train function (``x_trainer.py``) with
:func:`learners.sft_trainer.train_sft`'s signature.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import TypeAdapter

from learners.auto_config import AutoSettings
from learners.lora_config import LoraSettings
from learners.rewrite_config import RewriteSettings
from learners.sdft_config import SDFTSettings
from learners.seal_config import SEALSettings, seal_settings_from_dict
from learners.settings_errors import Problem, SettingsError, validate_dataclass
from learners.sft_config import SFTSettings

__all__ = [
    "DEFAULT_METHOD",
    "LEARNING_METHODS",
    "LearningMethod",
    "SettingsError",
    "get_method",
    "method_sections",
    "scale_settings",
    "validate_learning",
]

MethodKind = Literal["trainer", "selection", "documents"]
"""``trainer``: learns from demonstrations with one train function in the worker; ``selection``: trains
candidates of trainer methods and keeps one (``auto``); ``documents``: learns documents (``seal``)."""


@dataclass(frozen=True)
class LearningMethod:
    """One learning method.

    Attributes:
        name: What ``learning.method`` and ``--method`` say; also its settings section (``learning.<name>``) and
            the prefix of the adapters it trains.
        summary: One line on what runs.
        settings_class: The settings dataclass of ``learning.<name>``.
        kind: How the cycle runs it (:data:`MethodKind`).
        trainer: For a ``trainer`` method, ``"module:function"`` of its train function.
        parse: Builds the settings from the YAML section (default: type-checked ``settings_class(**section)``);
            raises :class:`SettingsError`.
    """

    name: str
    summary: str
    settings_class: type
    kind: MethodKind
    trainer: str | None = None
    parse: Callable[[Mapping[str, Any]], Any] | None = None

    def settings(self, section: Mapping[str, Any] | None) -> Any:
        """The method's settings from its YAML section (``learning.<name>``); raises :class:`SettingsError`."""
        if self.parse is not None:
            return self.parse(section or {})
        return validate_dataclass(self.settings_class, section)

    def load_trainer(self) -> Callable[..., Any]:
        """The train function of a ``trainer`` method (imported on first use: it pulls in TRL)."""
        if self.trainer is None:
            raise TypeError(f"learning method {self.name!r} ({self.kind}) has no train function of its own")
        module, _, function = self.trainer.partition(":")
        return getattr(importlib.import_module(module), function)


def _parse_auto(section: Mapping[str, Any]) -> AutoSettings:
    settings = validate_dataclass(AutoSettings, section)
    problems: list[Problem] = []
    for i, candidate in enumerate(settings.candidates):
        loc = ("candidates", str(i))
        if not isinstance(candidate, Mapping):
            problems.append((loc, "expected a mapping with `method` and that method's settings"))
            continue
        name = candidate.get("method")
        method = LEARNING_METHODS.get(str(name))
        if method is None or method.kind != "trainer":
            allowed = ", ".join(n for n, m in LEARNING_METHODS.items() if m.kind == "trainer")
            problems.append(((*loc, "method"), f"must be one of {allowed}, got {name!r}"))
            continue
        try:
            method.settings({k: v for k, v in candidate.items() if k != "method"})
        except SettingsError as exc:
            problems += [((*loc, *sub), msg) for sub, msg in exc.problems]
    if problems:
        raise SettingsError(problems)
    return settings


LEARNING_METHODS: dict[str, LearningMethod] = {
    method.name: method
    for method in (
        LearningMethod(
            "rewrite", "the model restates each demonstration in its own words, then LoRA SFT on that",
            RewriteSettings, "trainer", "learners.rewrite_trainer:train_rewrite",
        ),
        LearningMethod(
            "sdft", "on-policy self-distillation: the model with the demonstration in context teaches the model "
            "without it, on its own rollouts", SDFTSettings, "trainer", "learners.sdft_trainer:train_sdft",
        ),
        LearningMethod(
            "sft", "LoRA SFT on the demonstrations", SFTSettings, "trainer", "learners.sft_trainer:train_sft"
        ),
        LearningMethod(
            "auto", "trains candidates of the methods above and keeps the one that learns with the least "
            "forgetting", AutoSettings, "selection", parse=_parse_auto,
        ),
        LearningMethod(
            "seal", "learns documents through self-edits the model writes and keeps when they help",
            SEALSettings, "documents", parse=seal_settings_from_dict,
        ),
    )
}
"""Every learning method, by name."""

DEFAULT_METHOD = "rewrite"
"""What ``learning.method`` is unless set: measured best at the default model's scale (README, "Methods")."""


def get_method(name: str) -> LearningMethod:
    """The method called `name`; ``ValueError`` naming the methods there are."""
    method = LEARNING_METHODS.get(name)
    if method is None:
        raise ValueError(f"learning method {name!r} is not available; use one of {', '.join(LEARNING_METHODS)}")
    return method


_RENAMED = {
    "variant": "the rewrite method is its own method now: write `learning.method: rewrite` and move these settings "
    "to `learning.rewrite` (rewrite_prompt_template -> prompt_template, rewrite_max_new_tokens -> max_new_tokens, "
    "rewrite_temperature -> temperature, rewrite_check -> check, prompts_per_step -> batch_size); "
    "`learning.sdft` is on-policy SDFT, without `variant`",
}


def validate_learning(learning: Any) -> list[Problem]:
    """Every problem of the ``learning`` section's method settings, by key path from the top of the file.

    Checks ``learning.method``, each method's section (``learning.rewrite``, ``learning.sdft``, ...) against its
    settings class, ``learning.lora``, and that no other key is there.
    """
    problems: list[Problem] = []
    if learning.method not in LEARNING_METHODS:
        problems.append(
            (("learning", "method"), f"unknown learning method {learning.method!r}; use one of "
             f"{', '.join(LEARNING_METHODS)}")
        )
    sections = method_sections(learning)
    for name, section in (learning.model_extra or {}).items():
        if name not in LEARNING_METHODS:
            fields = sorted([*type(learning).model_fields, *LEARNING_METHODS])
            problems.append((("learning", name), f"unknown key (allowed here: {', '.join(fields)})"))
        elif not isinstance(section, Mapping):
            problems.append((("learning", name), f"expected a mapping of {name} settings, got {section!r}"))
    for name, section in sections.items():
        if name == "sdft" and "variant" in section:
            problems.append((("learning", "sdft", "variant"), _RENAMED["variant"]))
            continue
        try:
            LEARNING_METHODS[name].settings(section)
        except SettingsError as exc:
            problems += [(("learning", name, *loc), msg) for loc, msg in exc.problems]
    try:
        validate_dataclass(LoraSettings, learning.lora)
    except SettingsError as exc:
        problems += [(("learning", "lora", *loc), msg) for loc, msg in exc.problems]
    return problems


def method_sections(learning: Any) -> dict[str, dict[str, Any]]:
    """The YAML section of every method (``{}`` where the file has none), by method name."""
    extra = learning.model_extra or {}
    return {name: dict(extra.get(name) or {}) if isinstance(extra.get(name), Mapping) else {}
            for name in LEARNING_METHODS}


def settings_schema() -> dict[str, Any]:
    """JSON schemas of every method's settings section and of ``learning.lora``, by section name."""
    schemas = {name: TypeAdapter(m.settings_class).json_schema() for name, m in LEARNING_METHODS.items()}
    schemas["lora"] = TypeAdapter(LoraSettings).json_schema()
    return schemas


def scale_settings(method: str, settings: Mapping[str, Any], learning_rate_factor: float,
                   epochs_factor: float) -> dict[str, Any]:
    """A ``trainer`` method's settings section with the learning rate and epochs scaled (a repair attempt)."""
    if learning_rate_factor == 1.0 and epochs_factor == 1.0:
        return dict(settings)
    resolved = get_method(method).settings(settings)
    scaled = {
        **settings,
        "learning_rate": resolved.learning_rate * learning_rate_factor,
        "num_epochs": resolved.num_epochs * epochs_factor,
        "min_steps": round(resolved.min_steps * epochs_factor),
    }
    if resolved.min_steps_learning_rate is not None:
        scaled["min_steps_learning_rate"] = resolved.min_steps_learning_rate * learning_rate_factor
    return scaled


def settings_dict(method: str, section: Mapping[str, Any] | None) -> dict[str, Any]:
    """A method's settings, validated and complete (defaults filled in), as plain data for a run's record."""
    return asdict(get_method(method).settings(section))
