"""Request and response bodies of the HTTP API (DESIGN §4).

Request models are strict (a number is not a string, a string is not a number) and refuse
unknown fields, so a typo such as ``"targt"`` is a 422 naming the field instead of a silently
ignored key. Limits that depend on the model or settings (token counts, k) are checked by
the engine, which names the field the same way.
"""
from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TEXT_CHARS = 8192  # long before a prompt reaches the token limit, refuse megabyte strings outright
MAX_ID = 2**31 - 1  # ids are SQL INTEGER columns (32-bit on Postgres): a larger one is a 422, not a database error

Method = Literal["hiedit", "rlsedit"]


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty or only whitespace")
    return v


class StrictBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class LocalityIn(StrictBody):
    prompt: str = Field(max_length=MAX_TEXT_CHARS)
    target: str = Field(max_length=MAX_TEXT_CHARS)

    _blank = field_validator("prompt", "target")(_not_blank)


class EditIn(StrictBody):
    prompt: str = Field(max_length=MAX_TEXT_CHARS, description="text the fact continues")
    target: str = Field(max_length=MAX_TEXT_CHARS, description="new continuation, e.g. 'Rome'")
    rephrases: list[str] = Field(default_factory=list, description="other wordings of the prompt, scored too")
    locality: list[LocalityIn] = Field(default_factory=list, description="facts that must not change")
    method: Method = "hiedit"
    k: int | None = Field(None, ge=1, description="modules to edit (HiEdit top-k); default: the editor's k")
    subject: str | None = Field(None, max_length=MAX_TEXT_CHARS)

    _blank = field_validator("prompt", "target")(_not_blank)

    @field_validator("rephrases")
    @classmethod
    def _rephrases(cls, v: list[str]) -> list[str]:
        for i, r in enumerate(v):
            if len(r) > MAX_TEXT_CHARS:
                raise ValueError(f"item {i} is longer than {MAX_TEXT_CHARS} characters")
            if not r.strip():
                raise ValueError(f"item {i} must not be empty or only whitespace")
        return v


class TakeOut(BaseModel):
    """How well an edit took: greedy continuations checked after the proposal and each strengthening step."""

    taken: bool                  # the prompt and every rephrase continue with the target, every locality answer kept
    prompt: bool                 # the prompt's greedy continuation starts with the target
    rephrases_taken: int         # of `rephrases`
    rephrases: int
    locality_kept: int           # of `locality`: answers (greedy, over the locality target's length) unchanged
    locality: int
    steps: int                   # strengthening steps beyond the proposal (0: the proposal took alone)
    max_steps: int               # the budget (HIEDIT_EDIT_MAX_STEPS)
    max_delta_rel: float         # max over modules of ‖ΔW_l‖_F / ‖W⁰_l‖_F of the kept (or refused) update
    continuation: str            # the prompt's greedy continuation (target length) with the edit
    stopped: str                 # why strengthening stopped: taken | budget | norm_bound | locality | stateful_editor | apply


class EfficacyOut(BaseModel):
    take: TakeOut | None = None
    before: float
    after: float
    top1_before: float
    top1_after: float
    metric: str
    prompts: int
    locality_before: float | None = None  # share of `locality` facts the model gets right (greedy top-1)
    locality_after: float | None = None


class EditOut(BaseModel):
    id: int
    status: str
    method: str
    model: str
    prompt: str
    target: str
    subject: str | None
    rephrases: list[str]
    locality: list[dict]
    k: int
    actor: str
    created_at: datetime
    rolled_back_at: datetime | None
    rolled_back_by: str | None = None
    selected_layers: list[str]
    latency_ms: float | None
    efficacy: EfficacyOut | None
    loss_before: float | None
    n_tokens: int | None
    fingerprint_after: str | None
    error: str | None
    info: dict


class EditList(BaseModel):
    edits: list[EditOut]
    total: int
    limit: int
    offset: int


class LayerOut(BaseModel):
    index: int
    module: str
    importance: float
    selected: bool
    delta_norm: float
    rank: int


class LayersOut(BaseModel):
    edit_id: int
    method: str
    k: int
    layers: list[LayerOut]


class GenerateIn(StrictBody):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = Field(False, description="generate exactly max_new_tokens tokens (benchmarks)")



class GenerateOut(BaseModel):
    text: str
    tokens: int


class ProbeIn(StrictBody):
    prompt: str = Field(max_length=MAX_TEXT_CHARS)
    max_new_tokens: int | None = Field(None, ge=1, le=64)

    _blank = field_validator("prompt")(_not_blank)


class ProbeOut(BaseModel):
    id: int
    prompt: str
    max_new_tokens: int
    expected: str
    created_at: datetime


class ProbeList(BaseModel):
    probes: list[ProbeOut]


class ReportOut(BaseModel):
    specificity: float | None
    edit_retention: float | None
    probes: int
    active_edits: int
    evaluated_at: datetime
    fingerprint: str
    changed_probes: list[int]
    lost_edits: list[int]
    duration_s: float


class StateOut(BaseModel):
    fingerprint: str
    base_fingerprint: str
    model: str
    active_edits: int
    last_edit_id: int | None
    methods: list[str]
    editable_modules: int
    role: str = "writer"
    lag_edits: int | None = None  # replicas: changes of the log not applied here yet
    # replicas: the newest writer state whose fingerprint this replica matched ("edit 12", "the rollback of
    # edit 7"), and the mismatch that stopped it (edit_id, event, expected_fingerprint, fingerprint, detail)
    verified: str | None = None
    # methods this server does not offer, and why (e.g. RLSEdit without its statistics corpus)
    unavailable: dict[str, str] = {}
    fingerprint_mismatch: dict | None = None
