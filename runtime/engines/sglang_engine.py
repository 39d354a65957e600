"""`SGLangEngine`: the engine interface on a running SGLang server.

Start the server with LoRA support (see docs/engines.md)::

    python -m sglang.launch_server --model-path MODEL --enable-lora --max-lora-rank 64 \\
        --lora-target-modules all --port 30000

SGLang's routes used here: ``GET /v1/models``, ``POST /v1/chat/completions`` and ``/v1/completions`` (an
adapter is chosen with ``model="<base>:<adapter>"``), ``POST /tokenize``, ``POST /generate`` (prompt
log-probs for scoring), ``POST /load_lora_adapter`` and ``/unload_lora_adapter``.
"""

from __future__ import annotations

from runtime.engines.http_errors import ServerError
from runtime.engines.openai_http import OpenAIHTTPEngine
from runtime.engines.served_adapters import RequestTarget

__all__ = ["SGLangEngine"]


class SGLangEngine(OpenAIHTTPEngine):
    """An SGLang server as an :class:`~runtime.engines.base.Engine`: chat, completions, streaming, scoring
    and runtime LoRA adapters, over HTTP (arguments: :class:`~runtime.engines.openai_http.OpenAIHTTPEngine`).

    Example::

        engine = SGLangEngine("http://localhost:30000")
        engine.load_adapter("v1", "/srv/adapters/v1", activate=True)
        [answer] = engine.chat([[{"role": "user", "content": "What is the capital of France?"}]])

    SGLang cannot load new weights under a name it already serves, so reloading a name (``replace=True``)
    loads them under a fresh server name ``<name>@r<n>``, switches requests to it, then unloads the old
    one: atomic, and SGLang's prefix cache, keyed by adapter, holds nothing stale for the new name.

    Current SGLang lists its loaded adapters in ``GET /v1/models`` with the base model as ``parent``; the
    engine adopts them when it starts (as :class:`~runtime.engines.vllm_engine.VLLMEngine` does). With an
    older SGLang that lists only the base model, loading a name it still holds takes that name over as a
    reload. The ``loaded_adapters`` field of SGLang's load and unload answers is not read, whatever its shape.
    """

    server_kind = "SGLang"
    start_hint = (
        "python -m sglang.launch_server --model-path MODEL --enable-lora --max-lora-rank 64 "
        "--lora-target-modules all --port 30000"
    )
    load_route = "/load_lora_adapter"
    unload_route = "/unload_lora_adapter"
    lora_setup_hint = (
        "Use an SGLang with dynamic LoRA loading and start it with --enable-lora --max-lora-rank R "
        "--lora-target-modules all (R at least your adapters' rank), e.g.: " + start_hint
    )

    def _model_field(self, target: RequestTarget) -> str:
        return f"{self.model_name}:{target.server_name}" if target.server_name else self.model_name

    def _prompt_logprobs(self, token_ids: list[int], target: RequestTarget) -> list[float | None]:
        # SGLang's native /generate returns input-token log-probs from logprob_start_len on, as
        # [logprob, token_id, text] triples (the first token's log-prob is None).
        path = "/generate"
        body = {
            "input_ids": token_ids,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": 0,
            "lora_path": target.server_name,
        }
        response = self._send("POST", path, body)
        if response.is_error:
            raise self._request_error(response, "POST", path, target, max_new_tokens=1)
        data = self._json(response, path)
        meta = data.get("meta_info") if isinstance(data, dict) else None
        triples = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
        if not isinstance(triples, list):
            raise ServerError(
                f"The SGLang server at {self.base_url} returned no input_token_logprobs from /generate with "
                f"return_logprob=true, logprob_start_len=0: {str(data)[:300]}"
            )
        return [t[0] if isinstance(t, list | tuple) and t else None for t in triples][: len(token_ids)]
