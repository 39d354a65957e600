"""SDFT variants against SFT: paraphrase accuracy vs retention drop, as a front over learning rates.

Trains SFT and each selected SDFT variant (a named dict of ``SDFTSettings`` overrides, see ``VARIANTS``)
for every learning rate x epochs x seed, evaluates each adapter with ``learners.evaluation`` (facts asked
without context: direct question and paraphrases; reading-comprehension retention with the passage in
context; KL(base || adapter) on the retention prompts), and appends every run to a JSONL log as it goes.
Runs already in the log (same variant settings, lr, epochs, seed and data) are skipped, so a sweep can be
resumed or extended. At the end it writes all runs of this protocol and each method's Pareto front
(paraphrase accuracy up, retention drop down; seeds averaged) to ``--out``.json, a table to ``--out``.md
and a plot to ``--out``.png.

    python benchmarks/sdft_front.py                                   # the protocol: all facts, 300 questions, 2 seeds
    python benchmarks/sdft_front.py --facts 8 --retention-questions 100 --seeds 1 --lrs 5e-4 1e-3 \\
        --variants sft skip0 rewrite                                  # a reduced exploration

The protocol is called ``"full"`` when it uses every fact, 300 retention questions (or all there are) and every
configuration in the log was run with at least 2 seeds, and ``"reduced"`` otherwise; the JSON records which,
with its parameters and the seeds each configuration has.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import asdict
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from learners.evaluation import (  # noqa: E402
    ask,
    fact_accuracy,
    kl_to_base,
    load_facts,
    load_questions,
    retention_accuracy,
)
from learners.lora_config import LoraSettings  # noqa: E402
from learners.rewrite_config import RewriteSettings  # noqa: E402
from learners.rewrite_trainer import train_rewrite  # noqa: E402
from learners.sdft_config import (  # noqa: E402
    DIRECT_TEACHER_PROMPT_TEMPLATE,
    TRL_TEACHER_PROMPT_TEMPLATE,
    SDFTSettings,
)
from learners.sdft_trainer import train_sdft  # noqa: E402
from learners.sft_config import SFTSettings  # noqa: E402
from learners.sft_trainer import train_sft  # noqa: E402
from runtime.engines import TransformersEngine  # noqa: E402
from runtime.jsonl import read_jsonl  # noqa: E402
from runtime.models import resolve_model  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "facts_dev.jsonl"
DEFAULT_RETENTION = REPO.parent / "shared" / "data" / "squad_retention_dev.jsonl"
RESULTS = REPO / "benchmarks" / "results"

#: SFT is the baseline; ``rewrite*`` entries are overrides of ``RewriteSettings`` (the ``rewrite`` method,
#: recorded as "SDFT, variant rewrite" before it became a method of its own); every other entry is a dict of
#: overrides on ``SDFTSettings.official()`` (the paper's on-policy setup: EMA teacher 0.01, skip 3 tokens,
#: official template, forward KL, temperature 1, 32 tokens), which were the learner's defaults when the
#: recorded runs were made.
_SKIP0 = {"num_loss_tokens_to_skip": 0}
_DIRECT = {"teacher_prompt_template": DIRECT_TEACHER_PROMPT_TEMPLATE}
VARIANTS: dict[str, dict[str, Any] | None] = {
    "sft": None,
    "official": {},
    "skip0": dict(_SKIP0),
    "skip0_base": {**_SKIP0, "teacher_kind": "base"},
    "skip0_trl": {**_SKIP0, "teacher_prompt_template": TRL_TEACHER_PROMPT_TEMPLATE},
    "skip0_direct": {**_SKIP0, **_DIRECT},
    "skip0_base_direct": {**_SKIP0, **_DIRECT, "teacher_kind": "base"},
    "skip0_base_trl": {**_SKIP0, "teacher_kind": "base", "teacher_prompt_template": TRL_TEACHER_PROMPT_TEMPLATE},
    "skip0_ema05": {**_SKIP0, "ema_rate": 0.05},
    "skip0_t07": {**_SKIP0, "temperature": 0.7},
    "skip0_len16": {**_SKIP0, "max_completion_length": 16},
    "skip0_jsd": {**_SKIP0, "distillation_alpha": 0.5},
    "skip0_reverse": {**_SKIP0, "distillation_alpha": 1.0},
    "gen_teacher": {**_SKIP0, "generate_from_teacher": True},
    "gen_teacher_base": {**_SKIP0, "generate_from_teacher": True, "teacher_kind": "base"},
    "gen_teacher_direct": {**_SKIP0, **_DIRECT, "generate_from_teacher": True},
    "gen_teacher_direct_base": {**_SKIP0, **_DIRECT, "generate_from_teacher": True, "teacher_kind": "base"},
    "mix50_direct": {**_SKIP0, **_DIRECT, "teacher_rollout_fraction": 0.5},
    "mix50": {**_SKIP0, "teacher_rollout_fraction": 0.5},
    "mix50_base": {**_SKIP0, "teacher_rollout_fraction": 0.5, "teacher_kind": "base"},
    "rewrite": {},
    "rewrite_nocheck": {"check": "none"},
    "rewrite_kl05": {"kl_anchor": 0.5},
    "warmup3_gen_teacher_direct_base": {
        **_SKIP0, **_DIRECT, "generate_from_teacher": True, "teacher_kind": "base", "sft_warmup_epochs": 3,
    },
}

#: Fields kept out of a run's identity (they do not change what is trained).
_IDENTITY_EXCLUDE = {"torch_threads", "use_cpu", "bf16"}


Settings = SFTSettings | SDFTSettings | RewriteSettings

#: How the rewrite variant's knobs were named in ``SDFTSettings`` (the logged runs) and are named now.
_OLD_REWRITE_FIELDS = {
    "rewrite_prompt_template": "prompt_template", "rewrite_max_new_tokens": "max_new_tokens",
    "rewrite_temperature": "temperature", "rewrite_check": "check", "prompts_per_step": "batch_size",
}


def _method_of(variant: str) -> str:
    return "sft" if variant == "sft" else ("rewrite" if variant.startswith("rewrite") else "sdft")


def _settings_for(variant: str, lr: float, epochs: float, seed: int, threads: int) -> Settings:
    overrides = VARIANTS[variant]
    common = {"learning_rate": lr, "num_epochs": epochs, "seed": seed, "torch_threads": threads, "use_cpu": True}
    method = _method_of(variant)
    if method == "sft":
        return SFTSettings(**common)
    if method == "rewrite":
        return RewriteSettings(**{**(overrides or {}), **common})
    return SDFTSettings.official(**{**(overrides or {}), **common})


def _run_key(variant: str, settings: Settings, data_key: dict[str, Any]) -> str:
    fields = {k: v for k, v in asdict(settings).items() if k not in _IDENTITY_EXCLUDE}
    blob = json.dumps({"variant": variant, "settings": fields, "data": data_key}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _logged_key(record: dict[str, Any]) -> str:
    """A logged run's key under today's settings classes.

    A settings field added after the run was logged takes its default, which by this project's rule leaves
    the method as it was (e.g. ``kl_anchor=0``), so the run still counts as done rather than being repeated.
    """
    method = _method_of(record["variant"])
    cls = {"sft": SFTSettings, "rewrite": RewriteSettings, "sdft": SDFTSettings}[method]
    values = {_OLD_REWRITE_FIELDS.get(k, k) if method == "rewrite" else k: v for k, v in record["settings"].items()}
    known = {f.name for f in dataclass_fields(cls)}
    settings = cls(**{k: v for k, v in values.items() if k in known})
    return _run_key(record["variant"], settings, record["data"])


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [row for _n, row in read_jsonl(path)]


def _evaluate(engine: TransformersEngine, facts, items, adapter: str | None, base_responses=None) -> dict[str, Any]:
    start = time.perf_counter()
    acc = fact_accuracy(engine, facts, adapter)
    ret = retention_accuracy(engine, items, adapter)
    out: dict[str, Any] = {
        "direct_acc": acc["new_acc"],
        "paraphrase_acc": acc["paraphrase_acc"],
        "retention_acc": ret.accuracy,
        "retention_f1": ret.mean_f1,
        "retention_responses": ret.responses,
    }
    if base_responses is not None:
        out["kl_to_base"] = kl_to_base(engine, items, base_responses, adapter)
    out["eval_seconds"] = time.perf_counter() - start
    return out


def _direct_answers(engine: TransformersEngine, facts, adapter: str | None) -> list[str]:
    return ask(engine, [[{"role": "user", "content": f.question}] for f in facts], [f.answer for f in facts],
               adapter).responses


def _progress(step: int, total: int, logs: dict[str, float]) -> None:
    if step == total or step % 5 == 0:
        print(f"    step {step}/{total} loss {logs.get('loss', float('nan')):.4f}", flush=True)


def _pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points not dominated in (higher paraphrase_acc, lower retention_drop), sorted by retention drop."""
    front = []
    for p in points:
        dominated = any(
            q["paraphrase_acc"] >= p["paraphrase_acc"]
            and q["retention_drop"] <= p["retention_drop"]
            and (q["paraphrase_acc"] > p["paraphrase_acc"] or q["retention_drop"] < p["retention_drop"])
            for q in points
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (p["retention_drop"], p["paraphrase_acc"]))


