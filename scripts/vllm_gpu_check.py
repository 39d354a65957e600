"""Check VLLMEngine (or SGLangEngine) against a REAL server on a GPU machine. Not part of the test run.

The protocol tests (tests/test_http_engines.py) run the engines against stand-ins of the servers; this
script runs the same flow against the real thing: chat, streaming, token counting, scoring, loading an
adapter, chatting with it, reloading the same name with other weights (the prefix-cache check), unloading,
and a request too long for the context. Start the server first (see docs/engines.md), e.g.::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_SERVER_DEV_MODE=1 \\
        vllm serve /models/SmolLM2-135M-Instruct --enable-lora --max-lora-rank 64 --port 8000

then, on a machine that sees the same paths as the server::

    python scripts/vllm_gpu_check.py --base-url http://localhost:8000 \\
        --make-adapters /tmp/gpu-check-adapters --base-model /models/SmolLM2-135M-Instruct

``--make-adapters`` writes two random (non-zero) LoRA adapters for the base model with PEFT; pass
``--adapter A --adapter-2 B`` instead to use your own. Prints one line per check and a JSON summary;
exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.engines import ContextLengthError, SamplingParams, SGLangEngine, UnknownAdapterError, VLLMEngine
from runtime.engines.openai_http import OpenAIHTTPEngine

PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]
GREEDY = SamplingParams(max_new_tokens=32, temperature=0.0)


class Checks:
    """Runs named checks, printing each result and keeping them for the summary."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def run(self, name: str, check: Callable[[], str]) -> bool:
        start = time.perf_counter()
        try:
            detail, ok = check(), True
        except Exception as exc:  # a failed check is reported, and the next one still runs
            detail, ok = f"{type(exc).__name__}: {exc}", False
        seconds = time.perf_counter() - start
        self.results.append({"check": name, "ok": ok, "seconds": round(seconds, 3), "detail": detail})
        print(f"[{'PASS' if ok else 'FAIL'}] {name} ({seconds:.2f}s): {detail}", flush=True)
        return ok


def make_adapters(out_dir: Path, base_model: str, rank: int) -> tuple[Path, Path]:
    """Two LoRA adapters for ``base_model`` with random, non-zero weights (seeds 1 and 2)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for seed in (1, 2):
        path = out_dir / f"adapter-{seed}"
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank, lora_alpha=rank, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
        )
        get_peft_model(model, config).save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def run(engine: OpenAIHTTPEngine, adapter: Path, adapter_2: Path, name: str) -> Checks:
    checks = Checks()
    seen: dict[str, str] = {}

    def chat(adapter_name: str | None) -> str:
        [answer] = engine.chat([PROMPT], GREEDY, adapter=adapter_name)
        assert answer.adapter == adapter_name, f"served by {answer.adapter!r}, not {adapter_name!r}"
        assert answer.completion_tokens > 0 and answer.prompt_tokens > 0, f"no usage: {answer}"
        return answer.text

    def base_chat() -> str:
        seen["base"] = chat(None)
        assert seen["base"].strip(), "empty answer"
        return repr(seen["base"])

    def stream() -> str:
        result = engine.stream_chat(PROMPT, GREEDY, adapter=None)
        deltas = list(result)
        assert "".join(deltas) == result.generation.text, "deltas do not add up to the final text"
        same = result.generation.text == seen.get("base")
        return f"{len(deltas)} deltas, finish_reason={result.generation.finish_reason}, same as chat: {same}"

    def tokens() -> str:
        count = engine.count_tokens("The quick brown fox")
        assert count > 0
        return f"{count} tokens; context_length={engine.context_length}"

    def score() -> str:
        [values] = engine.score(["The capital of France is"], [" Paris"], adapter=None)
        assert values and all(v <= 0 for v in values), values
        return f"log-probs {values}"

    def load() -> str:
        engine.load_adapter(name, adapter, activate=True)
        assert name in engine.list_adapters() and engine.active_adapter == name
        return f"loaded {adapter} as {name!r}"

    def adapter_chat() -> str:
        seen["v1"] = chat(name)
        return f"{seen['v1']!r} (differs from base: {seen['v1'] != seen.get('base')})"

    def reload() -> str:
        # The reference: the second adapter's greedy answer when loaded fresh under another name.
        engine.load_adapter(f"{name}-ref", adapter_2)
        reference = chat(f"{name}-ref")
        engine.unload_adapter(f"{name}-ref")
        engine.load_adapter(name, adapter_2, replace=True)
        after = chat(name)
        assert after == reference, (
            f"after the reload {name!r} answers {after!r}, but {adapter_2} loaded fresh answers {reference!r}: "
            f"stale weights or a stale prefix cache"
        )
        return f"{after!r} == fresh load of {adapter_2.name}"

    def unload() -> str:
        engine.unload_adapter(name)
        assert name not in engine.list_adapters() and engine.active_adapter is None
        try:
            engine.chat([PROMPT], GREEDY, adapter=name)
        except UnknownAdapterError:
            return "unloaded; requests naming it are refused"
        raise AssertionError("a request naming the unloaded adapter was served")

    def too_long() -> str:
        if engine.context_length is None:
            return "skipped: the server does not report its context length"
        words = [{"role": "user", "content": "word " * (engine.context_length + 16)}]
        try:
            engine.chat([words], SamplingParams(max_new_tokens=16))
        except ContextLengthError as exc:
            return f"ContextLengthError: {exc}"
        raise AssertionError("a request longer than the context was served")

    for check_name, check in [
        ("chat (base)", base_chat),
        ("stream (base)", stream),
        ("count_tokens", tokens),
        ("score", score),
        ("load adapter", load),
        ("chat (adapter)", adapter_chat),
        ("reload same name", reload),
        ("unload", unload),
        ("context too long", too_long),
    ]:
        checks.run(check_name, check)
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://localhost:8000", help="the server's address")
    parser.add_argument("--kind", choices=["vllm", "sglang"], default="vllm")
    parser.add_argument("--adapter", type=Path, help="a PEFT LoRA adapter directory for the served model")
    parser.add_argument("--adapter-2", type=Path, help="another one, for the reload check (default: --adapter)")
    parser.add_argument("--make-adapters", type=Path, metavar="DIR", help="write two random adapters here")
    parser.add_argument("--base-model", help="the served model's local directory (for --make-adapters)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank for --make-adapters")
    parser.add_argument("--name", default="gpu-check", help="adapter name to use on the server")
    parser.add_argument("--json", type=Path, help="also write the summary to this file")
    args = parser.parse_args(argv)

    if args.make_adapters:
        if not args.base_model:
            parser.error("--make-adapters needs --base-model")
        adapter, adapter_2 = make_adapters(args.make_adapters, args.base_model, args.rank)
    elif args.adapter:
        adapter, adapter_2 = args.adapter, args.adapter_2 or args.adapter
    else:
        parser.error("give --adapter (and --adapter-2), or --make-adapters with --base-model")

    engine_class = VLLMEngine if args.kind == "vllm" else SGLangEngine
    with engine_class(args.base_url) as engine:
        print(f"{args.kind} server at {engine.base_url} serves {engine.model_name!r}", flush=True)
        checks = run(engine, adapter.resolve(), adapter_2.resolve(), args.name)
    summary = {
        "kind": args.kind,
        "base_url": args.base_url,
        "model": engine.model_name,
        "passed": all(r["ok"] for r in checks.results),
        "checks": checks.results,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
