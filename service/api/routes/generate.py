"""GET and POST /generate: the continuation of a prompt with the current (edited) weights."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query

from ...schemas import MAX_TEXT_CHARS, GenerateIn, GenerateOut
from ..deps import EngineDep, require_scope

router = APIRouter(prefix="/generate", tags=["generate"], dependencies=[Depends(require_scope("read"))])


def _run(engine, prompt: str, max_new_tokens: int, temperature: float, seed: int | None,
         ignore_eos: bool) -> GenerateOut:
    if not prompt.strip():
        raise HTTPException(422, "prompt: must not be empty or only whitespace")
    limit = engine.settings.max_new_tokens
    if max_new_tokens > limit:
        raise HTTPException(422, f"max_new_tokens: must be at most {limit} (HIEDIT_MAX_NEW_TOKENS), got {max_new_tokens}")
    text, n = engine.generate(prompt, max_new_tokens, temperature, seed, ignore_eos)
    return GenerateOut(text=text, tokens=n)


# Sync handlers: FastAPI runs them in its thread pool, so a long generation never blocks the event loop.
@router.get("", response_model=GenerateOut)
def generate_get(engine: EngineDep,
                 prompt: Annotated[str, Query(min_length=1, max_length=MAX_TEXT_CHARS)],
                 max_new_tokens: Annotated[int, Query(ge=1)] = 32,
                 temperature: Annotated[float, Query(ge=0.0, le=5.0)] = 0.0,
                 seed: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
                 ignore_eos: bool = False) -> GenerateOut:
    """Greedy when temperature is 0 (the default); ``text`` is the continuation only.

    ``ignore_eos`` (an addition to DESIGN §4, as in vLLM) generates exactly max_new_tokens tokens.
    """
    return _run(engine, prompt, max_new_tokens, temperature, seed, ignore_eos)


@router.post("", response_model=GenerateOut)
def generate_post(body: GenerateIn, engine: EngineDep) -> GenerateOut:
    return _run(engine, body.prompt, body.max_new_tokens, body.temperature, body.seed, body.ignore_eos)
