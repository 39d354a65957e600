"""Engine throughput: concurrent clients through `runtime serve`, on one adapter and spread over four.

Starts the real server (`python -m server serve`) on loopback with a fresh store holding ``--adapters``
random LoRA adapters of the learners' shape, then, in one run, for each concurrency in ``--concurrency``:
that many OpenAI-client threads each send ``--requests`` streamed chat completions (``--max-tokens`` tokens,
prompts from ``--data``), first all on one adapter, then spread over all of them. Per concurrency it records
aggregate generated tokens/s, p50/p99 latency and p50 time to first token; ``throughput_ratio_8_over_1`` is
aggregate tokens/s at 8 clients over 1 client, for both runs (ratios in the same run: the machines are noisy).

Then hostile requests, each beside a normal one: a request with 4 stop strings of 256 characters, and a
non-streamed request for 1,500 tokens whose client gives up after 1 s. ``hostile_request_delay_s`` is how
much the worse of them delays a normal request (its latency beside the hostile one minus alone).

    python benchmarks/engine_throughput.py --data ../shared/data/facts_dev.jsonl

Writes benchmarks/results/engine_throughput.json and .md. Goals on a 2-core CPU: ratio >= 4 (one adapter)
and >= 3 (four adapters), p50 at 4 clients <= 2x one request's, hostile delay <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.hot_swap import make_random_adapter  # noqa: E402
from benchmarks.serving_overhead import read_prompts  # noqa: E402
from benchmarks.stats import percentile  # noqa: E402
from runtime.adapters import AdapterRegistry, Lineage  # noqa: E402
from runtime.models import DEFAULT_MODEL, resolve_model  # noqa: E402
from runtime.store import Store  # noqa: E402
from server.process import ServerStartError, free_port, start_server, stop_server, wait_ready  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "facts_dev.jsonl"
RESULTS = ROOT / "benchmarks" / "results"


def one_request(url: str, prompt: str, model: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    """A streamed chat completion: latency, time to first token and generated tokens (from the usage)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    start = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"latency_s": time.perf_counter() - start, "ttft_s": first, "tokens": tokens}


def run_concurrency(url: str, prompts: list[str], models: list[str], clients: int, requests: int,
                    max_tokens: int) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for k in range(requests):
            n = index * requests + k
            try:
                record = one_request(url, prompts[n % len(prompts)], models[n % len(models)], max_tokens)
            except Exception as exc:  # every failure is counted and reported
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies = sorted(r["latency_s"] for r in records)
    ttfts = sorted(r["ttft_s"] for r in records if r["ttft_s"] is not None)
    tokens = sum(r["tokens"] for r in records)
    return {
        "clients": clients, "requests": len(records), "errors": errors, "wall_s": wall, "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "latency_p50_s": percentile(latencies, 50) if latencies else None,
        "latency_p99_s": percentile(latencies, 99) if latencies else None,
        "ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
    }


