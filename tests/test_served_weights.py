"""The served weights keep no delta in memory: rollbacks read them back from the store (the log), and
checkpoints of the accumulators bound what a start or a rollback re-adds (service/weights.py).

Every state reached with checkpoints is compared byte for byte with a replay from W^0 of the same active
edits, because that is the contract (DESIGN §3): a replica or a restart must serve the same bytes.
"""
from __future__ import annotations

import torch
from fastapi.testclient import TestClient

from conftest import STANDIN_FACTS, STANDIN_OTHER_PROMPT, app_settings, wait_ready
from editor_core.delta import LowRankDelta
from editor_core.model import load_model, model_id
from editor_core.state import MemoryDeltas
from service.main import create_app
from service.weights import ServedWeights


class CountingStore(MemoryDeltas):
    """MemoryDeltas that records which ids each load read (what a LogDeltas would read from the log)."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: list[list[int]] = []

    def load(self, ids):
        self.loaded.append(list(ids))
        return super().load(ids)


def _deltas(model, names: list[str], n: int, seed: int = 0) -> list[tuple[int, LowRankDelta]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for edit_id in range(1, n + 1):
        factors = {}
        for i in torch.randperm(len(names), generator=gen)[:2]:
            name = names[int(i)]
            d_out, d_in = model.get_submodule(name).weight.shape
            r = int(torch.randint(1, 4, (1,), generator=gen))
            factors[name] = (torch.randn(d_out, r, generator=gen) * 0.01, torch.randn(r, d_in, generator=gen))
        out.append((edit_id, LowRankDelta(factors)))
    return out


def _state(model_dir, tmp_path, store=None) -> tuple[ServedWeights, list[str]]:
    model, _ = load_model(model_dir)
    names = [n for n, _ in model.named_modules() if n.endswith(("gate_proj", "up_proj"))]
    return ServedWeights({n: model.get_submodule(n) for n in names}, model_id(model), store or CountingStore(),
                         checkpoint_dir=tmp_path / "ckpt", keep_checkpoints=3), names


def _replayed(model_dir, tmp_path, deltas, active: list[int]) -> ServedWeights:
    fresh, _ = _state(model_dir, tmp_path / "fresh")
    fresh.checkpoint_dir = None
    fresh.apply_many([(i, d) for i, d in deltas if i in active])
    return fresh


def test_rollback_reads_only_the_edits_after_the_newest_older_checkpoint_and_serves_a_replays_bytes(
        standin_model_dir, tmp_path):
    state, names = _state(standin_model_dir, tmp_path)
    model_for_shapes, _ = load_model(standin_model_dir)
    deltas = _deltas(model_for_shapes, names, 40)
    store = state.store
    for edit_id, delta in deltas:
        state.apply(edit_id, delta)
        if edit_id in (10, 20, 30):
            assert state.save_checkpoint() is not None
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["upto-0000000010-n10.safetensors", "upto-0000000020-n20.safetensors",
                     "upto-0000000030-n30.safetensors"]
    assert state.save_checkpoint() is not None  # a 4th: the oldest goes (keep_checkpoints=3)
    assert not (tmp_path / "ckpt" / "upto-0000000010-n10.safetensors").exists()

    store.loaded.clear()
    state.rollback(35)  # newest checkpoint older than 35 is the one at 30: only 31-40 may be read
    (read,) = store.loaded
    assert read and min(read) > 30 and 35 not in read
    # the checkpoint at 40 held edit 35: gone; those at 20 and 30 stand
    assert [c.newest for c in state.checkpoints] == [20, 30]
    assert not (tmp_path / "ckpt" / "upto-0000000040-n40.safetensors").exists()
    active = [i for i, _ in deltas if i != 35]
    assert state.fingerprint() == _replayed(standin_model_dir, tmp_path, deltas, active).fingerprint()

    store.loaded.clear()
    state.rollback(15)  # older than every kept checkpoint but 20 and 30 hold it: from W^0, and both go
    (read,) = store.loaded
    assert read and min(read) < 15 and 15 not in read
    assert state.checkpoints == [] and not list((tmp_path / "ckpt").glob("*.safetensors"))
    active.remove(15)
    want = _replayed(standin_model_dir, tmp_path, deltas, active)
    assert state.fingerprint() == want.fingerprint()
    for n in names:
        assert torch.equal(state.modules[n].weight, want.modules[n].weight)


def test_a_start_loads_the_newest_checkpoint_that_fits_the_log_and_replays_only_what_follows(
        standin_model_dir, tmp_path):
    model_for_shapes, _ = load_model(standin_model_dir)
    writer, names = _state(standin_model_dir, tmp_path)
    deltas = _deltas(model_for_shapes, names, 25, seed=1)
    for edit_id, delta in deltas:
        writer.apply(edit_id, delta)
        if edit_id in (8, 16):
            writer.save_checkpoint()
    log_ids = [i for i, _ in deltas]

    # a fresh process: the newest checkpoint (16) fits the log, the edits after it are replayed
    start, _ = _state(standin_model_dir, tmp_path)
    covered = start.load_checkpoint(log_ids)
    assert covered == log_ids[:16] and start.active_ids == covered
    start.apply_many([(i, d) for i, d in deltas if i > 16])
    assert start.fingerprint() == writer.fingerprint() != start.base_fingerprint

    # edit 12 rolled back behind this server's back: the checkpoint at 16 holds it, so it is deleted and
    # the one at 8 is used
    wanted = [i for i in log_ids if i != 12]
    again, _ = _state(standin_model_dir, tmp_path)
    assert again.load_checkpoint(wanted) == log_ids[:8]
    assert not (tmp_path / "ckpt" / "upto-0000000016-n16.safetensors").exists()
    again.apply_many([(i, d) for i, d in deltas if i > 8 and i != 12])
    assert again.fingerprint() == _replayed(standin_model_dir, tmp_path, deltas, wanted).fingerprint()

    # a checkpoint whose bytes no longer give its fingerprint is not used, and the state is left at W^0
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "ckpt" / "upto-0000000008-n8.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1.0
    save_file(tensors, path, metadata=meta)
    corrupt, _ = _state(standin_model_dir, tmp_path)
    assert corrupt.load_checkpoint(wanted) == [] and corrupt.active_ids == []
    assert corrupt.fingerprint() == corrupt.base_fingerprint


def test_the_service_keeps_no_delta_in_memory_and_restarts_from_its_checkpoint(tmp_path, standin_model_dir,
                                                                                standin_editor_dir, caplog):
    """Through the HTTP API: edits, a stop (which checkpoints), a start that loads the checkpoint (the log
    line says so) and serves the same fingerprint, then a rollback of an edit the checkpoint holds."""
    from service.loading import load_all
    from service.weights import LogDeltas

    def app():
        cfg = app_settings(tmp_path, model=str(standin_model_dir), editor=str(standin_editor_dir))
        return create_app(cfg, load_all(cfg))

    with TestClient(app()) as c:
        wait_ready(c)
        assert isinstance(c.app.state.engine.state.store, LogDeltas)
        ids = []
        for prompt, target in [(f.prompt, f.target) for f in STANDIN_FACTS] + [(STANDIN_OTHER_PROMPT, "France")]:
            r = c.post("/edits", json={"prompt": prompt, "target": target})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        before = c.get("/state").json()["fingerprint"]
    held = tmp_path / "state" / "weights" / f"upto-{ids[-1]:010d}-n{len(ids)}.safetensors"
    assert held.is_file()  # written at the stop

    caplog.set_level("INFO", logger="hiedit.engine")
    with TestClient(app()) as c:
        wait_ready(c)
        assert f"served weights from a checkpoint of {len(ids)} edits" in caplog.text
        assert c.get("/state").json()["fingerprint"] == before
        r = c.post(f"/edits/{ids[0]}/rollback")
        assert r.status_code == 200, r.text
        after = c.get("/state").json()["fingerprint"]
    held = tmp_path / "state" / "weights" / f"upto-{ids[-1]:010d}-n{len(ids)}.safetensors"
    assert len(ids) == 3 and not held.exists()  # it held ids[0]
    with TestClient(app()) as c:  # no checkpoint fits: a replay from W^0 gives the same bytes
        wait_ready(c)
        assert c.get("/state").json()["fingerprint"] == after


def test_heap_retention_is_bounded_unless_the_operator_chose(monkeypatch):
    """glibc's mmap/trim thresholds are pinned at start (the RSS figure is bench/long_history.py's); an
    operator's MALLOC_MMAP_THRESHOLD_ is left alone."""
    from service.loading import bound_heap_retention

    assert bound_heap_retention() is True  # glibc Linux, as in the images and CI
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert bound_heap_retention() is False
