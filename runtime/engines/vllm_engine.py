"""`VLLMEngine`: the engine interface on a running vLLM OpenAI-compatible server.

Start the server with runtime LoRA loading (see docs/engines.md)::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_SERVER_DEV_MODE=1 \\
        vllm serve MODEL --enable-lora --max-lora-rank 64 --port 8000

vLLM's routes used here: ``GET /v1/models``, ``POST /v1/chat/completions`` and ``/v1/completions`` (an adapter
is chosen by the ``model`` field: its name, or the base model's), ``POST /tokenize``, ``POST
/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``),
and ``POST /reset_prefix_cache`` (only with ``VLLM_SERVER_DEV_MODE=1``).
"""

from __future__ import annotations

import logging

from runtime.engines.http_errors import ServerAdapterExistsError, ServerError
from runtime.engines.openai_http import OpenAIHTTPEngine
from runtime.engines.openai_protocol import route_missing
from runtime.engines.served_adapters import RequestTarget, ServedAdapter

__all__ = ["VLLMEngine"]

log = logging.getLogger(__name__)


class VLLMEngine(OpenAIHTTPEngine):
    """A vLLM server as an :class:`~runtime.engines.base.Engine`: chat, completions, streaming, scoring and
    runtime LoRA adapters, over HTTP (arguments: :class:`~runtime.engines.openai_http.OpenAIHTTPEngine`).

    Example::

        engine = VLLMEngine("http://localhost:8000")
        engine.load_adapter("v1", "/srv/adapters/v1", activate=True)
        [answer] = engine.chat([[{"role": "user", "content": "What is the capital of France?"}]])

    Reloading a loaded name (``replace=True``) loads the new weights in place (``load_inplace``) and then
    resets the prefix cache (``POST /reset_prefix_cache?reset_running_requests=true``), because vLLM keys
    cached prompt prefixes by adapter and would otherwise reuse ones computed with the old weights. A
    request already running when the weights change may finish on the new ones. When the server cannot do
    this (no dev mode, or a vLLM without in-place loading), the new weights are loaded under a fresh server
    name ``<name>@r<n>`` that requests switch to, and the old one is unloaded: atomic, and nothing stale
    can be cached under a new name.
    """

    server_kind = "vLLM"
    start_hint = (
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --enable-lora "
        "--max-lora-rank 64 --port 8000"
    )
    load_route = "/v1/load_lora_adapter"
    unload_route = "/v1/unload_lora_adapter"
    lora_setup_hint = (
        "Start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment and --enable-lora "
        "--max-lora-rank R (R at least your adapters' rank), e.g.: " + start_hint
    )

    _prefix_reset_available: bool | None = None
    """Whether ``POST /reset_prefix_cache`` exists on the server (``None`` until first needed)."""

    def _model_field(self, target: RequestTarget) -> str:
        return target.server_name or self.model_name

    def _prompt_logprobs(self, token_ids: list[int], target: RequestTarget) -> list[float | None]:
        # The legacy completions API echoes the prompt with each prompt token's log-prob; one token is
        # generated (and ignored) because not every vLLM version accepts max_tokens=0.
        path = "/v1/completions"
        body = {
            "model": self._model_field(target),
            "prompt": token_ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "echo": True,
            "logprobs": 1,
        }
        response = self._send("POST", path, body)
        if response.is_error:
            raise self._request_error(response, "POST", path, target, max_new_tokens=1)
        data = self._json(response, path)
        choices = data.get("choices") if isinstance(data, dict) else None
        logprobs = (choices[0].get("logprobs") or {}) if choices else {}
        values = logprobs.get("token_logprobs")
        if not isinstance(values, list):
            raise ServerError(
                f"The vLLM server at {self.base_url} returned no prompt log-probs for echo=true, logprobs=1: "
                f"{str(data)[:300]}"
            )
        return values[: len(token_ids)]

    def _reload(self, name: str, path: str, current: ServedAdapter) -> tuple[ServedAdapter, str | None]:
        if not self._can_reset_prefix_cache():
            log.info("vLLM at %s has no /reset_prefix_cache: reloading %r under a new name", self.base_url, name)
            return self._swap(name, path, current)
        try:
            self._server_load(name, current.server_name, path, load_inplace=True)
        except ServerAdapterExistsError:  # a vLLM from before load_inplace
            return self._swap(name, path, current)
        self._reset_prefix_cache()
        return ServedAdapter(path, current.server_name, current.revision), None

    def _can_reset_prefix_cache(self) -> bool:
        """Probe the reset route once: resetting an extra time only costs some recomputation."""
        if self._prefix_reset_available is None:
            self._prefix_reset_available = self._post_reset() is not None
        return self._prefix_reset_available

    def _reset_prefix_cache(self) -> None:
        if self._post_reset() is None:
            self._prefix_reset_available = False
            raise ServerError(
                f"The vLLM server at {self.base_url} reloaded the adapter but no longer offers "
                f"/reset_prefix_cache; cached prefixes may still hold the old weights' values. Restart it with "
                f"VLLM_SERVER_DEV_MODE=1 (or --no-enable-prefix-caching)."
            )

    def _post_reset(self) -> int | None:
        """POST /reset_prefix_cache; its status, or ``None`` when the route does not exist."""
        path = "/reset_prefix_cache"
        # reset_running_requests: without it vLLM skips the reset while any request holds cache blocks.
        response = self._send("POST", path, None, params={"reset_running_requests": "true"})
        if route_missing(response):
            return None
        if response.is_error:
            raise self._http_error(response, "POST", path)
        return response.status_code
