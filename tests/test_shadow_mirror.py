"""The shadow mirror drops rather than blocks, and logs linked shadow answers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from policies.schema import ShadowCriteria
from policies.shadow import ShadowMirror, ShadowSwitch
from runtime.engines import SamplingParams
from runtime.store import Store


class _HeldEngine:
    """Wraps the tiny engine; `chat` waits until released (a busy shadow)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.release = threading.Event()
        self.started = threading.Event()

    def chat(self, *args: Any, **kwargs: Any) -> Any:
        self.started.set()
        self.release.wait(30)
        return self._engine.chat(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def test_full_queue_drops_and_answers_are_linked(tmp_path: Path, tiny_engine, tiny_adapter_dir: Path) -> None:
    if not tiny_engine.has_adapter("shadow-a"):
        tiny_engine.load_adapter("shadow-a", tiny_adapter_dir)
    engine = _HeldEngine(tiny_engine)
    params = SamplingParams(max_new_tokens=4)
    with Store(tmp_path / "s.duckdb") as store:
        live = [store.log_interaction([{"role": "user", "content": f"q{i}"}], f"a{i}") for i in range(3)]
        mirror = ShadowMirror(engine, store, "shadow-a", ShadowCriteria(fraction=1.0, queue_size=1), seed=0)
        switch = ShadowSwitch()
        switch.attach(mirror)
        try:
            assert switch.offer([{"role": "user", "content": "q0"}], live[0], params)
            assert engine.started.wait(30)  # the worker holds q0 in the (busy) engine
            assert switch.offer([{"role": "user", "content": "q1"}], live[1], params)  # fills the queue
            assert not switch.offer([{"role": "user", "content": "q2"}], live[2], params)  # dropped, not blocked
            assert mirror.stats.dropped == 1 and mirror.stats.queued == 2
            engine.release.set()
            mirror.join()
        finally:
            switch.attach(None)
            tiny_engine.unload_adapter("shadow-a")  # the engine is shared by the session
        pairs = store.shadow_pairs(adapter="shadow-a")
        assert sorted(lv.id for lv, _ in pairs) == sorted(live[:2])
        assert all(sh.kind == "shadow" and sh.shadow_of == lv.id for lv, sh in pairs)
        assert mirror.stats.answered == 2 and not switch.offer([{"role": "user", "content": "x"}], live[0], params)


def test_fraction_samples_live_traffic(tmp_path: Path, tiny_engine) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        mirror = ShadowMirror(tiny_engine, store, "none", ShadowCriteria(fraction=0.0), seed=0)
        try:
            assert not any(mirror.offer([{"role": "user", "content": "x"}], "id", SamplingParams()) for _ in range(50))
            assert mirror.stats.offered == 50 and mirror.stats.queued == 0
        finally:
            mirror.close()
