"""bench/real_model_edits.py without a server: its rules, its summary, and one run against a fake
server (an httpx.MockTransport that applies edits to a dict of answers)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import real_model_edits as bench  # noqa: E402


def fact(case_id, prompt, truth, new, neighbour_stated=True):
    return {"case_id": case_id, "prompt": prompt, "subject": prompt.split()[0], "ground_truth": truth,
            "target_new": new, "rephrase_prompt": f"In other words, {prompt}", "locality_prompt": f"Near {prompt}",
            "locality_ground_truth": truth, "neighbour_stated": neighbour_stated,
            "greedy": {"prompt": f" {truth} and more"}}


@pytest.mark.parametrize("continuation,target,expected", [
    (" Rome, the capital", "Rome", True),
    ("\n\nRome", " Rome ", True),
    (" Romania", "Rome", False),
    (" Paris", "Rome", False),
    ("", "Rome", False),
    (" New York City", "New York", True),
    (" New", "New York", False),  # the whole target, not its first word
    (" anything", "   ", False),  # an empty target is never taken
])
def test_starts_with_target(continuation, target, expected):
    assert bench.starts_with_target(continuation, target) is expected


def test_choose_facts_prefers_neighbour_stated_and_keeps_file_order():
    facts = [fact(i, f"P{i} is", "A", "B", neighbour_stated=i in (1, 3, 4)) for i in range(6)]
    assert [f["case_id"] for f in bench.choose_facts(facts, 2)] == [1, 3]
    assert [f["case_id"] for f in bench.choose_facts(facts, 4)] == [0, 1, 3, 4]
    assert [f["case_id"] for f in bench.choose_facts(facts, 99)] == list(range(6))
    assert bench.choose_facts(facts, 0) == []


def test_edit_body_matches_the_request_schema():
    from service.schemas import EditIn

    f = fact(7, "Apple A5 was created by", "Apple", "Google")
    body = bench.edit_body(f)
    assert body == {"prompt": f["prompt"], "target": "Google", "rephrases": [f["rephrase_prompt"]],
                    "locality": [{"prompt": f["locality_prompt"], "target": "Apple"}]}
    EditIn.model_validate(body)  # strict, extra="forbid": a misnamed field fails here


def test_summarize_counts_and_percentiles():
    rows = [
        {"case_id": 1, "status": 201, "applied": True, "taken": True, "kept": True, "taken_at_end": True,
         "latency_s": 1.0, "server_latency_ms": 900.0, "detail": None, "base_matches": True},
        {"case_id": 2, "status": 201, "applied": True, "taken": False, "kept": False, "taken_at_end": False,
         "latency_s": 3.0, "server_latency_ms": 2900.0, "detail": None, "base_matches": True},
        {"case_id": 3, "status": 422, "applied": False, "taken": False, "kept": True,
         "latency_s": 0.01, "detail": "edit rejected by the guard", "base_matches": False},
        {"case_id": 4, "status": 500, "applied": False, "taken": False, "kept": True,
         "latency_s": 0.01, "detail": "internal error", "base_matches": True},
    ]
    s = bench.summarize("m", rows, "fp0", "fp0", [True, True, False, True], [True] * 4)
    assert (s["n"], s["applied"], s["taken"], s["refused"], s["neighbour_kept"]) == (4, 2, 1, 1, 1)
    assert s["refusals"] == [{"case_id": 3, "status": 422, "detail": "edit rejected by the guard"}]
    assert [e["case_id"] for e in s["errors"]] == [4]
    assert s["rollback_restores_fingerprint"] is True and s["answers_restored"] == 3
    assert s["edit_latency_ms_p50"] == 1000.0 and s["edit_latency_ms_p90"] == 3000.0  # accepted edits only
    assert s["taken_rate"] == 0.25 and s["neighbour_kept_rate"] == 0.5 and s["taken_at_end"] == 1
    assert s["base_matches_known_facts"] == 3
    assert bench.summarize("m", rows, "fp0", "fp1", [], [])["rollback_restores_fingerprint"] is False
    assert bench.summarize("m", rows, "fp0", None, [], [])["rollback_restores_fingerprint"] is False
    json.dumps(s)


class FakeServer:
    """Greedy answers from a dict; an applied edit makes its prompt answer its target; edits whose target
    is "REFUSE" get a 422; ``leak`` leaves one module changed after rollback (a broken server)."""

    def __init__(self, answers: dict[str, str], key: str | None = None, leak: bool = False):
        self.answers, self.key, self.leak = dict(answers), key, leak
        self.active: dict[int, dict] = {}
        self.next_id, self.rolled_back, self.edits_posted = 1, [], 0

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(sorted(self.active)).encode()).hexdigest()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.key and request.headers.get("Authorization") != f"Bearer {self.key}":
            return httpx.Response(401, json={"detail": "Authorization: missing"})
        path = request.url.path
        if path == "/state":
            return httpx.Response(200, json={"fingerprint": self.fingerprint(), "model": "fake-model"})
        if path == "/generate":
            prompt = request.url.params["prompt"]
            assert request.url.params["max_new_tokens"] == "8"
            for e in self.active.values():
                if e["prompt"] == prompt:
                    return httpx.Response(200, json={"text": " " + e["target"], "tokens": 2})
            return httpx.Response(200, json={"text": self.answers[prompt], "tokens": 2})
        if path == "/edits" and request.method == "POST":
            body = json.loads(request.content)
            self.edits_posted += 1
            if body["target"] == "REFUSE":
                return httpx.Response(422, json={"detail": "edit rejected by the guard: too large"})
            eid, self.next_id = self.next_id, self.next_id + 1
            self.active[eid] = body
            return httpx.Response(201, json={"id": eid, "status": "applied", "latency_ms": 10.0})
        if path.endswith("/rollback"):
            eid = int(path.split("/")[2])
            self.rolled_back.append(eid)
            if not (self.leak and eid == 1):
                self.active.pop(eid)
            return httpx.Response(200, json={"id": eid, "status": "rolled_back"})
        return httpx.Response(404, json={"detail": "no route"})


def _facts():
    out = [fact(1, "Danielle Darrieux speaks", "French", "English"),
           fact(2, "Apple A5 was created by", "Apple", "REFUSE"),
           fact(3, "Toko Yasuda plays the", "guitar", "piano")]
    return out


def _answers(facts):
    return {**{f["prompt"]: f" {f['ground_truth']} and more" for f in facts},
            **{f["locality_prompt"]: " something" for f in facts}}


def test_run_against_a_fake_server_edits_and_restores():
    facts = _facts()
    server = FakeServer(_answers(facts))
    lines = []
    with httpx.Client(base_url="http://fake", transport=httpx.MockTransport(server)) as client:
        s = bench.run(client, facts, "fake-model", log=lines.append)
    assert (s["n"], s["applied"], s["taken"], s["refused"], s["neighbour_kept"]) == (3, 2, 2, 1, 2)
    assert s["refusals"][0]["case_id"] == 2 and s["refusals"][0]["status"] == 422
    assert "guard" in s["refusals"][0]["detail"]
    assert server.rolled_back == [2, 1]  # every applied edit (the refused one got no id), newest first
    assert s["rollback_restores_fingerprint"] is True and s["answers_restored"] == 3
    assert s["taken_at_end"] == 2 and s["base_matches_known_facts"] == 3
    assert len(lines) == 4 and lines[0].startswith("[1/3] case 1")
    assert s["per_fact"][0]["after"] == " English"


def test_run_reports_a_rollback_that_does_not_restore():
    facts = _facts()
    server = FakeServer(_answers(facts), leak=True)
    with httpx.Client(base_url="http://fake", transport=httpx.MockTransport(server)) as client:
        s = bench.run(client, facts, "fake-model", log=lambda _: None)
    assert s["rollback_restores_fingerprint"] is False
    assert s["answers_restored"] == 2  # fact 1's prompt still answers " English"


def test_main_exit_codes(tmp_path, monkeypatch, capsys):
    facts = _facts()
    path = tmp_path / "known_facts.json"
    path.write_text(json.dumps({"model": "fake-model", "facts": facts}))
    server = FakeServer(_answers(facts), key="alice-key-0002")
    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client",
                        lambda **kw: real_client(transport=httpx.MockTransport(server), **kw))
    monkeypatch.delenv("HIEDIT_API_KEY", raising=False)
    url = ["--url", "http://fake"]
    assert bench.main([*url, "--facts", str(path), "--quiet"]) == 2  # no key: 401 is a usage error
    assert "api-key" in capsys.readouterr().err
    assert bench.main([*url, "--facts", str(tmp_path / "missing.json"), "--api-key", "alice-key-0002"]) == 2
    assert "no facts file" in capsys.readouterr().err
    assert bench.main([*url, "--facts", str(path), "--api-key", "alice-key-0002", "--n", "2", "--quiet"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["n"] == 2 and last["model"] == "fake-model" and last["rollback_restores_fingerprint"] is True
    assert "neighbour_stated" in last["selection"]


def test_main_unreachable_server_is_exit_2(capsys):
    assert bench.main(["--url", "http://127.0.0.1:9", "--timeout", "2", "--quiet"]) == 2
    assert "GET /state" in capsys.readouterr().err
