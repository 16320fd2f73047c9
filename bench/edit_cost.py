"""What one real-model edit costs: ``POST /edits`` (propose, take check, strengthening, log, apply) against one
forward + backward of the same prompt and target, interleaved fact by fact in one process.

The app runs in-process (``fastapi.testclient``: the whole HTTP stack, no socket) on SmolLM2-135M-Instruct
with its committed editor and the serving defaults (``--edit-check refuse``, RLSEdit off: HiEdit's cost is
measured). For each of ``--n`` facts of the model's ``known_facts.json`` (each edited to its CounterFact
target, all staying applied): time the POST, then time the *floor*: a forward of prompt + target and the
backward of the target tokens' loss down to the editable modules' weights, the gradient an edit cannot
do without. ``--profile`` adds the writer thread's cProfile of the edit jobs (top functions by
cumulative time) on stderr. The LAST line printed is JSON.

    python bench/edit_cost.py                        # 20 facts, 2 torch threads
    python bench/edit_cost.py --n 5 --profile
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import emit, hiedit_home, load_average, percentile  # noqa: E402


def floor_seconds(model, tokenizer, modules: list[str], prompt: str, target: str) -> float:
    """Forward of prompt + target, backward of the target tokens' loss to ``modules``' weights only."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + target_ids])
    labels = torch.full_like(ids, -100)
    labels[0, len(prompt_ids):] = ids[0, len(prompt_ids):]
    weights = [model.get_submodule(m).weight for m in modules]
    flags = [w.requires_grad for w in weights]
    t0 = time.perf_counter()
    with torch.enable_grad():
        for w in weights:
            w.requires_grad_(True)
        loss = model(input_ids=ids, labels=labels).loss
        torch.autograd.grad(loss, weights)
    elapsed = time.perf_counter() - t0
    for w, f in zip(weights, flags):
        w.requires_grad_(f)
    return elapsed


def main(argv: list[str] | None = None) -> dict:
    from fastapi.testclient import TestClient

    from editor_core.catalog import KNOWN_MODELS, resolve_model
    from editor_core.hiedit import HiEditor
    from editor_core.model import load_model
    from service.main import create_app
    from service.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", choices=sorted(KNOWN_MODELS))
    ap.add_argument("--n", type=int, default=20, help="facts edited (all stay applied)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--home", default=None, help="where the model is converted once, under models/ (default: "
                                                 "$HIEDIT_HOME, else hiedit serve's default home)")
    ap.add_argument("--profile", action="store_true", help="cProfile of the writer's edit jobs on stderr")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    known = KNOWN_MODELS[args.model]
    home = Path(args.home) if args.home else hiedit_home()
    model, tok = load_model(resolve_model(args.model, home))
    editor = HiEditor.load(known.editor, model, tok)
    facts = json.loads((known.assets / "known_facts.json").read_text())["facts"][:args.n]
    log_home = Path(tempfile.mkdtemp(prefix="hiedit-edit-cost-log-"))
    settings = Settings(home=log_home, rlsedit="off", torch_threads=args.threads, probe_every_edits=0,
                        probe_every_seconds=0)
    profile = cProfile.Profile() if args.profile else None
    edits, floors, kept = [], [], 0
    with TestClient(create_app(settings, (model, tok, {"hiedit": editor}, {}))) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.05)
        engine = client.app.state.engine
        if profile is not None:  # the edit job runs on the writer thread: profile it there
            job = engine._edit_job

            def profiled(*a, **kw):
                profile.enable()
                try:
                    return job(*a, **kw)
                finally:
                    profile.disable()
            engine._edit_job = profiled
        modules = list(engine.state.modules)
        floor_seconds(model, tok, modules, facts[0]["prompt"], facts[0]["target_new"])  # warm-up
        for i, fact in enumerate(facts):
            t0 = time.perf_counter()
            r = client.post("/edits", json={"prompt": fact["prompt"], "target": fact["target_new"]})
            edits.append(time.perf_counter() - t0)
            kept += r.status_code == 201
            floors.append(floor_seconds(model, tok, modules, fact["prompt"], fact["target_new"]))
            print(f"{i + 1}/{len(facts)} {r.status_code} edit {edits[-1] * 1000:.0f} ms, floor "
                  f"{floors[-1] * 1000:.0f} ms", file=sys.stderr)
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(35)
        print(out.getvalue(), file=sys.stderr)
    p50_edit, p50_floor = percentile(edits, 0.5), percentile(floors, 0.5)
    return emit({"model": args.model, "n": len(facts), "kept": kept, "refused": len(facts) - kept,
                 "threads": args.threads, "edit_ms_p50": round(p50_edit * 1000, 1),
                 "edit_ms_p90": round(percentile(edits, 0.9) * 1000, 1), "floor_ms_p50": round(p50_floor * 1000, 1),
                 "edit_over_floor_p50": round(p50_edit / p50_floor, 2),
                 "floor": "forward of prompt + target, backward of the target loss to the editable modules' weights",
                 "load_average": load_average()})


if __name__ == "__main__":
    main()
