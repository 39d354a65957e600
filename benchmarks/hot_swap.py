"""Hot swap: how long activating a new adapter takes, and whether any request fails, under concurrent load.

Client threads send chat requests to the runtime (through the agent's ``EngineChatModel`` on the service's
engine, so every call is logged as in production) for a fixed time. The first phase has no swaps (the
baseline); in the second, the main thread promotes a new adapter every ``--swap-every`` seconds, alternating two kinds:

- **warm**: the adapter is already loaded beside the active one, as the policy gate leaves an approved
  candidate; ``activate_ms`` is the time of ``service.promote(name)`` (checksum check, registry records,
  engine switch). This is the product's promotion path.
- **cold**: the adapter is not loaded; ``load_and_activate_ms`` includes reading it from disk and loading it
  into the engine, which waits for the generation in flight (the engine loads weights under its lock).

A request counts as failed if it raises, or if the adapter that served it was never the active one while it
ran (a torn swap). Adapters are random LoRA adapters of the default shape (rank 16, all linear layers) for
the default model, published through the registry like trained ones.

    python benchmarks/hot_swap.py --data ../shared/data/facts_dev.jsonl

Writes benchmarks/results/hot_swap.json and hot_swap.md.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.chat_model import EngineChatModel  # noqa: E402
from benchmarks.serving_overhead import read_prompts  # noqa: E402
from benchmarks.stats import percentile  # noqa: E402
from orchestration.service import RuntimeService  # noqa: E402
from runtime.adapters import Lineage  # noqa: E402
from runtime.config import RuntimeConfig  # noqa: E402
from runtime.cpu import serving_cpu_threads  # noqa: E402
from runtime.engines import TransformersEngine  # noqa: E402
from runtime.models import DEFAULT_MODEL, resolve_model  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "facts_dev.jsonl"
RESULTS = ROOT / "benchmarks" / "results"


def make_random_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter of the learners' default shape with random (non-zero) weights."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from learners.lora_config import LoraSettings

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraSettings().to_peft_config(model)
    config.init_lora_weights = False  # random A and B: the adapter really changes the outputs
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.01)
    peft_model.save_pretrained(out)
    return out


class Clients:
    """Client threads sending requests until stopped; each request's timing and adapter are recorded."""

    def __init__(self, service: RuntimeService, prompts: list[str], n: int, max_new_tokens: int) -> None:
        self.service = service
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.records: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _run(self, index: int) -> None:
        service = self.service
        model = EngineChatModel(engine=service.engine, store=service.store, shadow=service.shadow,
                                max_new_tokens=self.max_new_tokens)
        i = index
        while not self._stop.is_set():
            prompt = self.prompts[i % len(self.prompts)]
            i += len(self._threads)
            start = time.monotonic()
            try:
                message = model.invoke(prompt)
            except Exception as exc:  # every failure is counted and reported
                self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            end = time.monotonic()
            adapter = message.response_metadata["adapter"]
            self.records.append({"start": start, "end": end, "ms": (end - start) * 1000.0, "adapter": adapter})


