"""Learning against forgetting: learning methods on the same facts, the same model, in one run.

Each method of ``--methods`` (default: SFT and the default method, ``rewrite``) trains a fresh LoRA adapter
from the base model on the facts' demonstrations (the direct question -> the demonstration,
``Fact.example()``), with the project defaults (its settings class in ``learners.registry``,
``LoraSettings``) and, unless ``--no-anchors``, the default anchors (``learning.anchors``: the built-in
everyday probe answered by the base model, closest to the facts first). Each adapter is then loaded into one
engine and measured:

- ``new_acc`` / ``paraphrase_acc``: the facts' direct questions / paraphrases, no fact in context;
- ``retention_after``: reading comprehension with the passage in context (``retention_before`` on the base);
- ``retention_drop``: before - after, in percentage points;
- ``kl_to_base``: mean per-token KL(base || tuned) on the retention prompts followed by the base answers;
- with ``--probe`` (format of ``../shared/data/general_probe_dev.jsonl``), ``probe_failures``: the probe checks
  the tuned model fails that the base model passes (collateral damage around the taught facts; nothing trains
  or anchors on them), each prompt alone, greedy, as the gate suite asks them.

Accuracies are greedy, normalised answer containment, in percent.

    python benchmarks/forgetting.py --data ../shared/data/facts_dev.jsonl \\
        --retention ../shared/data/squad_retention_dev.jsonl --facts 16 --retention-questions 100

Writes benchmarks/results/forgetting.json and forgetting.md (or --out and its .md sibling).
Inputs: facts in the format of facts_dev.jsonl, passages in the format of squad_retention_dev.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from benchmarks.overrides import parse_overrides  # noqa: E402
from benchmarks.probe_checks import PROBE_TOKENS, Check, failures, load_probe  # noqa: E402
from learners.anchor_loss import AnchorTraining  # noqa: E402
from learners.anchors import answer_anchors, select_anchors  # noqa: E402
from learners.evaluation import (  # noqa: E402
    Fact,
    QAItem,
    ask,
    kl_to_base,
    load_facts,
    load_questions,
    retention_accuracy,
)
from learners.lora import load_base_model, load_tokenizer  # noqa: E402
from learners.lora_config import LoraSettings  # noqa: E402
from learners.registry import DEFAULT_METHOD, LEARNING_METHODS, get_method  # noqa: E402
from policies.schema import Policy  # noqa: E402
from runtime.config import AnchorsConfig  # noqa: E402
from runtime.engines import TransformersEngine  # noqa: E402
from runtime.yamlfile import describe_validation_error  # noqa: E402

DEFAULT_FACTS = ROOT.parent / "shared" / "data" / "facts_dev.jsonl"
DEFAULT_RETENTION = ROOT.parent / "shared" / "data" / "squad_retention_dev.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
METHODS = tuple(name for name, method in LEARNING_METHODS.items() if method.kind == "trainer")
"""The methods that learn from demonstrations with a train function of their own (``learners.registry``)."""
D = DEFAULT_METHOD

GOALS = {
    f"{D}_paraphrase_at_least_sft": f"{D} paraphrase_acc >= SFT paraphrase_acc",
    f"{D}_retention_drop_small_sft_larger": (
        f"{D} retention_drop <= 1 point while SFT's is larger than that (SFT retention_drop > 1 point)"
    ),
    f"{D}_over_sft_time": f"{D}_over_sft_time <= 2.5",
}


# --- settings ---------------------------------------------------------------------------------------


def method_settings(method: str, overrides: dict[str, Any], common: dict[str, Any]) -> Any:
    """The method's settings (``learners.registry``) with `common` and `overrides`; a bad key is an error."""
    from learners.settings_errors import SettingsError

    try:
        return get_method(method).settings({**common, **overrides})
    except SettingsError as exc:
        raise SystemExit(f"--{method}-set: {exc}") from None


