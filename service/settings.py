"""Server settings: every option of ``hiedit serve`` is also a ``HIEDIT_*`` environment variable.

The CLI builds a :class:`Settings` from its flags (flags win over the environment), and the
FastAPI app reads nothing else, so a test can start an app from a Settings object alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from platformdirs import user_data_dir
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from editor_core.catalog import DEFAULT_MODEL


def default_home() -> Path:
    return Path(user_data_dir("hiedit", appauthor=False))


class Settings(BaseSettings):
    """Configuration of one serving process (the single writer)."""

    model_config = SettingsConfigDict(env_prefix="HIEDIT_", extra="ignore")

    home: Path = Field(default_factory=default_home, description="data directory (SQLite file lives here)")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<home>/hiedit.db")
    model: str = Field(DEFAULT_MODEL, description="a known model name (smollm2-135m-instruct, gemma-3-270m), a model "
                       "directory, a .gguf file (converted once under <home>/models) or a hub id")
    editor: str | None = Field(None, description="HiEdit checkpoint directory, or 'none'; default: the committed "
                               "editor of a known --model")
    untrained_editor: str | None = Field(
        None, description="layer spec: create an untrained HiEdit editor (a scaled gradient step) instead of loading one")
    untrained_lr: float = Field(1e-6, gt=0, description="edit learning rate of an untrained editor")
    untrained_k: int | None = Field(None, ge=1, description="k of an untrained editor (default L/2)")
    rlsedit: str = Field("auto", description="'auto' (enable when editor_core.rlsedit is importable), 'on', 'off'")
    rlsedit_layers: str | None = Field(None, description="RLSEdit layer spec, e.g. 'down[4-8]' (default: its own)")
    rlsedit_stats_tokens: int | None = Field(
        None, ge=1, description="tokens of second-moment statistics RLSEdit collects (default: its own)")
    rlsedit_stats_corpus: str | None = Field(
        None, description="text RLSEdit's second-moment statistics are collected from: a .txt/.json/.jsonl file "
        "or a directory of them (default: the repository's ../shared/data/glue, which an installed package or "
        "an image does not have)")
    rlsedit_stats: str | None = Field(
        None, description="statistics collected before, instead of a corpus: a directory with one "
        "<module>.*.safetensors per edited module, e.g. $HIEDIT_HOME/cache/rlsedit-stats/<model>-<fingerprint> "
        "of a server that had the corpus (refused if collected on other weights)")
    rlsedit_overlap: Literal["refuse", "allow"] = Field(
        "refuse", description="HiEdit layers at or below RLSEdit's deepest layer move the keys RLSEdit's history "
        "was built from: 'refuse' = RLSEdit off under --rlsedit auto, no start under --rlsedit on; 'allow' = both")
    dtype: str = "float32"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    max_body_bytes: int = Field(1 << 20, ge=1024, description="request bodies above this get 413")
    max_new_tokens: int = Field(256, ge=1, description="upper bound of max_new_tokens for /generate")
    max_concurrent_generations: int = Field(16, ge=1, description="generation requests decoded together in one "
                                            "batch (continuous batching); more wait for a place in it")
    max_prompt_tokens: int = Field(256, ge=8, description="prompts longer than this (in tokens) get 422")
    max_target_tokens: int = Field(32, ge=1, le=32, description="targets longer than this (in tokens) get 422; "
                                   "32 is also the editors' own bound")
    max_rephrases: int = Field(16, ge=0)
    max_locality: int = Field(16, ge=0)
    delta_norm_bound: float = Field(1e4, gt=0, description="a proposal whose per-module ‖ΔW‖_F exceeds this is refused (422)")
    edit_check: Literal["refuse", "report", "off"] = Field(
        "refuse", description="an edit that does not take (after strengthening): 'refuse' = 422, nothing kept; "
        "'report' = kept, its efficacy.take says how it fell short; 'off' = no take check, no strengthening and no "
        "scoring (efficacy null): the proposal is logged and applied as it is, for bulk loads of facts checked "
        "elsewhere")
    edit_max_steps: int = Field(10, ge=0, le=64, description="strengthening budget of an edit that did not take: "
                                "further editor steps at the edited weights (0: the proposal alone, checked)")
    edit_max_delta_rel: float = Field(0.15, gt=0, description="strengthening stops before any module's update "
                                      "exceeds this share of its weight's norm: ‖ΔW_l‖_F ≤ ρ ‖W⁰_l‖_F")

    probe_max_new_tokens: int = Field(8, ge=1, le=64, description="greedy tokens recorded per probe")
    probe_every_edits: int = Field(10, ge=0, description="recompute /probes/report after this many edits (0: never)")
    probe_every_seconds: float = Field(300.0, ge=0, description="recompute /probes/report this often (0: never)")
    probe_max_duty: float = Field(0.1, gt=0, le=1, description="the reports started by probe_every_edits take "
                                  "at most this share of the writer's time (retention is O(active edits))")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)")
    editor_snapshot_every: int = Field(100, ge=0, description="snapshot the editors' state (RLSEdit's C) under "
                                       "<home>/state after this many edits and rollbacks, and at shutdown, so a start "
                                       "replays only the recursion since (0: only at shutdown)")
    db_check_timeout_seconds: float = Field(1.0, gt=0, description="a write first checks the database answers "
                                            "within this long, else 503 (an outage never hangs a request)")

    # ---- production (DESIGN §4, §7) ----
    api_keys: str | None = Field(None, repr=False, description="comma-separated scope:key or scope:name=key "
                                 "(scope read < edit < admin); unset: no auth, loopback only")
    edit_rate_per_second: float = Field(0.0, ge=0, description="per-key rate of POST /edits (0: no limit)")
    edit_burst: int = Field(10, ge=1, description="POST /edits a key may send at once before the rate applies")
    role: Literal["writer", "replica"] = Field("writer", description="writer: accepts edits; replica: serves "
                                               "the writer's log, answers writes with 409")
    redis_url: str | None = Field(None, description="Redis for the writer lock, idempotency keys and change "
                                  "notifications; unset: single process, in-process queue")
    redis_prefix: str = Field("hiedit", min_length=1, description="prefix of every Redis key and channel")
    writer_url: str | None = Field(None, description="the writer's URL, named in a replica's 409 answers")
    writer_lock_ttl_seconds: float = Field(10.0, ge=1, description="the writer lock expires this long after "
                                           "its holder stops renewing it (a SIGKILLed writer)")
    replica_poll_seconds: float = Field(1.0, gt=0, description="a replica reads the log this often even "
                                        "without notifications")

    @field_validator("rlsedit")
    @classmethod
    def _rlsedit_mode(cls, v: str) -> str:
        if v not in ("auto", "on", "off"):
            raise ValueError("rlsedit must be 'auto', 'on' or 'off'")
        return v

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'hiedit.db'}"