def torn(records: list[dict[str, Any]], swaps: list[tuple[float, float, str]]) -> int:
    """Requests served by an adapter that was not active at any moment while they ran.

    `swaps` are ``(promote start, promote end, new adapter)``; within a promote call the switch may happen
    at any instant, so the old adapter counts as active until its end and the new one from its start.
    """
    intervals: list[tuple[float, float, str | None]] = []
    since, current = float("-inf"), None
    for start, end, name in swaps:
        intervals.append((since, end, current))
        since, current = start, name
    intervals.append((since, float("inf"), current))
    bad = 0
    for r in records:
        bad += not any(a == r["adapter"] and lo <= r["end"] and r["start"] <= hi for lo, hi, a in intervals)
    return bad


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="prompts: JSONL with 'question' or text")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--baseline-s", type=float, default=20.0)
    parser.add_argument("--swap-s", type=float, default=40.0)
    parser.add_argument("--swap-every", type=float, default=2.0)
    parser.add_argument("--adapters", type=int, default=4, help="distinct adapters cycled through")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None, help="engine CPU threads (default: the serving share)")
    parser.add_argument("--out", type=Path, default=RESULTS / "hot_swap.json")
    args = parser.parse_args(argv)

    prompts = read_prompts(args.data, 64)
    model_dir = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="hot-swap-") as tmp:
        tmp_path = Path(tmp)
        config = RuntimeConfig.model_validate(
            {"data_dir": str(tmp_path / "data"), "model": {"name": str(model_dir)}, "engine": {"device": "cpu"}}
        )
        engine = TransformersEngine(model_dir, device="cpu", num_threads=args.threads or serving_cpu_threads(),
                                    max_batch_size=config.engine.max_batch_size)  # as the server's engine
        service = RuntimeService.from_config(config, engine=engine)
        names = []
        for i in range(args.adapters):
            staged = make_random_adapter(model_dir, tmp_path / f"staged-{i}", seed=i)
            name = f"random-{i}"
            service.registry.publish(staged, name, Lineage(None, "random", f"bench-{i}", {}, {}))
            names.append(name)

        clients = Clients(service, prompts, args.clients, args.max_new_tokens)
        swaps: list[tuple[float, float, str]] = []
        clients.start()
        time.sleep(args.baseline_s)
        baseline_end = time.monotonic()
        warm_ms: list[float] = []
        cold_ms: list[float] = []
        swap_errors: list[str] = []
        k = 0
        while time.monotonic() < baseline_end + args.swap_s:
            name = names[k % len(names)]
            warm = k % 2 == 0
            if warm and not engine.has_adapter(name):
                engine.load_adapter(name, service.store.get_adapter(name).path)  # what the gate does
            elif not warm and engine.has_adapter(name):
                engine.unload_adapter(name)
            start = time.monotonic()
            try:
                service.promote(name, reason="hot-swap benchmark")
            except Exception as exc:
                swap_errors.append(f"{type(exc).__name__}: {exc}")
                continue
            end = time.monotonic()
            swaps.append((start, end, name))
            (warm_ms if warm else cold_ms).append((end - start) * 1000.0)
            k += 1
            time.sleep(max(0.0, args.swap_every - (time.monotonic() - start)))
        clients.stop()
        service.close()
        engine.close()

    steady = [r for r in clients.records if r["end"] <= baseline_end]
    swapping = [r for r in clients.records if r["start"] >= baseline_end]
    torn_requests = torn(clients.records, swaps)
    steady_p50 = statistics.median(r["ms"] for r in steady) if steady else float("nan")
    swap_p50 = statistics.median(r["ms"] for r in swapping) if swapping else float("nan")
    result = {
        "benchmark": "hot_swap",
        "model": args.model,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "swaps": len(warm_ms) + len(cold_ms),
        "activate_ms_p50": percentile(warm_ms, 50),
        "activate_ms_p95": percentile(warm_ms, 95),
        "activate_ms_max": max(warm_ms) if warm_ms else float("nan"),
        "load_and_activate_ms_p50": percentile(cold_ms, 50),
        "load_and_activate_ms_max": max(cold_ms) if cold_ms else float("nan"),
        "activate_ms": warm_ms,
        "load_and_activate_ms": cold_ms,
        "requests": len(clients.records) + len(clients.errors),
        "failed_requests": len(clients.errors) + torn_requests,
        "raised": clients.errors[:5],
        "torn_requests": torn_requests,
        "swap_errors": swap_errors,
        "request_p50_ms_steady": steady_p50,
        "request_p50_ms_swapping": swap_p50,
        "p50_ratio_swapping_over_steady": swap_p50 / steady_p50 if steady else float("nan"),
        "goals": {"failed_requests": 0, "activate_ms_p50_max": 200},
    }
    result["goals_met"] = result["failed_requests"] == 0 and result["activate_ms_p50"] <= 200 and not swap_errors
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    return (
        "# Hot swap under load\n\n"
        f"{r['config']['clients']} client threads on {r['model']} (CPU), {r['swaps']} promotions during "
        f"{r['config']['swap_s']:.0f} s after a {r['config']['baseline_s']:.0f} s steady baseline.\n\n"
        "| metric | value | goal |\n|---|---|---|\n"
        f"| activate_ms_p50 (loaded candidate, `promote`) | {r['activate_ms_p50']:.1f} | <= 200 |\n"
        f"| activate_ms_p95 / max | {r['activate_ms_p95']:.1f} / {r['activate_ms_max']:.1f} | |\n"
        f"| load_and_activate_ms_p50 / max (from disk) | {r['load_and_activate_ms_p50']:.1f} / "
        f"{r['load_and_activate_ms_max']:.1f} | |\n"
        f"| requests / failed (raised + torn) | {r['requests']} / {r['failed_requests']} | 0 failed |\n"
        f"| request p50 ms steady / swapping (ratio) | {r['request_p50_ms_steady']:.0f} / "
        f"{r['request_p50_ms_swapping']:.0f} ({r['p50_ratio_swapping_over_steady']:.2f}) | |\n"
    )


if __name__ == "__main__":
    main()
