"""POST /v1/completions and GET /v1/models: the OpenAI request and response shapes, errors in the
OpenAI shape, and completions that follow the edited weights (in-process, SQLite)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import STANDIN_FACTS, STANDIN_OTHER_PROMPT
from service.main import create_app
from service.settings import Settings

FACT1, _ = STANDIN_FACTS
KEY = "reader-key-for-openai"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def _client(tmp_path: Path, components, **kw) -> TestClient:
    settings = Settings(home=tmp_path, rlsedit="off", torch_threads=1, probe_every_seconds=0, probe_every_edits=0,
                        api_keys=f"read:{KEY},edit:editor-key-openai", **kw)
    return TestClient(create_app(settings, components))


def _ready(c: TestClient) -> str:
    for _ in range(300):
        if c.get("/readyz").status_code == 200:
            return c.get("/v1/models", headers=HEADERS).json()["data"][0]["id"]
        time.sleep(0.05)
    raise AssertionError(c.get("/readyz").text)


def test_completion_has_the_openai_shape_and_matches_generate(tmp_path, standin_components):
    with _client(tmp_path, standin_components) as c:
        model = _ready(c)
        models = c.get("/v1/models", headers=HEADERS).json()
        assert models["object"] == "list" and models["data"][0]["object"] == "model"
        # exactly what the OpenAI SDK sends for client.completions.create(model=, prompt=, max_tokens=, temperature=)
        r = c.post("/v1/completions", headers={**HEADERS, "Content-Type": "application/json"},
                   json={"model": model, "prompt": STANDIN_OTHER_PROMPT, "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == model and body["id"].startswith("cmpl-")
        assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 60
        (choice,) = body["choices"]
        assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
        want = c.get("/generate", params={"prompt": STANDIN_OTHER_PROMPT, "max_new_tokens": 3}, headers=HEADERS).json()
        assert choice["text"] == want["text"]
        usage = body["usage"]
        assert usage["completion_tokens"] == 3 and usage["prompt_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + 3
        # a list of one prompt is the same request
        again = c.post("/v1/completions", headers=HEADERS,
                       json={"model": model, "prompt": [STANDIN_OTHER_PROMPT], "max_tokens": 3, "temperature": 0})
        assert again.json()["choices"][0]["text"] == choice["text"]
        # seeded sampling is reproducible
        seeded = [c.post("/v1/completions", headers=HEADERS, json={"prompt": FACT1.prompt, "max_tokens": 4,
                                                                   "temperature": 1.5, "seed": 7}).json()
                  for _ in range(2)]
        assert seeded[0]["choices"][0]["text"] == seeded[1]["choices"][0]["text"]


def test_stop_sequence_cuts_the_text_and_finishes_with_stop(tmp_path, standin_components):
    with _client(tmp_path, standin_components) as c:
        model = _ready(c)
        full = c.post("/v1/completions", headers=HEADERS,
                      json={"model": model, "prompt": STANDIN_OTHER_PROMPT, "max_tokens": 6, "temperature": 0}).json()
        text = full["choices"][0]["text"]
        assert len(text.strip()) >= 2, text
        stop = text.strip()[1]  # a character that occurs after the start of the continuation
        cut = c.post("/v1/completions", headers=HEADERS,
                     json={"model": model, "prompt": STANDIN_OTHER_PROMPT, "max_tokens": 6, "temperature": 0,
                           "stop": [stop]}).json()
        assert cut["choices"][0]["text"] == text[:text.index(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert cut["usage"]["completion_tokens"] <= full["usage"]["completion_tokens"]


def test_completion_follows_an_edit(tmp_path, standin_components):
    with _client(tmp_path, standin_components) as c:
        model = _ready(c)

        def complete() -> str:
            r = c.post("/v1/completions", headers=HEADERS,
                       json={"model": model, "prompt": FACT1.prompt, "max_tokens": 1, "temperature": 0})
            return r.json()["choices"][0]["text"]
        assert complete().strip() != FACT1.target
        edit = c.post("/edits", headers={"Authorization": "Bearer editor-key-openai"},
                      json={"prompt": FACT1.prompt, "target": FACT1.target})
        assert edit.status_code == 201, edit.text
        assert complete().strip() == FACT1.target


@pytest.mark.parametrize("body,status,param,words", [
    ({"prompt": "x", "n": 2}, 400, "n", "less than or equal to 1"),
    ({"prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of", "Extra inputs"),
    ({"prompt": ["a", "b"]}, 400, "prompt", "exactly one prompt"),
    ({"prompt": "   "}, 400, "prompt", "empty"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens", "HIEDIT_MAX_NEW_TOKENS"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4"),
    ({"prompt": "word " * 300}, 422, "prompt", "over the limit"),
    ({"prompt": "x", "model": "gpt-4"}, 404, None, "is not served here"),
    ({}, 400, "prompt", "Field required"),
])
def test_bad_requests_get_openai_shaped_errors(tmp_path, standin_components, body, status, param, words):
    with _client(tmp_path, standin_components) as c:
        _ready(c)
        r = c.post("/v1/completions", headers=HEADERS, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["param"] == param and words in err["message"], err
        assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_invalid_json_and_missing_key_are_openai_shaped(tmp_path, standin_components):
    with _client(tmp_path, standin_components) as c:
        _ready(c)
        r = c.post("/v1/completions", headers={**HEADERS, "Content-Type": "application/json"}, content=b"{nope")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"


def test_openai_sdk_completes_a_prompt(tmp_path, standin_components):
    """The real OpenAI Python SDK (a dev dependency), unchanged, pointed at the app."""
    import openai

    with _client(tmp_path, standin_components) as c:
        model = _ready(c)
        client = openai.OpenAI(api_key=KEY, base_url="http://testserver/v1", http_client=c, max_retries=0)
        assert [m.id for m in client.models.list()] == [model]
        out = client.completions.create(model=model, prompt=STANDIN_OTHER_PROMPT, max_tokens=3, temperature=0)
        assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 3 and out.choices[0].text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(api_key="wrong-key-123", base_url="http://testserver/v1", http_client=c,
                          max_retries=0).completions.create(model=model, prompt="x", max_tokens=1)


def _events(response) -> list[str]:
    """The data lines of a server-sent-event body."""
    return [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]


@pytest.mark.parametrize("stop", [None, [" t"], "e"])
def test_stream_concatenates_to_the_plain_answer(tmp_path, standin_components, stop):
    """Raw SSE: chunks, a finish chunk, the usage chunk when asked, [DONE]; stop sequences cut alike."""
    import json

    with _client(tmp_path, standin_components) as c:
        _ready(c)
        body = {"prompt": FACT1.prompt, "max_tokens": 12, "temperature": 0, "stop": stop}
        plain = c.post("/v1/completions", headers=HEADERS, json=body).json()
        r = c.post("/v1/completions", headers=HEADERS,
                   json={**body, "stream": True, "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(ch["object"] == "text_completion" and ch["id"] == chunks[0]["id"] for ch in chunks)
        texts = [ch["choices"][0]["text"] for ch in chunks if ch["choices"]]
        assert "".join(texts) == plain["choices"][0]["text"]
        finishes = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]]
        assert finishes[-1] == plain["choices"][0]["finish_reason"] and set(finishes[:-1]) == {None}
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
        # without include_usage there is no usage chunk (what OpenAI clients expect)
        quiet = [json.loads(e) for e in _events(c.post("/v1/completions", headers=HEADERS,
                                                       json={**body, "stream": True}))[:-1]]
        assert all(ch["choices"] and "usage" not in ch for ch in quiet)


def test_stream_refusals_are_plain_errors(tmp_path, standin_components):
    """A stream that cannot start answers a JSON error, never a 200 event stream."""
    with _client(tmp_path, standin_components) as c:
        _ready(c)
        r = c.post("/v1/completions", headers=HEADERS, json={"prompt": "word " * 300, "stream": True})
        assert r.status_code == 422 and r.json()["error"]["param"] == "prompt"
        r = c.post("/v1/completions", headers=HEADERS, json={"prompt": "x", "stream": True, "max_tokens": 10_000})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("body,param,words", [
    ({"messages": []}, "messages", "at least one message"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages.0.content",
     "got type 'image_url'"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs", "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "max_completion_tokens": 4}, None,
     "disagree"),
    ({}, "messages", "Field required"),
])
def test_bad_chat_requests_name_the_field(tmp_path, standin_components, body, param, words):
    with _client(tmp_path, standin_components) as c:
        _ready(c)
        r = c.post("/v1/chat/completions", headers=HEADERS, json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and (words is None or words in err["message"]), err


def test_chat_on_a_model_without_a_template_names_messages(tmp_path, standin_components):
    with _client(tmp_path, standin_components) as c:
        _ready(c)
        assert not getattr(c.app.state.engine.tokenizer, "chat_template", None)
        r = c.post("/v1/chat/completions", headers=HEADERS, json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "messages" and "has no chat template" in err["message"] and "/v1/completions" in err[
            "message"]
