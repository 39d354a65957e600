"""Learning signals over HTTP: ratings and corrections of logged interactions, taught answers, documents.

Each route calls the same `LearningAgent` method an embedding app would (`feedback`, `correct`, `teach`,
`ingest`), so the validation and the stored rows are identical. An unknown interaction id is a 404.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from server.auth import require_signal_role
from server.errors import APIError
from server.schemas import CorrectionRequest, DocumentRequest, RatingRequest, SignalCreated, TeachRequest
from server.state import ServerState, get_state

router = APIRouter(prefix="/v1", tags=["feedback"])

T = TypeVar("T")


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run an agent method in a worker thread; its KeyError is a 404 and its ValueError a 400."""
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except KeyError as exc:
        message = exc.args[0] if exc.args else str(exc)
        raise APIError(404, f"{message}: use the interaction id a chat completion returned "
                       "(field `interaction_id` or header X-Interaction-Id).", code="interaction_not_found",
                       param="interaction_id") from None
    except (ValueError, TypeError) as exc:
        raise APIError(400, str(exc), code="invalid_value") from None


@router.post("/interactions/{interaction_id}/rating", response_model=SignalCreated, status_code=201)
async def rate(interaction_id: str, body: RatingRequest, state: ServerState = Depends(get_state),
               principal: str | None = Depends(require_signal_role("feedback"))) -> SignalCreated:
    """Rate a logged answer (e.g. 1 good, -1 bad), with an optional comment."""
    signal_id = await _call(state.agent.feedback, interaction_id, body.score, body.comment, principal=principal)
    return SignalCreated(id=signal_id, object="signal", kind="rating", interaction_id=interaction_id)


@router.post("/interactions/{interaction_id}/correction", response_model=SignalCreated, status_code=201)
async def correct(interaction_id: str, body: CorrectionRequest, state: ServerState = Depends(get_state),
                  principal: str | None = Depends(require_signal_role("feedback"))) -> SignalCreated:
    """Give the answer the model should have given; it becomes a demonstration for the next learning cycle."""
    signal_id = await _call(state.agent.correct, interaction_id, body.text, principal=principal)
    return SignalCreated(id=signal_id, object="signal", kind="correction", interaction_id=interaction_id)


@router.post("/teach", response_model=SignalCreated, status_code=201)
async def teach(body: TeachRequest, state: ServerState = Depends(get_state),
                principal: str | None = Depends(require_signal_role("teach"))) -> SignalCreated:
    """Teach an answer directly: ``prompt`` (or ``messages``, a conversation) -> ``demonstration``."""
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "Give exactly one of `prompt` (a user message) or `messages` (a conversation).",
                       param="prompt")
    if body.prompt is not None:
        prompt: Any = body.prompt
    else:
        try:
            prompt = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                      for m in body.messages or []]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        if not prompt:
            raise APIError(400, "`messages` must hold at least one message.", param="messages")
    signal_id = await _call(state.agent.teach, prompt, body.demonstration, principal=principal)
    return SignalCreated(id=signal_id, object="signal", kind="demonstration")


@router.post("/documents", response_model=SignalCreated, status_code=201)
async def ingest(body: DocumentRequest, state: ServerState = Depends(get_state),
                 principal: str | None = Depends(require_signal_role("teach"))) -> SignalCreated:
    """Store a new document for knowledge learning (SEAL); ``questions`` are its evaluation set."""
    document_id = await _call(state.agent.ingest, body.text, body.title, body.question_rows(), principal=principal)
    return SignalCreated(id=document_id, object="document", kind="document")
