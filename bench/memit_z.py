"""What projecting the vocabulary only where MEMIT's value loss reads it saves (editor_core/memit.py).

MEMIT's target value z (RLSEdit, AlphaEdit, memit-nohist) is fitted by up to v_steps forward/backward
passes over the rewriting prompts. ``_compute_z`` asks ``tensors.logits_at`` for the target positions and
the KL position only; the full path projects every position and indexes after (what it did before).
This fits z for the same facts both ways, in one process, alternating per fact, and prints the CPU time
of each, their ratio, the step counts and how far the two z's are apart.

    python bench/memit_z.py                                            # the demo model, 6 facts
    python bench/memit_z.py --model $HIEDIT_HOME/models/smollm2-135m-instruct --threads 1

The LAST line printed is JSON.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import emit, load_average  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory or hub id (default: the demo model)")
    p.add_argument("--data", help="CounterFact file (default: ../shared/data/counterfact/counterfact-val.json)")
    p.add_argument("--n", type=int, default=6, help="facts, each fitted both ways")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)

    import torch

    import editor_core.memit as memit
    from editor_core.assets import DEMO_MODEL
    from editor_core.data import SHARED_DATA, load_counterfact
    from editor_core.model import decoder_layers, load_model
    from editor_core.rlsedit import RLSEditConfig, default_fact_token, default_layer_spec, default_v_lr_scale
    from editor_core.subject import find_subject

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model or DEMO_MODEL, "float32")
    n_layers = len(decoder_layers(model))
    cfg = RLSEditConfig()
    cfg.fact_token = default_fact_token(n_layers)
    cfg.layers = default_layer_spec(n_layers, cfg.fact_token)
    cfg.v_lr_scale = default_v_lr_scale(model)
    editor = memit.MemitEditor(model, tok, cfg)
    data = args.data or SHARED_DATA / "counterfact" / "counterfact-val.json"
    facts = load_counterfact(data, tok, skip_bad=True, limit=args.n).records

    def full(model, ids, att, keep):  # every position projected, then indexed
        return model(input_ids=ids, attention_mask=att, use_cache=False).logits[keep.to(ids.device)].float()

    kept_fn = memit.logits_at
    cpu = {"kept": 0.0, "full": 0.0}
    steps = {"kept": [], "full": []}
    rel = []
    for f in facts:
        subject = find_subject(f.prompt, f.subject)
        z = {}
        for name, fn in (("full", full), ("kept", kept_fn)):
            memit.logits_at = fn
            try:
                t0 = time.process_time()
                z[name], info = editor._compute_z(subject, f.prompt, f.target_new)
                cpu[name] += time.process_time() - t0
            finally:
                memit.logits_at = kept_fn
            steps[name].append(info["z_steps"])
        rel.append(float((z["kept"] - z["full"]).norm() / z["full"].norm()))
    return emit({"model": str(args.model or "demo"), "facts": len(facts), "threads": torch.get_num_threads(),
                 "cpu_s_kept": round(cpu["kept"], 3), "cpu_s_full": round(cpu["full"], 3),
                 "ratio_kept_to_full": round(cpu["kept"] / cpu["full"], 3),
                 "same_steps": steps["kept"] == steps["full"], "steps": steps["kept"],
                 "max_z_rel_diff": max(rel), "load_average": load_average()})


if __name__ == "__main__":
    main()
