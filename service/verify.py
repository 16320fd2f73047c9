"""Which fingerprint the writer recorded for a state of the log: what a replica verifies its weights against.

The writer records, after every change of its weights, its fingerprint and a digest of the edits then
active: ``fingerprint_after`` / ``active_digest`` when it applies an edit, ``fingerprint_rolled_back`` /
``active_digest_rolled_back`` when it rolls one back (migration 0004). The served weights are the id-ordered
sum of the active edits (DESIGN §3), summed the same way on any machine (service.weights), so a replica
whose active edits have a recorded digest must have the fingerprint recorded with it, bit for bit.

Matching on the active edits, not on the order of events, keeps this right when the log changed without
the writer passing through the new state: an edit marked failed by a later replay, a rollback put back
after it failed. Such a state has no recorded fingerprint; it is not verified, and not called a mismatch.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from .crud import LogRow
from .models import EditStatus


def active_digest(ids: Iterable[int]) -> str:
    """16 hex digits of sha256 over the sorted active edit ids: names a set of edits, not weights."""
    return hashlib.sha256(",".join(str(i) for i in sorted(ids)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Expected:
    """The writer's fingerprint of one state: after edit ``edit_id`` (``event`` "edit") or after its rollback."""
    event: str                   # "edit" | "rollback"
    edit_id: int
    fingerprint: str | None
    why_not: str | None = None   # why there is nothing to compare with (None when there is)

    def describe(self) -> str:
        return f"edit {self.edit_id}" if self.event == "edit" else f"the rollback of edit {self.edit_id}"


def _recorded(rows: list[LogRow], scheme: str):
    """(digest, Expected) of every state the writer recorded, oldest first."""
    for r in rows:
        if r.status not in (EditStatus.APPLIED, EditStatus.ROLLED_BACK):
            continue  # a failed edit never changed the writer's weights
        yield r.active_digest, _expected(r, "edit", r.fingerprint_after, r.active_digest, scheme)
        if r.status == EditStatus.ROLLED_BACK:
            yield r.active_digest_rolled_back, _expected(r, "rollback", r.fingerprint_rolled_back,
                                                         r.active_digest_rolled_back, scheme)


def last_state(rows: list[LogRow], active: list[int], scheme: str) -> Expected | None:
    """The writer's fingerprint of the state whose active edits are ``active`` (the log's applied edits).

    The newest recorded state with exactly these edits; an Expected without fingerprint (``why_not``) when
    there is none; None when no edit is active and none was ever recorded (the base weights)."""
    want = active_digest(active)
    found = None
    for digest, expected in _recorded(rows, scheme):
        if digest == want and expected.fingerprint is not None:
            found = expected
    if found is not None:
        return found
    newest = max((e for _, e in _recorded(rows, scheme)), key=lambda e: (e.edit_id, e.event == "rollback"),
                 default=None)
    if newest is None:
        return None
    if newest.fingerprint is None:  # most often the writer is about to record it: the next sync looks again
        return newest
    return Expected(newest.event, newest.edit_id, None,
                    "the writer recorded no state with exactly these active edits (the log was changed without "
                    "it, e.g. an edit marked failed by a replay)")


def edit_states(rows: list[LogRow], active: list[int], scheme: str) -> dict[int, Expected]:
    """For each edit of ``active`` whose recorded state is the prefix of ``active`` up to it: the fingerprint
    a replica that applies ``active`` one by one, in id order, must read right after applying that edit."""
    by_id = {r.id: r for r in rows}
    out, prefix = {}, []
    for edit_id in active:
        prefix.append(edit_id)
        r = by_id.get(edit_id)
        if r is not None and r.active_digest == active_digest(prefix):
            out[edit_id] = _expected(r, "edit", r.fingerprint_after, r.active_digest, scheme)
    return out


def _expected(row: LogRow, event: str, fingerprint: str | None, digest: str | None, scheme: str) -> Expected:
    if fingerprint is None:
        return Expected(event, row.id, None, "the writer has not recorded its fingerprint (yet)")
    if row.fingerprint_scheme is None or digest is None:
        return Expected(event, row.id, None, "recorded before migration 0004 (no fingerprint scheme or active edits)")
    if row.fingerprint_scheme != scheme:
        return Expected(event, row.id, None, f"the writer summed the weights another way ({row.fingerprint_scheme}, "
                                             f"here {scheme})")
    return Expected(event, row.id, fingerprint)
