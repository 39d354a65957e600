"""Serving overhead: `LearningAgent.invoke` (LangGraph + logging) against the bare engine, and store ingestion.

Both paths answer the same prompts with the same model and greedy decoding, interleaved (engine, agent,
engine, agent, ...) so that machine noise hits both alike; the result is a ratio of medians.

    python benchmarks/serving_overhead.py --data ../shared/data/facts_dev.jsonl

Writes benchmarks/results/serving_overhead.json and serving_overhead.md.
Input: a JSONL file whose rows have a "question" field (the format of facts_dev.jsonl), or plain text lines.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import LearningAgent  # noqa: E402
from benchmarks.store_ingest import measure_store_ingest  # noqa: E402
from runtime.engines import SamplingParams, TransformersEngine  # noqa: E402
from runtime.jsonl import read_jsonl  # noqa: E402
from runtime.store import Store  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "facts_dev.jsonl"
RESULTS = ROOT / "benchmarks" / "results"


def read_prompts(path: Path, limit: int) -> list[str]:
    prompts = [str(row.get("question") or row.get("prompt") or row.get("text")) for _n, row in read_jsonl(path)]
    if not prompts:
        raise SystemExit(f"{path}: no prompts found")
    return prompts[:limit]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="prompts (JSONL with 'question')")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias or local model directory")
    parser.add_argument("--prompts", type=int, default=16, help="how many prompts from --data")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--store-rows", type=int, default=50_000)
    parser.add_argument("--out", type=Path, default=RESULTS / "serving_overhead.json")
    args = parser.parse_args(argv)

    prompts = read_prompts(args.data, args.prompts)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    engine = TransformersEngine(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.duckdb")
        agent = LearningAgent(engine, store=store, max_new_tokens=args.max_new_tokens)
        # Warm-up: first calls pay one-off costs (allocator, graph compile).
        engine.chat([[{"role": "user", "content": prompts[0]}]], params)
        agent.invoke(prompts[0])

        engine_s: list[float] = []
        agent_s: list[float] = []
        same_text = 0
        for _ in range(args.rounds):
            for prompt in prompts:
                t = time.perf_counter()
                gen = engine.chat([[{"role": "user", "content": prompt}]], params)[0]
                engine_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                res = agent.invoke(prompt)
                agent_s.append(time.perf_counter() - t)
                same_text += int(res.text == gen.text)
        store.flush()
        logged = len(store.recent_interactions(limit=10_000))
        store.close()
        ingest = measure_store_ingest(Path(tmp) / "ingest.duckdb", n_rows=args.store_rows)
    engine.close()

    n = len(engine_s)
    result = {
        "agent_over_engine_latency": statistics.median(agent_s) / statistics.median(engine_s),
        "agent_over_engine_latency_mean": statistics.fmean(agent_s) / statistics.fmean(engine_s),
        "engine_median_ms": statistics.median(engine_s) * 1000,
        "agent_median_ms": statistics.median(agent_s) * 1000,
        "requests_per_path": n,
        "identical_answers": same_text / n,
        "interactions_logged": logged,
        "store_rows_per_s": ingest["store_rows_per_s"],
        "store": ingest,
        "config": {
            "model": args.model,
            "data": str(args.data),
            "prompts": len(prompts),
            "rounds": args.rounds,
            "max_new_tokens": args.max_new_tokens,
            "machine": f"{platform.machine()} {platform.system()}",
        },
        "goals": {"agent_over_engine_latency": "<= 1.05", "store_rows_per_s": ">= 20000"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = (
        "| metric | value | goal |\n|---|---|---|\n"
        f"| agent / engine latency (median) | {result['agent_over_engine_latency']:.3f} | <= 1.05 |\n"
        f"| engine median ms | {result['engine_median_ms']:.0f} | |\n"
        f"| agent median ms | {result['agent_median_ms']:.0f} | |\n"
        f"| identical answers | {result['identical_answers']:.0%} | 100% |\n"
        f"| store rows/s | {result['store_rows_per_s']:,.0f} | >= 20,000 |\n"
    )
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
