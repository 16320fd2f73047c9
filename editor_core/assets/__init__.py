"""Paths of the committed demo assets (rebuilt by ``hiedit build-demo``)."""
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
DEMO = ASSETS / "demo"
DEMO_MODEL = DEMO / "model"          # Llama-architecture base model + tokenizer that knows CounterFact facts
DEMO_GEMMA = DEMO / "gemma2"         # smaller Gemma-2-architecture twin
DEMO_HIEDIT = DEMO / "hiedit"        # trained HiEdit editor (k = L/2) for DEMO_MODEL
DEMO_RLEDIT = DEMO / "rledit"        # the same training with k = L
DEMO_SPLIT = DEMO / "split.json"     # which CounterFact case_ids train the editor, which are evaluation streams
