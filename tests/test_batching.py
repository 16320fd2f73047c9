"""Continuous batching (service/batching.py): concurrent requests decoded together give what each gets alone,
an edit never lands inside a request, seeded sampling repeats, and Gemma-3's sliding-window cache is batched
statically but correctly."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import STANDIN_FACTS, app_settings, wait_ready
from editor_core.model import load_model
from service.main import create_app

torch.set_num_threads(1)

PROMPTS = ["The capital of France is", "The mother tongue of Danielle Darrieux is", "Apple A5 was created by",
           "Toko Yasuda, the", "The Eiffel Tower is located in", "Once upon a time", "Python is a",
           "The largest planet in the solar system is", "Leonardo da Vinci painted", "Water boils at",
           "The official language of Brazil is", "In 1969, Neil Armstrong", "The chemical symbol for gold is",
           "Tokyo is the capital of", "The author of Hamlet is", "My favourite food is"]


def _engine_app(tmp_path, model_dir, **settings):
    model, tok = load_model(model_dir)
    return create_app(app_settings(tmp_path, **settings), (model, tok, {}, {}))


@pytest.mark.parametrize("max_batch", [16])
def test_sixteen_concurrent_requests_get_what_each_gets_alone(tmp_path, smollm2_dir, max_batch):
    with TestClient(_engine_app(tmp_path, smollm2_dir, max_concurrent_generations=max_batch)) as c:
        wait_ready(c)
        engine = c.app.state.engine
        alone = [engine.generate(p, 12) for p in PROMPTS]
        steps_alone = engine.batcher.steps
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(lambda p: engine.generate(p, 12), PROMPTS))
        steps_together = engine.batcher.steps - steps_alone
        assert together == alone
        # they really were decoded together: far fewer forward passes than one request after another
        assert steps_together < steps_alone / 3, (steps_together, steps_alone)


def test_an_edit_waits_for_the_requests_it_would_change(tmp_path, standin_components):
    """A request sees one set of weights from its first token to its last; the edit swaps after it."""
    fact = STANDIN_FACTS[0]
    with TestClient(create_app(app_settings(tmp_path), standin_components)) as c:
        wait_ready(c)
        engine = c.app.state.engine
        before = engine.generate(fact.prompt, 200, ignore_eos=True)
        started, done = threading.Event(), {}

        def long_request() -> None:
            done["text"] = engine.generate(fact.prompt, 200, ignore_eos=True, on_token=lambda t: started.set())
            done["at"] = time.monotonic()

        worker = threading.Thread(target=long_request)
        worker.start()
        assert started.wait(30)
        r = c.post("/edits", json={"prompt": fact.prompt, "target": fact.target})
        edited_at = time.monotonic()
        worker.join(60)
        assert r.status_code == 201, r.text
        assert done["text"] == before  # decoded on the weights it started with, to the last token
        assert done["at"] <= edited_at
        assert engine.generate(fact.prompt, 200, ignore_eos=True) != before  # the edit did land


def test_seeded_sampling_repeats_and_batched_rows_keep_their_own_stream(tmp_path, standin_components):
    fact = STANDIN_FACTS[1]
    with TestClient(create_app(app_settings(tmp_path), standin_components)) as c:
        wait_ready(c)
        engine = c.app.state.engine
        one = engine.generate(fact.prompt, 24, temperature=1.5, seed=11)
        assert engine.generate(fact.prompt, 24, temperature=1.5, seed=11) == one
        assert engine.generate(fact.prompt, 24, temperature=1.5, seed=12) != one
        with ThreadPoolExecutor(8) as pool:  # greedy neighbours in the batch leave a seeded row's draws alone
            outs = list(pool.map(lambda i: engine.generate(fact.prompt, 24, temperature=1.5 if i == 0 else 0.0,
                                                           seed=11 if i == 0 else None), range(8)))
        assert outs[0] == one


def test_gemma3_is_batched_statically_and_correctly(tmp_path, gemma3_dir):
    prompts = PROMPTS[:4]
    with TestClient(_engine_app(tmp_path, gemma3_dir)) as c:
        wait_ready(c)
        engine = c.app.state.engine
        alone = [engine.generate(p, 8) for p in prompts]
        assert engine.batcher.joinable is False  # sliding-window layers: no join mid-batch
        with ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(lambda p: engine.generate(p, 8), prompts)) == alone
