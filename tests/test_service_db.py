"""Alembic migrations: upgrade -> schema equals the models -> downgrade leaves nothing; SQLite and Postgres.
Plus the storage round trip: an edit row, its module rows and its delta blob in one transaction."""
from __future__ import annotations

import pytest
import torch
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from editor_core.delta import LowRankDelta
from service import crud, db
from service.models import Base, Edit, EditLayer, EditStatus

TABLES = {"edits", "edit_layers", "edit_deltas", "probes"}


def test_upgrade_matches_models_and_downgrade_removes_everything(database_url):
    engine = db.make_engine(database_url)
    try:
        db.upgrade(engine)
        names = set(inspect(engine).get_table_names())
        assert TABLES | {"alembic_version"} <= names
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], diff
        db.downgrade(engine)
        assert not TABLES & set(inspect(engine).get_table_names())
        db.upgrade(engine)  # and back up again
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_edit_layers_and_delta_are_stored_together_bit_exactly(database_url):
    engine = db.make_engine(database_url)
    db.upgrade(engine)
    sessions = db.make_sessionmaker(engine)
    g = torch.Generator().manual_seed(0)
    delta = LowRankDelta({"m.0": (torch.randn(8, 3, generator=g), torch.randn(3, 5, generator=g))})
    blob = delta.to_bytes()
    with sessions.begin() as s:
        e = crud.add_edit(s, Edit(status=EditStatus.APPLIED, method="hiedit", model="tiny", prompt="p", target="t",
                                  rephrases=["r"], locality=[], k=1, actor="me", info={}, idempotency_key="key"),
                          [EditLayer(index=0, module="m.0", importance=0.5, selected=True,
                                     delta_norm=delta.frobenius_norm("m.0"), rank=delta.rank("m.0")),
                           EditLayer(index=1, module="m.1", importance=0.1, selected=False, delta_norm=0.0, rank=0)],
                          blob, b"state")
        edit_id = e.id
    with sessions() as s:
        (edit, stored), = crud.edits_with_deltas(s, crud.applied_edit_ids(s))
        assert edit.id == edit_id and stored.blob == blob and stored.state_blob == b"state"
        back = LowRankDelta.from_bytes(stored.blob)
        assert torch.equal(back.factors["m.0"][0], delta.factors["m.0"][0])
        rec = crud.get_edit_by_key(s, "key")
        assert rec.selected_layers == ["m.0"] and [l.rank for l in rec.layers] == [3, 0]
    with sessions.begin() as s:
        crud.set_status(s, edit_id, EditStatus.ROLLED_BACK)
    with sessions() as s:
        assert crud.edits_with_deltas(s, crud.applied_edit_ids(s)) == []
        assert crud.get_edit(s, edit_id).rolled_back_at is not None
    # a second edit with the same idempotency key is refused by the database itself
    from sqlalchemy.exc import IntegrityError
    with pytest.raises(IntegrityError):
        with sessions.begin() as s:
            crud.add_edit(s, Edit(status=EditStatus.APPLIED, method="hiedit", model="tiny", prompt="p", target="t",
                                  rephrases=[], locality=[], k=1, actor="me", info={}, idempotency_key="key"),
                          [], blob, None)
    engine.dispose()


def test_alembic_command_line_uses_hiedit_database_url(tmp_path):
    """What the container entrypoint runs: `alembic -c alembic.ini upgrade head` with HIEDIT_DATABASE_URL."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "HIEDIT_DATABASE_URL": url}
    for step in (["upgrade", "head"], ["downgrade", "base"], ["upgrade", "head"]):
        done = subprocess.run([sys.executable, "-m", "alembic", "-c", str(repo / "alembic.ini"), *step],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    engine = db.make_engine(url)
    assert TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()
