"""Property-based tests of `runtime serve`'s app against its own OpenAPI schema (schemathesis).

Every route of the schema gets generated requests, valid and invalid, over real HTTP; none may answer 5xx.
The number of examples per route is bounded (``FUZZ_EXAMPLES``) so the default test run stays short; set
``RUNTIME_FUZZ_EXAMPLES`` for a longer run. `POST /admin/learn` is left out: it starts a learning cycle.
(Schemathesis's pytest plugin is not used: it does not run on this pytest; hypothesis drives its strategies.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from runtime.store import Store
from server import ServerLimits, create_app
from tests.test_server import TOKEN, register_adapter, serve_in_thread, tiny_config

FUZZ_EXAMPLES = int(os.environ.get("RUNTIME_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzzed_url(tiny_engine, tiny_model_dir: Path, tiny_adapter_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("fuzz")
    config = tiny_config(tmp, tiny_model_dir)
    config.engine.max_new_tokens = 4
    store = Store(config.store_path)
    register_adapter(store, "reg-a", tiny_adapter_dir, config.adapters_dir)
    limits = ServerLimits(max_body_bytes=64 * 1024, max_messages=8, max_n=2, max_tokens=8)
    app = create_app(config, engine=tiny_engine, store=store, admin_token=TOKEN, limits=limits,
                     background_learning=False)
    try:
        with serve_in_thread(app) as url:
            yield url
    finally:
        for name in tiny_engine.list_adapters():
            tiny_engine.unload_adapter(name)
        tiny_engine.set_active_adapter(None)
        store.close()


def test_no_route_answers_5xx(fuzzed_url: str) -> None:
    api = schemathesis.openapi.from_url(fuzzed_url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) > 15  # every route of the schema, not an empty schema
    failures: list[tuple[str, str, int, str]] = []
    for operation in operations:
        if operation.path == "/admin/learn":
            continue
        headers = {"Authorization": f"Bearer {TOKEN}"} if operation.path.startswith("/admin") else {}

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def call(case) -> None:
            response = case.call(base_url=fuzzed_url, headers=headers, timeout=120)  # noqa: B023 (called at once)
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:300]))

        call()
    assert not failures, failures