def apply_overrides(settings: Any, overrides: dict[str, Any], what: str) -> Any:
    """A copy of the dataclass ``settings`` with ``overrides`` applied; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(settings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise SystemExit(f"--{what}-set: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return dataclasses.replace(settings, **overrides)


def _settings_dict(settings: Any) -> dict[str, Any]:
    return dataclasses.asdict(settings)


# --- measurement ------------------------------------------------------------------------------------


def _pct(x: float) -> float:
    return round(100.0 * x, 2)


def measure_facts(
    engine: TransformersEngine, facts: list[Fact], adapter: str | None, max_new_tokens: int
) -> dict[str, Any]:
    """Direct and paraphrase accuracy (percent), with every response (for reading what was learned)."""
    direct = ask(engine, [[{"role": "user", "content": f.question}] for f in facts], [f.answer for f in facts],
                 adapter, max_new_tokens=max_new_tokens)
    para_q = [(f, p) for f in facts for p in f.paraphrases]
    para = ask(engine, [[{"role": "user", "content": p}] for _, p in para_q], [f.answer for f, _ in para_q],
               adapter, max_new_tokens=max_new_tokens)
    responses = [
        {"id": f.id, "kind": "direct", "question": f.question, "answer": f.answer, "response": r, "correct": c}
        for f, r, c in zip(facts, direct.responses, direct.correct, strict=True)
    ] + [
        {"id": f.id, "kind": "paraphrase", "question": p, "answer": f.answer, "response": r, "correct": c}
        for (f, p), r, c in zip(para_q, para.responses, para.correct, strict=True)
    ]
    return {
        "new_acc": _pct(direct.accuracy),
        "paraphrase_acc": _pct(para.accuracy if para_q else direct.accuracy),
        "paraphrases": len(para_q),
        "responses": responses,
    }


def probe_failures(
    engine: TransformersEngine, probe: list[Check], adapter: str | None, base_failing: Collection[str] = ()
) -> list[dict[str, str]]:
    """The probe checks `adapter` (``None``: the base model) fails, leaving out those the base model fails."""
    found = failures(engine, probe, PROBE_TOKENS, Policy().refusal_markers, adapter=adapter)
    return [f for f in found if f["name"] not in base_failing]


def _bits(correct: list[bool]) -> str:
    """Per-question correctness as a string of 0/1, in file order (for paired comparisons)."""
    return "".join("1" if c else "0" for c in correct)


def _log(msg: str) -> None:
    print(f"[forgetting {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _progress(method: str):
    def fn(step: int, total: int, logs: dict[str, float]) -> None:
        if step and (step == total or step % 10 == 0):
            loss = logs.get("loss")
            _log(f"{method}: step {step}/{total}" + (f" loss {loss:.4f}" if loss is not None else ""))

    return fn


def _train(method: str, model_dir: Path, facts: list[Fact], out_dir: Path, settings: Any, lora: LoraSettings,
           anchors: AnchorTraining | None):
    examples = [f.example() for f in facts]
    train = get_method(method).load_trainer()
    return train(model_dir, examples, out_dir, settings=settings, lora=lora, progress_callback=_progress(method),
                 anchors=anchors)


def anchor_settings(overrides: dict[str, Any]) -> AnchorsConfig:
    """``learning.anchors`` with the ``--anchors-set`` overrides; a bad key or value is an error."""
    try:
        return AnchorsConfig.model_validate(overrides)
    except ValidationError as exc:
        raise SystemExit(
            describe_validation_error(exc, "--anchors-set", {}, AnchorsConfig, title="bad learning.anchors override")
        ) from None


def default_anchors(model_dir: Path, facts: list[Fact], settings: AnchorsConfig | None = None) -> AnchorTraining:
    """The anchors of a fresh store (the built-in probe; as many and in the order the runtime takes for an update
    of ``len(facts)`` examples), answered by the base model, with ``learning.anchors``' loss, weight (that of an
    update of that size) and batch (`settings`: the defaults unless given)."""
    settings = settings or AnchorsConfig()
    chosen = select_anchors(
        None, settings, exclude=[f.example().prompt for f in facts], examples=len(facts)
    ).anchors
    model, tokenizer = load_base_model(model_dir), load_tokenizer(model_dir)
    answer_anchors(model, tokenizer, chosen, max_new_tokens=settings.max_new_tokens)
    return AnchorTraining(
        chosen, loss=settings.loss_for(len(facts)), weight=settings.weight_for(len(facts)),
        batch_size=settings.batch_size, balance=settings.balance,
    )


def _source_state() -> dict[str, Any]:
    """Which code ran: the commit, whether the learners were modified, and a hash of each learner file."""
    state: dict[str, Any] = {}
    try:
        state["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "learners"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split("\n")
        state["learners_modified"] = sorted(line[3:] for line in dirty if line.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    for name in ("rewrite_trainer.py", "sdft_trainer.py", "sft_trainer.py", "anchor_loss.py", "lora.py", "common.py"):
        path = ROOT / "learners" / name
        if path.exists():
            state[f"sha256_learners/{name}"] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return state


# --- goals and report -------------------------------------------------------------------------------


def evaluate_goals(results: dict[str, dict[str, Any]], time_ratio: float | None) -> dict[str, dict[str, Any]]:
    """Each goal with its rule and ``met`` (``None`` when a method it needs was not run)."""
    sft, default = results.get("sft"), results.get(D)
    both = sft is not None and default is not None
    met = {
        f"{D}_paraphrase_at_least_sft": (default["paraphrase_acc"] >= sft["paraphrase_acc"]) if both else None,
        f"{D}_retention_drop_small_sft_larger": (
            default["retention_drop"] <= 1.0 and sft["retention_drop"] > 1.0 if both else None
        ),
        f"{D}_over_sft_time": (time_ratio <= 2.5) if time_ratio is not None else None,
    }
    values = {
        f"{D}_paraphrase_at_least_sft": {m: r["paraphrase_acc"] for m, r in results.items()},
        f"{D}_retention_drop_small_sft_larger": {m: r["retention_drop"] for m, r in results.items()},
        f"{D}_over_sft_time": time_ratio,
    }
    return {key: {"rule": GOALS[key], "met": met[key], "values": values[key]} for key in GOALS}


def render_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    base = result["base"]
    probed = base.get("probe_failures") is not None
    lines = [
        f"Model `{cfg['model']}`, {cfg['facts']} facts ({cfg['paraphrases']} paraphrases), "
        f"{cfg['retention_questions']} retention questions, seed {cfg['seed']}, {cfg['threads']} thread(s). "
        f"Base: direct {base['new_acc']:.1f}, paraphrase {base['paraphrase_acc']:.1f}, "
        f"retention {base['retention']:.1f}."
        + (f" Probe `{Path(cfg['probe']).name}`: {cfg['probe_checks']} checks, "
           f"{len(base['probe_failures'])} failed by the base model (not counted after)." if probed else ""),
        "",
        "| method | direct % | paraphrase % | retention before | retention after | drop (pts) "
        "| KL to base |" + (" probe checks broken |" if probed else "") + " s / example | train s |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if probed else ""),
    ]
    for method in METHODS:
        r = result.get(method)
        if r is None:
            continue
        lines.append(
            f"| {method} | {r['new_acc']:.1f} | {r['paraphrase_acc']:.1f} | {r['retention_before']:.1f} "
            f"| {r['retention_after']:.1f} | {r['retention_drop']:.1f} | {r['kl_to_base']:.4f} |"
            + (f" {len(r['probe_failures'])} |" if probed else "")
            + f" {r['sec_per_example']:.2f} | {r['train_seconds']:.0f} |"
        )
    ratio = result.get(f"{D}_over_sft_time")
    if ratio is not None:
        lines += ["", f"{D} / SFT train time: {ratio:.2f}x"]
    lines += ["", "| goal | met |", "|---|---|"]
    for goal in result["goals"].values():
        met = goal["met"]
        lines.append(f"| {goal['rule']} | {'n/a' if met is None else ('yes' if met else 'no')} |")
    lines += ["", f"Total wall-clock: {result['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_FACTS, help="facts JSONL (format of facts_dev.jsonl)")
    parser.add_argument("--retention", type=Path, default=DEFAULT_RETENTION,
                        help="passages JSONL (format of squad_retention_dev.jsonl)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias or local model directory")
    parser.add_argument("--facts", type=int, default=16, help="the first N facts (0 = all)")
    parser.add_argument("--retention-questions", type=int, default=100, help="the first N retention questions")
    parser.add_argument("--seed", type=int, default=0, help="training seed of both methods")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (training and evaluation)")
    parser.add_argument("--methods", default=f"sft,{D}", help=f"comma-separated subset of {','.join(METHODS)}")
    for name in METHODS:
        parser.add_argument(f"--{name}-set", action="append", default=[], metavar="KEY=VALUE",
                            help=f"learning.{name} override")
    parser.add_argument("--anchors", action=argparse.BooleanOptionalAction, default=True,
                        help="train with the default anchors (learning.anchors), as every update does")
    parser.add_argument("--anchors-set", action="append", default=[], metavar="KEY=VALUE",
                        help="learning.anchors override, e.g. probe_order=farthest")
    parser.add_argument("--lora-set", action="append", default=[], metavar="KEY=VALUE", help="LoraSettings override")
    parser.add_argument("--probe", type=Path, default=None,
                        help="checks JSONL (format of general_probe_dev.jsonl): count the checks each update breaks")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length for every accuracy")
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
    parser.add_argument("--out", type=Path, default=RESULTS / "forgetting.json")
    args = parser.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise SystemExit(f"--methods: choose from {','.join(METHODS)}, got {args.methods!r}")
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    common = {"seed": args.seed, "torch_threads": args.threads}
    overrides = {m: parse_overrides(getattr(args, f"{m}_set"), m) for m in METHODS}
    settings = {m: method_settings(m, overrides[m], common) for m in methods}
    lora = apply_overrides(LoraSettings(), parse_overrides(args.lora_set, "lora"), "lora")
    anchors_config = anchor_settings(parse_overrides(args.anchors_set, "anchors"))

    facts = load_facts(args.data, args.facts or None)
    retention: list[QAItem] = load_questions(args.retention, args.retention_questions or None)
    if not facts:
        raise SystemExit(f"{args.data}: no facts")
    if not retention:
        raise SystemExit(f"{args.retention}: no retention questions")
    probe = load_probe(args.probe) if args.probe else []
    if args.probe and not probe:
        raise SystemExit(f"{args.probe}: no probe checks")

    wall = time.perf_counter()
    source = _source_state()  # before training: the code that runs
    _log(f"{len(facts)} facts, {len(retention)} retention questions, methods {methods}, {args.threads} thread(s)")
    engine = TransformersEngine(args.model, num_threads=args.threads)
    ev = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    results: dict[str, dict[str, Any]] = {}
    try:
        t = time.perf_counter()
        base_ret = retention_accuracy(engine, retention, None, **ev)
        base_facts = measure_facts(engine, facts, None, args.max_new_tokens)
        base_probe = probe_failures(engine, probe, None) if probe else []
        base = {
            "new_acc": base_facts["new_acc"],
            "paraphrase_acc": base_facts["paraphrase_acc"],
            "retention": _pct(base_ret.accuracy),
            "retention_f1": _pct(base_ret.mean_f1),
            "retention_correct": _bits(base_ret.correct),
            "eval_seconds": round(time.perf_counter() - t, 1),
            "probe_failures": base_probe if probe else None,
            "responses": base_facts["responses"],
        }
        _log("base: " + ", ".join(f"{k} {base[k]}" for k in ("new_acc", "paraphrase_acc", "retention")))
        anchors = default_anchors(engine.model_path, facts, anchors_config) if args.anchors else None
        with tempfile.TemporaryDirectory(prefix="forgetting-") as tmp:
            for method in methods:
                _log(f"{method}: training on {len(facts)} examples" + (" with anchors" if anchors else ""))
                res = _train(method, engine.model_path, facts, Path(tmp) / method, settings[method], lora, anchors)
                _log(f"{method}: trained in {res.train_seconds:.0f} s ({res.num_steps} steps)")
                t = time.perf_counter()
                engine.load_adapter(method, res.adapter_dir)
                try:
                    learned = measure_facts(engine, facts, method, args.max_new_tokens)
                    after = retention_accuracy(engine, retention, method, **ev)
                    kl = kl_to_base(engine, retention, base_ret.responses, method, batch_size=args.batch_size)
                    broken = probe_failures(engine, probe, method, {f["name"] for f in base_probe}) if probe else None
                finally:
                    engine.unload_adapter(method)
                losses = [m["loss"] for m in res.metrics if "loss" in m]
                results[method] = {
                    "new_acc": learned["new_acc"],
                    "paraphrase_acc": learned["paraphrase_acc"],
                    "retention_before": base["retention"],
                    "retention_after": _pct(after.accuracy),
                    "retention_drop": round(base["retention"] - _pct(after.accuracy), 2),
                    "retention_f1_after": _pct(after.mean_f1),
                    "retention_correct": _bits(after.correct),
                    "retention_answers_changed": sum(
                        a != b for a, b in zip(base_ret.responses, after.responses, strict=True)
                    ),
                    "kl_to_base": kl,
                    "probe_failures": broken,
                    "train_seconds": round(res.train_seconds, 2),
                    "sec_per_example": round(res.train_seconds / res.num_examples, 3),
                    "num_steps": res.num_steps,
                    "first_loss": losses[0] if losses else None,
                    "last_loss": losses[-1] if losses else None,
                    "eval_seconds": round(time.perf_counter() - t, 1),
                    "settings": _settings_dict(settings[method]),
                    "lora": _settings_dict(lora),
                    "responses": learned["responses"],
                }
                _log(f"{method}: " + ", ".join(
                    f"{k} {results[method][k]}" for k in
                    ("new_acc", "paraphrase_acc", "retention_after", "retention_drop", "kl_to_base")
                ) + (f", probe checks broken {len(broken)}" if broken is not None else ""))
    finally:
        engine.close()

    ratio = None
    if "sft" in results and D in results and results["sft"]["train_seconds"] > 0:
        ratio = round(results[D]["train_seconds"] / results["sft"]["train_seconds"], 3)
    result: dict[str, Any] = {
        **results,
        "base": base,
        f"{D}_over_sft_time": ratio,
        "goals": evaluate_goals(results, ratio),
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "config": {
            "model": args.model,
            "model_path": str(engine.model_path),
            "data": str(args.data),
            "retention": str(args.retention),
            "facts": len(facts),
            "paraphrases": base_facts["paraphrases"],
            "retention_questions": len(retention),
            "probe": str(args.probe) if args.probe else None,
            "probe_checks": len(probe),
            "methods": methods,
            "seed": args.seed,
            "threads": args.threads,
            "max_new_tokens": args.max_new_tokens,
            "overrides": {**overrides, "lora": parse_overrides(args.lora_set, "lora")},
            "anchors": (
                {**anchors_config.model_dump(mode="json"), "count_used": len(anchors.anchors),
                 "probe_order_used": anchors_config.order_for(len(facts)),
                 "loss_used": anchors.loss, "weight_used": anchors.weight} if anchors else None
            ),
            "units": "accuracies in percent; retention_drop in percentage points (positive = forgot); "
            "kl_to_base in nats per token",
            "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}, "
            f"device {engine.device}",
            "source": source,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = render_table(result)
    title = f"# Forgetting: {', '.join(methods)}" + (" (with anchors)" if anchors else " (without anchors)")
    args.out.with_suffix(".md").write_text(title + "\n\n" + table)
    print(table)
    return result


if __name__ == "__main__":
    main()