def _aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Average the seeds of each (variant, lr, epochs)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["variant"], r["learning_rate"], r["num_epochs"]), []).append(r)
    out = []
    for (variant, lr, epochs), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in
                ("direct_acc", "paraphrase_acc", "retention_drop", "kl_to_base", "train_seconds")}
        out.append({"variant": variant, "learning_rate": lr, "num_epochs": epochs, "seeds": len(rs), **mean})
    return out


def _plot(fronts: dict[str, list[dict[str, Any]]], points: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, (method, front) in enumerate(sorted(fronts.items())):
        color = f"C{i % 10}"
        pts = [p for p in points if p["variant"] == method]
        ax.scatter([100 * p["retention_drop"] for p in pts], [100 * p["paraphrase_acc"] for p in pts],
                   color=color, alpha=0.35, s=18)
        ax.plot([100 * p["retention_drop"] for p in front], [100 * p["paraphrase_acc"] for p in front],
                marker="o", color=color, label=method, lw=2 if method == "sft" else 1.2)
    ax.set_xlabel("retention drop (points, lower is better)")
    ax.set_ylabel("paraphrase accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table_row(r: dict[str, Any], third: int) -> str:
    """One row of a markdown table: a run (third column its seed) or a seed mean (the number of seeds)."""
    return (f"| {r['variant']} | {r['learning_rate']:g} x {r['num_epochs']:g} | {third} | "
            f"{100 * r['direct_acc']:.1f}% | {100 * r['paraphrase_acc']:.1f}% | "
            f"{100 * r['retention_drop']:+.1f} | {r['kl_to_base']:.3f} | {r['train_seconds']:.0f} |")


def _markdown(report: dict[str, Any], title: str) -> str:
    """The short table beside the JSON: seed means per configuration, every run, and each method's front."""
    params, base = report["parameters"], report["base"]
    lines = [
        f"# SDFT variants vs SFT ({report['protocol']} protocol)",
        "",
        f"{title}. Seeds per configuration: "
        + ", ".join(f"{k}: {v}" for k, v in params["seeds_per_config"].items()) + ".",
        f"Base model: direct {100 * base['direct_acc']:.1f}%, paraphrase {100 * base['paraphrase_acc']:.1f}%, "
        f"retention {100 * base['retention_acc']:.1f}%. Retention drop = base accuracy minus adapter accuracy, "
        "in points (negative: the adapter answered more). Train seconds are wall-clock on the machine that ran "
        "each run; compare ratios within one invocation only.",
    ]
    if report.get("note"):
        lines += ["", report["note"]]
    lines += ["", "## Seed means", "",
              "| method | lr x ep | seeds | direct | paraphrase | retention drop (pts) | KL to base | train s |",
              "|---|---|---|---|---|---|---|---|"]
    for p in sorted(report["points"], key=lambda x: (x["learning_rate"], x["num_epochs"], x["variant"])):
        lines.append(_table_row(p, p["seeds"]))
    lines += ["", "## Every run", "",
              "| method | lr x ep | seed | direct | paraphrase | retention drop (pts) | KL to base | train s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(report["runs"], key=lambda x: (x["learning_rate"], x["num_epochs"], x["variant"], x["seed"])):
        lines.append(_table_row(r, r["seed"]))
    lines += ["", "## Fronts (seed means; paraphrase accuracy up, retention drop down)", ""]
    for method, front in report["fronts"].items():
        pts = "; ".join(f"lr {p['learning_rate']:g}: {100 * p['paraphrase_acc']:.1f}% at "
                        f"{100 * p['retention_drop']:+.1f} pts" for p in front)
        lines.append(f"- **{method}**: {pts}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--retention", type=Path, default=DEFAULT_RETENTION)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                    default=["sft", "official", "gen_teacher_direct", "gen_teacher_direct_base", "rewrite"])
    ap.add_argument("--lrs", nargs="+", type=float, default=[2.5e-4, 5e-4, 1e-3, 2e-3])
    ap.add_argument("--epochs", nargs="+", type=float, default=[10])
    ap.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1")
    ap.add_argument("--facts", type=int, default=None, help="first N facts (default: all)")
    ap.add_argument("--retention-questions", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (training and evaluation)")
    ap.add_argument("--out", type=Path, default=RESULTS / "sdft_front", help="prefix of the .json/.png outputs")
    ap.add_argument("--log", type=Path, default=None, help="JSONL run log (default: <out>_runs.jsonl)")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. why the protocol was reduced)")
    ap.add_argument("--report-only", action="store_true", help="train nothing; rewrite the JSON, table and plot")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    log_path = args.log or args.out.with_name(args.out.name + "_runs.jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    facts = load_facts(args.data, args.facts)
    items = load_questions(args.retention, args.retention_questions)
    all_facts = len(load_facts(args.data))
    full_data = args.facts in (None, all_facts) and len(items) >= min(300, len(load_questions(args.retention)))
    params = {
        "data": str(args.data),
        "retention": str(args.retention),
        "model": args.model,
        "facts": len(facts),
        "paraphrases": sum(len(f.paraphrases) for f in facts),
        "retention_questions": len(items),
        "seeds": args.seeds,
        "lrs": args.lrs,
        "epochs": args.epochs,
        "lora": asdict(LoraSettings()),
        "torch_threads": args.threads,
    }
    data_key = {k: params[k] for k in ("data", "retention", "model", "facts", "retention_questions")}
    data_key["lora"] = params["lora"]
    model_dir = resolve_model(args.model)
    base_cache = args.out.with_name(args.out.name + "_base.json")  # the base model's evaluation, reused

    engine: TransformersEngine | None = None
    base: dict[str, Any] | None = None

    def get_engine() -> tuple[TransformersEngine, dict[str, Any]]:
        nonlocal engine, base
        if engine is None:
            engine = TransformersEngine(model_dir, device="cpu", num_threads=args.threads)
            cached = json.loads(base_cache.read_text()) if base_cache.exists() else {}
            if cached.get("data") == data_key:
                base = cached["base"]
                print("base model evaluation read from", base_cache, flush=True)
            else:
                print(f"evaluating the base model on {len(facts)} facts, {len(items)} retention questions", flush=True)
                base = _evaluate(engine, facts, items, None)
                base["direct_answers"] = _direct_answers(engine, facts, None)
                base_cache.write_text(json.dumps({"data": data_key, "base": base}, indent=1) + "\n", encoding="utf-8")
            print(f"  base: direct {base['direct_acc']:.3f} paraphrase {base['paraphrase_acc']:.3f} "
                  f"retention {base['retention_acc']:.3f} ({base['eval_seconds']:.0f}s)", flush=True)
        assert base is not None
        return engine, base

    examples = [f.example() for f in facts]
    done = {_logged_key(r) for r in _read_log(log_path)}
    if not args.report_only:
        for variant in args.variants:
            for epochs in args.epochs:
                for lr in args.lrs:
                    for seed in range(args.seeds):
                        settings = _settings_for(variant, lr, epochs, seed, args.threads)
                        key = _run_key(variant, settings, data_key)
                        if key in done:
                            print(f"skip {variant} lr={lr:g} x{epochs:g} seed={seed} (in the log)", flush=True)
                            continue
                        eng, base_eval = get_engine()
                        print(f"run {variant} lr={lr:g} x{epochs:g} seed={seed}", flush=True)
                        with tempfile.TemporaryDirectory(prefix="sdft_front_") as tmp:
                            out_dir = Path(tmp) / "adapter"
                            trainer = {"sft": train_sft, "rewrite": train_rewrite, "sdft": train_sdft}[
                                _method_of(variant)
                            ]
                            result = trainer(model_dir, examples, out_dir, settings, progress_callback=_progress)
                            gc.collect()
                            eng.load_adapter("candidate", out_dir, replace=True)
                            try:
                                ev = _evaluate(eng, facts, items, "candidate", base_eval["retention_responses"])
                                answers = _direct_answers(eng, facts, "candidate")
                            finally:
                                eng.unload_adapter("candidate")
                        record = {
                            "key": key,
                            "variant": variant,
                            "method": _method_of(variant),
                            "overrides": VARIANTS[variant],
                            "settings": {k: v for k, v in asdict(settings).items() if k not in _IDENTITY_EXCLUDE},
                            "learning_rate": lr,
                            "num_epochs": epochs,
                            "seed": seed,
                            "data": data_key,
                            "direct_acc": ev["direct_acc"],
                            "paraphrase_acc": ev["paraphrase_acc"],
                            "retention_acc": ev["retention_acc"],
                            "retention_drop": base_eval["retention_acc"] - ev["retention_acc"],
                            "kl_to_base": ev["kl_to_base"],
                            "train_seconds": result.train_seconds,
                            "eval_seconds": ev["eval_seconds"],
                            "num_steps": result.num_steps,
                            "final_loss": result.metrics[-1].get("loss") if result.metrics else None,
                            "summary": result.summary,
                            "direct_answers": answers,
                        }
                        with log_path.open("a", encoding="utf-8") as fh:
                            fh.write(json.dumps(record, default=str) + "\n")
                        done.add(key)
                        print(f"  direct {record['direct_acc']:.3f} paraphrase {record['paraphrase_acc']:.3f} "
                              f"ret drop {record['retention_drop']:+.3f} KL {record['kl_to_base']:.4f} "
                              f"train {record['train_seconds']:.0f}s eval {record['eval_seconds']:.0f}s", flush=True)
                        del result
                        gc.collect()

    runs = [r for r in _read_log(log_path) if r["data"] == data_key]
    if base is None:  # nothing was trained: the cached base evaluation, else evaluate it now
        cached = json.loads(base_cache.read_text()) if base_cache.exists() else {}
        base = cached["base"] if cached.get("data") == data_key else get_engine()[1]
    points = _aggregate(runs)
    seeds_per_config: dict[tuple[str, float, float], set[int]] = {}
    for r in runs:
        seeds_per_config.setdefault((r["variant"], r["learning_rate"], r["num_epochs"]), set()).add(r["seed"])
    # "full" only when every configuration in the log was actually run with at least 2 seeds
    full = full_data and bool(runs) and all(len(s) >= 2 for s in seeds_per_config.values())
    params["seeds_per_config"] = {f"{v} lr={lr:g} x{ep:g}": sorted(s) for (v, lr, ep), s in seeds_per_config.items()}
    params["lrs"] = sorted({r["learning_rate"] for r in runs})  # what the log holds, not only this invocation's
    params["epochs"] = sorted({r["num_epochs"] for r in runs})
    params["seeds_run"] = sorted({r["seed"] for r in runs})
    fronts = {v: _pareto([p for p in points if p["variant"] == v]) for v in sorted({p["variant"] for p in points})}
    report = {
        "protocol": "full" if full else "reduced",
        "parameters": params,
        "note": args.note,
        "base": {k: v for k, v in base.items() if k != "retention_responses"} | {
            "retention_responses": base.get("retention_responses")},
        "variants": {v: VARIANTS.get(v) for v in sorted({r["variant"] for r in runs})},
        "runs": [{k: v for k, v in r.items() if k != "key"} for r in runs],
        "points": points,
        "fronts": fronts,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    seeds_run = sorted({r["seed"] for r in runs})
    title = (f"{report['protocol']} protocol: {len(facts)} facts, {len(items)} retention questions, "
             f"seeds {seeds_run}; base retention {100 * base['retention_acc']:.1f}%")
    _plot(fronts, points, args.out.with_suffix(".png"), title)
    args.out.with_suffix(".md").write_text(_markdown(report, title), encoding="utf-8")
    print(f"wrote {args.out.with_suffix('.json')}, .md and .png ({len(runs)} runs)")
    if engine is not None:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
