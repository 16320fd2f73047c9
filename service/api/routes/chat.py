"""POST /v1/chat/completions: the OpenAI chat shape, prompted through the model's own chat template.

The messages are rendered by the tokenizer's template (``apply_chat_template`` with the generation
prompt), so an edit made with a plain prompt is asked the way a chat client asks it. A model without a
template (Gemma-3-270M is a base model) answers 400 naming ``messages``: use /v1/completions there.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ...engine.errors import InvalidRequest
from ...schemas import MAX_TEXT_CHARS
from ..deps import EngineDep, require_scope
from ..openai_shape import OpenAIRequest, OpenAIRoute, Usage, check_max_tokens, check_model, complete, stream

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute,
                   dependencies=[Depends(require_scope("read"))])

ROLES = ("system", "developer", "user", "assistant")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name": accepted, not shown to the model

    role: str
    content: str | list[dict[str, Any]] = Field(description="a string, or text parts [{type: text, text}]")

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        for part in [] if isinstance(v, str) else v:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text parts {{type: text, text}} are supported by this text model; "
                                 f"got type {part.get('type')!r}")
        return v

    @field_validator("role")
    @classmethod
    def _known_role(cls, v: str) -> str:
        if v not in ROLES:
            raise ValueError(f"unknown role {v!r}; one of {', '.join(ROLES)}")
        return v

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p["text"] for p in self.content)


class ChatCompletionIn(OpenAIRequest):
    """What an OpenAI SDK sends for a chat completion."""

    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1, description="default: HIEDIT_MAX_NEW_TOKENS")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    logprobs: bool = Field(False, description="log-probabilities are not returned")

    @field_validator("messages")
    @classmethod
    def _some(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("must hold at least one message")
        if sum(len(m.text) for m in v) > MAX_TEXT_CHARS:
            raise ValueError(f"longer than {MAX_TEXT_CHARS} characters in all")
        return v

    @field_validator("logprobs")
    @classmethod
    def _off(cls, v: bool) -> bool:
        if v:
            raise ValueError("not supported by this server; send logprobs: false or leave it out")
        return v

    @model_validator(mode="after")
    def _one_limit(self) -> "ChatCompletionIn":
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str


class ChatCompletionOut(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str  # the weights' fingerprint: which edits answered


def chat_prompt(engine, messages: list[ChatMessage]) -> list[int]:
    """Token ids of ``messages`` through the model's chat template, ending where the assistant's turn starts."""
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(f"messages: the model {engine.model_name!r} has no chat template; send the prompt "
                             "to /v1/completions instead", 400)
    # "developer" is OpenAI's newer name for "system"; the templates of these models know only the latter
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja's raise_exception (e.g. roles out of order) and friends
        raise InvalidRequest(f"messages: the model's chat template refused them: {e}", 400) from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    limit = engine.settings.max_prompt_tokens
    if len(ids) > limit:
        raise InvalidRequest(f"messages: {len(ids)} tokens with the chat template, over the limit of {limit}", 400)
    return ids


@router.post("/chat/completions", response_model=ChatCompletionOut)
def create_chat_completion(body: ChatCompletionIn, engine: EngineDep):
    """The assistant's reply to ``messages``; ``finish_reason`` is "length" when the token limit ran out."""
    check_model(engine, body.model)
    max_tokens = body.max_completion_tokens or body.max_tokens or engine.settings.max_new_tokens
    check_max_tokens(engine, max_tokens)
    ids = chat_prompt(engine, body.messages)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        fingerprint = engine.fingerprint()

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            content = {"content": delta["text"]} if "text" in delta else delta
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.model_name,
                    "system_fingerprint": fingerprint,
                    "choices": [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]}
        return stream(engine, ids, max_tokens, body.temperature, body.seed, body.stops, chunk,
                      body.include_usage, first={"role": "assistant", "content": ""})
    text, n, finish = complete(engine, ids, max_tokens, body.temperature, body.seed, body.stops)
    return ChatCompletionOut(id=cid, created=created, model=engine.model_name,
                             choices=[ChatChoice(index=0, message=ChatMessageOut(content=text), finish_reason=finish)],
                             usage=Usage(prompt_tokens=len(ids), completion_tokens=n, total_tokens=len(ids) + n),
                             system_fingerprint=engine.fingerprint())
