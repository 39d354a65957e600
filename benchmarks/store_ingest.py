"""Store ingest throughput: enqueue N interaction rows with realistic payloads, then flush.

    python benchmarks/store_ingest.py [--rows 50000] [--path /tmp/store_ingest.duckdb] [--json out.json]

``store_rows_per_s`` = rows / (enqueue time + flush time), on a fresh file. The target is >= 20,000.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.store import Store  # noqa: E402

_SYSTEM = "You are the support assistant of Acme Corp. Answer briefly and cite the policy section. "
_QUESTIONS = [
    "What is the refund window for orders placed in the EU, and does it apply to discounted items?",
    "Can I change the delivery address after my order has shipped, and is there a fee for doing so?",
    "How do I reset the password of my account if I no longer have access to the recovery email?",
]
_ANSWER = ("The refund window is 45 days from delivery for all EU orders, discounted items included. "
           "Start a return from Orders > Return item; the refund reaches your card within 5 business days.")


def _payload(i: int) -> tuple[list[dict[str, str]], str]:
    messages = [{"role": "system", "content": _SYSTEM},
                {"role": "user", "content": f"{_QUESTIONS[i % len(_QUESTIONS)]} (ticket {i})"}]
    return messages, _ANSWER


def measure_store_ingest(path: str | Path, n_rows: int = 50_000) -> dict[str, Any]:
    """Time ``log_interaction`` x ``n_rows`` plus ``flush()`` on a new store at ``path``.

    Returns ``store_rows_per_s`` (end to end), ``enqueue_rows_per_s`` and ``enqueue_us_mean`` (the cost
    seen by the request path), the flush time, and the row count read back.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; the benchmark needs a fresh file")
    payloads = [_payload(i) for i in range(64)]
    with Store(path) as store:
        start = time.perf_counter()
        for i in range(n_rows):
            messages, response = payloads[i % 64]
            store.log_interaction(messages, response, thread_id=f"t{i % 100}", model="SmolLM2-135M-Instruct",
                                  latency_ms=12.5, prompt_tokens=48, completion_tokens=40,
                                  metadata={"user": f"u{i % 1000}"})
        enqueued = time.perf_counter()
        store.flush()
        done = time.perf_counter()
        stored = store.counts()["interactions"]
    total = done - start
    return {
        "store_rows_per_s": n_rows / total,
        "enqueue_rows_per_s": n_rows / (enqueued - start),
        "enqueue_us_mean": (enqueued - start) / n_rows * 1e6,
        "flush_s": done - enqueued,
        "total_s": total,
        "rows": n_rows,
        "rows_stored": stored,
        "payload_chars": len(json.dumps(payloads[0][0])) + len(payloads[0][1]),
        "file_mb": path.stat().st_size / 1e6,
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--path", type=Path, default=None, help="a new DuckDB file (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure_store_ingest(args.path or Path(tmp) / "store_ingest.duckdb", args.rows)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
