"""The official ``openai`` client against SmolLM2-135M-Instruct: chat through its own template, streaming.

At temperature 0 a stream's chunks concatenate to the non-streaming answer, for chat and for plain
completions; a client that goes away mid-stream stops the generation and leaves the server serving.
"""
from __future__ import annotations

import re
import time

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import app_settings, wait_ready
from editor_core.model import load_model
from service.main import create_app

torch.set_num_threads(1)

MODEL = "smollm2-135m-instruct"
CHAT = [{"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory, smollm2_dir):
    model, tok = load_model(smollm2_dir)
    app = create_app(app_settings(tmp_path_factory.mktemp("openai-home")), (model, tok, {}, {}))
    with TestClient(app) as c:
        wait_ready(c)
        yield openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=c, max_retries=0)


def test_chat_uses_the_models_template_and_streams_the_same_answer(client):
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=32, temperature=0)
    answer = plain.choices[0].message.content
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert "Paris" in answer and "<|im_end|>" not in answer  # the template's end-of-turn ended it
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 32
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=32, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == answer
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # it did stream
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert chunks[-1].system_fingerprint == plain.system_fingerprint


def test_completion_streams_the_same_text(client):
    prompt = "The Eiffel Tower is located in the city of"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    stop = " " + plain.choices[0].text.split()[1]  # a stop sequence the answer does contain
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == plain.choices[0].text[:plain.choices[0].text.index(stop)]
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop],
                                         stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == cut.choices[0].text


def test_bad_chat_requests_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool-x", "content": "hi"}], max_tokens=4)
    assert e.value.body["param"] == "messages.0.role"


def _generated_tokens(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(re.search(r"^hiedit_generated_tokens_total (\S+)$", text, re.M).group(1))


def test_a_client_gone_mid_stream_frees_the_server(server_factory, smollm2_dir):
    """One generation slot: if the abandoned stream kept decoding (or kept its slot), the next request would wait."""
    server = server_factory("--model", str(smollm2_dir), "--editor", "none", "--rlsedit", "off",
                            "--torch-threads", "1", env={"HIEDIT_MAX_CONCURRENT_GENERATIONS": "1"})
    body = {"prompt": "Once upon a time", "max_tokens": 256, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert '"text"' in first
        # the connection is closed here, long before 256 tokens
    deadline = time.monotonic() + 60
    seen = -1.0
    while time.monotonic() < deadline:  # the cancelled generation is counted once it has stopped
        now = _generated_tokens(server.url)
        if now == seen and now > 0:
            break
        seen = now
        time.sleep(1.0)
    assert 0 < seen < 256, seen
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200 and time.monotonic() - t0 < 30, r.text
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
