"""Sequential accumulation: batches of facts learned one after another, through the product's own cycle.

Each batch is taught (``teach`` signals in a fresh store) and learned with one ``run_cycle`` (worker
process, registry, replay of earlier examples, continuing from the last adapter). After each step the
active adapter is measured on every batch so far (direct question and paraphrases, no context) and on
reading-comprehension retention (passage in context). Methods run one after another in the same script
run, on the same batches, from the same base model.

    python benchmarks/sequential.py --data ../shared/data/facts_dev.jsonl \\
        --retention ../shared/data/squad_retention_dev.jsonl

Writes benchmarks/results/sequential.json and sequential.md. ``auto`` selects on retention questions
disjoint from the ones measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.overrides import parse_overrides  # noqa: E402
from learners.evaluation import Fact, fact_accuracy, load_facts, load_questions, retention_accuracy  # noqa: E402
from learners.registry import DEFAULT_METHOD, LEARNING_METHODS  # noqa: E402
from orchestration.cycle import run_cycle  # noqa: E402
from runtime.config import RuntimeConfig  # noqa: E402
from runtime.engines import TransformersEngine  # noqa: E402
from runtime.models import DEFAULT_MODEL, resolve_model  # noqa: E402
from runtime.store import Store  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA / "facts_dev.jsonl")
    parser.add_argument("--retention", type=Path, default=DATA / "squad_retention_dev.jsonl")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--methods", default=f"sft,{DEFAULT_METHOD},auto")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="facts per batch")
    parser.add_argument("--retention-questions", type=int, default=60, help="measured after each step")
    parser.add_argument("--auto-retention-questions", type=int, default=30, help="auto's own check (disjoint)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--replay-fraction", type=float, default=None,
                        help="learning.replay_fraction (default: the config default)")
    for name in LEARNING_METHODS:
        parser.add_argument(f"--{name}-set", action="append", default=[], metavar="KEY=VALUE",
                            help=f"learning.{name} override")
    parser.add_argument("--anchors", action=argparse.BooleanOptionalAction, default=True,
                        help="learning.anchors.enabled (default: on, as the runtime's default)")
    parser.add_argument("--anchors-set", action="append", default=[], metavar="KEY=VALUE",
                        help="learning.anchors override, e.g. probe_order=farthest")
    parser.add_argument("--lora-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--auto-candidates", default=None, help="YAML list of candidates for auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "sequential.json")
    args = parser.parse_args(argv)
    anchor_overrides = parse_overrides(args.anchors_set, "anchors")
    overrides: dict[str, Any] = {
        **{name: parse_overrides(getattr(args, f"{name}_set"), name) for name in LEARNING_METHODS},
        "lora": parse_overrides(args.lora_set, "lora"),
    }

    facts = load_facts(args.data)
    need = args.batches * args.batch_size
    if len(facts) < need:
        raise SystemExit(f"{args.data}: {len(facts)} facts, {need} needed for {args.batches} batches")
    batches = [facts[i * args.batch_size : (i + 1) * args.batch_size] for i in range(args.batches)]
    items = load_questions(args.retention)
    auto_items, measured = items[: args.auto_retention_questions], items[args.auto_retention_questions :]
    measured = measured[: args.retention_questions]
    model_dir = resolve_model(args.model)

    import torch

    torch.set_num_threads(args.threads)
    engine = TransformersEngine(model_dir, device="cpu", num_threads=args.threads)
    base_retention = retention_accuracy(engine, measured, None).accuracy
    base_facts = [fact_accuracy(engine, b, None) for b in batches]
    results: dict[str, Any] = {
        "base": {"retention": base_retention, "batches": base_facts},
        "methods": {},
        "config": {
            "model": args.model,
            "data": str(args.data),
            "retention": str(args.retention),
            "batches": args.batches,
            "batch_size": args.batch_size,
            "retention_questions": len(measured),
            "threads": args.threads,
            "anchors": args.anchors,
            "anchors_overrides": anchor_overrides,
            "overrides": overrides,
            "replay_fraction": (
                args.replay_fraction if args.replay_fraction is not None else RuntimeConfig().learning.replay_fraction
            ),
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        auto_file = Path(tmp) / "auto_retention.jsonl"
        auto_file.write_text(
            "".join(
                json.dumps({"context": it.context, "questions": [{"question": it.question, "answer": it.answer}]})
                + "\n"
                for it in auto_items
            )
        )
        for method in args.methods.split(","):
            learning: dict[str, Any] = {
                **overrides, "anchors": {**anchor_overrides, "enabled": args.anchors},
            }
            if args.replay_fraction is not None:
                learning["replay_fraction"] = args.replay_fraction
            if method == "auto":
                learning["auto"] = {
                    **learning["auto"], "retention_file": str(auto_file), "retention_questions": len(auto_items),
                }
                if args.auto_candidates:
                    learning["auto"]["candidates"] = yaml.safe_load(args.auto_candidates)
            config = RuntimeConfig.model_validate(
                {
                    "data_dir": str(Path(tmp) / method),
                    "model": {"name": str(model_dir)},
                    "engine": {"device": "cpu", "num_threads": args.threads},
                    "learning": learning,
                }
            )
            results["methods"][method] = run_method(method, config, batches, measured, engine, base_retention)
            print(json.dumps({method: results["methods"][method]["summary"]}), flush=True)
    engine.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(results))
    print(table(results))
    return results


def run_method(
    method: str,
    config: RuntimeConfig,
    batches: list[list[Fact]],
    measured: list,
    engine: TransformersEngine,
    base_retention: float,
) -> dict[str, Any]:
    steps = []
    store = Store(config.store_path)
    try:
        for step, batch in enumerate(batches):
            for fact in batch:
                store.add_signal(
                    "demonstration", text=fact.demonstration, messages=[{"role": "user", "content": fact.question}]
                )
            started = time.perf_counter()
            cycle = run_cycle(config, store, method)
            seconds = time.perf_counter() - started
            entry: dict[str, Any] = {"step": step + 1, "status": cycle.status, "cycle_seconds": seconds}
            if "auto" in cycle.metrics:  # which candidate auto kept, and why
                entry["auto"] = cycle.metrics["auto"]
            entry["training"] = {
                k: cycle.metrics[k] for k in ("steps", "train_seconds", "train_loss") if k in cycle.metrics
            }
            if cycle.adapter is not None:
                name = f"{method}-{step}"
                engine.load_adapter(name, cycle.adapter.path)
                entry["adapter_method"] = cycle.adapter.method
                entry["batches"] = [fact_accuracy(engine, b, name) for b in batches[: step + 1]]
                retention = retention_accuracy(engine, measured, name).accuracy
                entry["retention"] = retention
                entry["retention_drop"] = 100.0 * (base_retention - retention)
                engine.unload_adapter(name)
            else:
                entry["message"] = cycle.message
            steps.append(entry)
    finally:
        store.close()
    last = next((s for s in reversed(steps) if "batches" in s), None)
    summary = {}
    if last is not None:
        summary = {
            "final_paraphrase_acc_per_batch": [b["paraphrase_acc"] for b in last["batches"]],
            "final_direct_acc_per_batch": [b["new_acc"] for b in last["batches"]],
            "final_retention_drop": last["retention_drop"],
            "total_cycle_seconds": sum(s["cycle_seconds"] for s in steps),
        }
    return {"steps": steps, "summary": summary}


def table(results: dict[str, Any]) -> str:
    lines = [
        "| method | step | adapter | direct acc per batch | paraphrase acc per batch | retention drop | cycle s |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, res in results["methods"].items():
        for s in res["steps"]:
            if "batches" not in s:
                lines.append(f"| {method} | {s['step']} | {s['status']} | | | | {s['cycle_seconds']:.0f} |")
                continue
            direct = " / ".join(f"{b['new_acc']:.2f}" for b in s["batches"])
            para = " / ".join(f"{b['paraphrase_acc']:.2f}" for b in s["batches"])
            lines.append(
                f"| {method} | {s['step']} | {s['adapter_method']} | {direct} | {para} | "
                f"{s['retention_drop']:+.1f} | {s['cycle_seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
