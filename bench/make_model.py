"""A randomly initialised model of a real model's shape (and an untrained HiEdit editor for it), for the
benchmarks on a GPU: latency, memory and throughput depend on the shapes, not on what the weights know.

    python bench/make_model.py --shape llama3-8b --dtype bfloat16 --device cuda --out /data/llama3-8b-shape
    python bench/make_model.py          # the demo model's shape into a fresh temporary directory: seconds on a CPU

writes the model and a byte-level tokenizer (trained locally; the config keeps the shape's vocabulary,
Llama-3's 128,256 rows for llama3-*, so the embedding is full size) to ``--out``, and an untrained HiEdit
checkpoint over ``--editor-spec`` to ``--out``/hiedit (k = L/2). Nothing is downloaded. The LAST line is JSON.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import emit  # noqa: E402

SHAPES = {  # hidden, layers, intermediate, heads, kv heads, vocab, context
    "llama3-8b": dict(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256, ctx=8192),
    "llama3.2-1b": dict(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, vocab=128256, ctx=8192),
    "demo": dict(hidden=192, layers=6, intermediate=768, heads=4, kv_heads=2, vocab=2048, ctx=512),
}
# The HiEdit modules of each shape's editor: DESIGN's example on Llama-3-8B, the same depths on 16 layers,
# and the demo editor's.
EDITOR_SPECS = {"llama3-8b": "gate[11-15],up[18-24]", "llama3.2-1b": "gate[5-7],up[9-12]", "demo": "gate[2-5],up[2-5]"}


def main(argv: list[str] | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from editor_core.hiedit import HiEditor
    from editor_core.tiny import _FALLBACK_CORPUS, tiny_config, train_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo",
                    help="default: demo (an 8B model on a CPU takes 16 GB and many minutes)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="cpu", help="where to initialise (cuda is much faster for 8B)")
    ap.add_argument("--editor-spec", default=None,
                    help="HiEdit modules (default: per shape, " + ", ".join(f"{k} {v}" for k, v in EDITOR_SPECS.items()) + ")")
    ap.add_argument("--out", default=None, help="output directory (default: a fresh temporary one)")
    args = ap.parse_args(argv)
    s = SHAPES[args.shape]
    out = Path(args.out or tempfile.mkdtemp(prefix=f"hiedit-{args.shape}-shape-"))
    spec = args.editor_spec or EDITOR_SPECS[args.shape]
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(_FALLBACK_CORPUS * 20, vocab_size=512, model_max_length=s["ctx"])
    cfg = tiny_config("llama", vocab_size=s["vocab"], hidden=s["hidden"], layers=s["layers"],
                      intermediate=s["intermediate"], heads=s["heads"], kv_heads=s["kv_heads"], max_positions=s["ctx"])
    cfg.tie_word_embeddings = False  # as Llama-3-8B
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    editor = HiEditor.create(model, tokenizer, spec, seed=0)
    editor.save(out / "hiedit")
    return emit({"out": str(out), "shape": args.shape, "dtype": args.dtype,
                 "parameters": sum(p.numel() for p in model.parameters()),
                 "editor": str(out / "hiedit"), "editor_spec": spec, "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