def hostile_delays(url: str, prompt: str, model: str, max_tokens: int) -> dict[str, Any]:
    """How much a hostile request delays a normal one (its latency beside it, minus alone; medians of 3)."""
    def normal() -> float:
        return one_request(url, prompt, model, max_tokens)["latency_s"]

    alone = statistics.median(normal() for _ in range(3))

    def beside(hostile: Any) -> float:
        delays = []
        for _ in range(3):
            thread = threading.Thread(target=hostile)
            thread.start()
            time.sleep(0.3)  # the hostile request is in the engine first
            delays.append(normal() - alone)
            thread.join()
        return statistics.median(delays)

    stops = [("x" * 255) + str(i) for i in range(4)]
    stop_delay = beside(lambda: one_request(url, prompt, model, 64, stop=stops))

    def abandoned() -> None:
        try:  # a non-streamed request for 1,500 tokens whose client gives up after 1 s
            httpx.post(url + "/v1/chat/completions", timeout=1.0, json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1500})
        except httpx.TimeoutException:
            pass

    abandon_delay = beside(abandoned)
    return {"alone_s": alone, "stop_strings_delay_s": stop_delay, "abandoned_delay_s": abandon_delay,
            "hostile_request_delay_s": max(stop_delay, abandon_delay)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="prompts: JSONL with 'question' or text")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4, help="random adapters in the four-adapter run")
    parser.add_argument("--max-batch-size", type=int, default=None, help="engine.max_batch_size (default: config)")
    parser.add_argument("--threads", type=int, default=None, help="engine.num_threads of the server")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_throughput.json")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = read_prompts(args.data, 64)
    model_dir = resolve_model(args.model)

    with tempfile.TemporaryDirectory(prefix="engine-throughput-") as tmp:
        tmp_path = Path(tmp)
        engine: dict[str, Any] = {"device": "cpu", "max_new_tokens": args.max_tokens}
        if args.threads:
            engine["num_threads"] = args.threads
        if args.max_batch_size:
            engine["max_batch_size"] = args.max_batch_size
        config = {"data_dir": str(tmp_path / "data"), "model": {"name": str(model_dir)}, "engine": engine}
        config_path = tmp_path / "runtime.yaml"
        config_path.write_text(yaml.safe_dump(config))
        names = [f"random-{i}" for i in range(args.adapters)]
        with Store(tmp_path / "data" / "runtime.duckdb") as store:
            registry = AdapterRegistry(tmp_path / "data" / "adapters", store)
            for i, name in enumerate(names):
                staged = make_random_adapter(model_dir, tmp_path / f"staged-{i}", seed=i)
                registry.publish(staged, name, Lineage(None, "random", f"bench-{i}", {}, {}))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = tmp_path / "server.log"
        proc = start_server(config_path, port, log_path)
        try:
            try:
                health = wait_ready(url, proc, log_path, args.ready_timeout)
            except ServerStartError as exc:
                raise SystemExit(str(exc)) from None
            for name in names:  # load every adapter once (first use loads it), so loading is not measured
                one_request(url, prompts[0], name, 4)
            runs: dict[str, list[dict[str, Any]]] = {}
            for label, models in (("one_adapter", names[:1]), ("four_adapters", names)):
                runs[label] = []
                for clients in levels:
                    row = run_concurrency(url, prompts, models, clients, args.requests, args.max_tokens)
                    print(f"{label} clients={clients} {row['tokens_per_s']:.1f} tok/s p50 {row['latency_p50_s']:.2f}s "
                          f"errors={len(row['errors'])}", flush=True)
                    runs[label].append(row)
            hostile = hostile_delays(url, prompts[1], names[0], args.max_tokens)
            print(json.dumps(hostile), flush=True)
        finally:
            stop_server(proc)

    def at(label: str, clients: int) -> dict[str, Any] | None:
        return next((r for r in runs[label] if r["clients"] == clients), None)

    def ratio(label: str) -> float | None:
        one, eight = at(label, 1), at(label, 8)
        return eight["tokens_per_s"] / one["tokens_per_s"] if one and eight and one["tokens_per_s"] else None

    one, four = at("one_adapter", 1), at("one_adapter", 4)
    result = {
        "benchmark": "engine_throughput",
        "model": args.model,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "config": {"concurrency": levels, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
                   "adapters": args.adapters, "max_batch_size": args.max_batch_size or "config default",
                   "data": str(args.data)},
        "engine": health.get("engine"),
        "runs": runs,
        "throughput_ratio_8_over_1": {label: ratio(label) for label in runs},
        "p50_latency_4_over_1": (four["latency_p50_s"] / one["latency_p50_s"]
                                 if one and four and one["latency_p50_s"] else None),
        "failed_requests": sum(len(r["errors"]) for rows in runs.values() for r in rows),
        **hostile,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Engine throughput ({r['model']}, {r['config']['max_tokens']} tokens per request)", "",
             "| adapters | clients | tokens/s | p50 latency s | p99 latency s | p50 TTFT s | errors |",
             "|---|---|---|---|---|---|---|"]
    for label, rows in r["runs"].items():
        for row in rows:
            lines.append(f"| {label.replace('_', ' ')} | {row['clients']} | {row['tokens_per_s']:.1f} | "
                         f"{row['latency_p50_s']:.2f} | {row['latency_p99_s']:.2f} | {row['ttft_p50_s']:.2f} | "
                         f"{len(row['errors'])} |")
    ratios = r["throughput_ratio_8_over_1"]

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    lines += ["", f"throughput_ratio_8_over_1: one adapter {f(ratios['one_adapter'])} (goal >= 4), four adapters "
              f"{f(ratios['four_adapters'])} (goal >= 3); p50 latency at 4 clients / 1 client: "
              f"{f(r['p50_latency_4_over_1'])} (goal <= 2).",
              f"hostile_request_delay_s: {r['hostile_request_delay_s']:.2f} (4 x 256-character stop strings: "
              f"{r['stop_strings_delay_s']:.2f}; abandoned 1,500-token request: {r['abandoned_delay_s']:.2f}; "
              f"a normal request alone {r['alone_s']:.2f} s; goal <= 1 s).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
