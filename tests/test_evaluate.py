"""Sequential-editing harness: metrics on hand-made logits, baselines, and a CI-sized run end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from editor_core.baselines import METHODS, FineTuneEditor, FTConfig, NoEdit, RoutedEditor, gradient_norms
from editor_core.capture import Capture
from editor_core.editor import EditRequest
from editor_core.evaluate import (METRICS, Probe, ProbeSet, all_top1, markdown_table, mean_nll, new_over_true,
                                  top1_accuracy)
from editor_core.general import COLLAPSE_THRESHOLD, general_retention, is_collapsed, load_glue, weighted_f1
from editor_core.hiedit import HiEditor
from editor_core.model import load_model
from editor_core.state import WeightState
from editor_core.tiny import build_tiny_model
from conftest import scaled_orthonormal_keys

SHARED_CF = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-edit.json"
SPEC = "gate[1-2],up[1-2]"


# ---- metrics on hand-made logits ----------------------------------------------------------------

def test_top1_accuracy_counts_only_labelled_positions():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]],
                           [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 1], [0, 2, -100]])
    acc = top1_accuracy(logits, labels)
    # row 0: pos1 argmax 0 == 0 hit, pos2 argmax 2 != 1 miss -> 0.5; row 1: pos0 hit, pos1 miss -> 0.5
    assert acc.tolist() == [0.5, 0.5]
    assert math.isnan(top1_accuracy(logits[:1], torch.full((1, 3), -100))[0])


def test_new_over_true_per_token_and_strict():
    # V = 4; new label tokens 1, 2; old label tokens 3, 2 (second position shared -> never a success)
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0],
                            [0.0, 2.0, 0.0, 1.0],    # logit[1]=2 > logit[3]=1: success
                            [0.0, 0.0, 5.0, 0.0]]])  # same token: 5 > 5 is false
    labels = torch.tensor([[-100, 1, 2]])
    old = torch.tensor([[-100, 3, 2]])
    assert new_over_true(logits, labels, old).tolist() == [0.5]
    # Only positions where both labels are set count (old answer shorter than the new one).
    old_short = torch.tensor([[-100, 3, -100]])
    assert new_over_true(logits, labels, old_short).tolist() == [1.0]
    # Swapping the roles (specificity: true over new) flips the decided position.
    assert new_over_true(logits, torch.tensor([[-100, 3, -100]]), torch.tensor([[-100, 1, -100]])).tolist() == [0.0]


def test_general_retention_definition():
    # 50 · min(1, F1_N/F1_0) + 50 · min(1, PPL_0/PPL_N)
    assert general_retention(60.0, 60.0, 10.0, 10.0) == 100.0
    assert general_retention(60.0, 30.0, 10.0, 20.0) == pytest.approx(50.0)   # half of each half
    assert general_retention(60.0, 70.0, 10.0, 5.0) == 100.0                  # capped: no credit for gains
    assert general_retention(60.0, 60.0, 10.0, float("inf")) == 50.0          # a destroyed model at chance F1
    assert general_retention(float("nan"), float("nan"), 10.0, 40.0) == pytest.approx(25.0)  # perplexity alone
    assert is_collapsed(COLLAPSE_THRESHOLD - 0.01) and not is_collapsed(COLLAPSE_THRESHOLD)
    assert not is_collapsed(float("nan"))


def test_whole_object_and_greedy_scores_on_hand_made_logits():
    # V = 3, one example, two target positions with labels 1, 2
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]])
    labels = torch.tensor([[-100, 1, 2]])
    lp = logits.log_softmax(-1)
    assert mean_nll(logits, labels)[0] == pytest.approx(float(-(lp[0, 1, 1] + lp[0, 2, 2]) / 2))
    assert all_top1(logits, labels).tolist() == [1.0]
    assert all_top1(logits, torch.tensor([[-100, 1, 0]])).tolist() == [0.0]  # one position missed = no
    assert math.isnan(all_top1(logits, torch.full((1, 3), -100))[0])


def test_weighted_f1_matches_its_definition():
    gold, pred = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]
    # class 0: P 1, R 2/3, F1 0.8 (3 gold); class 1: P 1/2, R 1/2, F1 0.5 (2); class 2: P 1/2, R 1, F1 2/3 (1)
    assert weighted_f1(pred, gold) == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert weighted_f1(gold, gold) == 1.0
    assert weighted_f1([0] * 4, [0, 0, 1, 1]) == pytest.approx(0.5 * (2 * 2 / 6))  # constant answer: chance


def test_glue_sets_are_the_papers_100_after_the_reserved_rows():
    examples = load_glue()
    assert [sum(1 for e in examples if e.task == t) for t in ("sst2", "mrpc", "cola", "rte", "nli", "mmlu")] == \
        [100] * 6
    sst2 = json.loads((SHARED_CF.parents[1] / "glue" / "sst2.json").read_text())
    first = next(e for e in examples if e.task == "sst2")
    assert sst2[10]["sentence"].strip() in first.prompt and first.label == (0 if sst2[10]["label"] == 1 else 1)
    mmlu = next(e for e in examples if e.task == "mmlu")
    assert len(mmlu.options) == 4 and 0 <= mmlu.label < 4


def test_gradient_norm_from_factors_matches_dense():
    torch.manual_seed(0)
    u, d = torch.randn(5, 6), torch.randn(5, 3)
    cap = Capture({"m": u}, {"m": d}, 0.0)
    dense = (d.T @ u).norm()
    assert gradient_norms(cap, ["m"])[0] == pytest.approx(float(dense), rel=1e-5)


# ---- a tiny model, its editors and a small CounterFact file -------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaltiny")
    records = json.loads(SHARED_CF.read_text())[:60]
    texts = [f"{r['prompt']} {r['ground_truth']}. {r['rephrase_prompt']} {r['target_new']}. "
             f"{r['locality_prompt']} {r['locality_ground_truth']}." for r in records]
    model_dir = build_tiny_model(root / "model", texts=texts, vocab_size=400, hidden=32, layers=4,
                                 intermediate=64, heads=2, kv_heads=1)
    model, tok = load_model(model_dir)
    hiedit = HiEditor.create(model, tok, SPEC, k=2, rank=16, router_hidden=16, lr_init=1e-2)
    hiedit.save(root / "hiedit")
    rledit = HiEditor.create(model, tok, SPEC, k=4, seed=1, rank=16, router_hidden=16, lr_init=1e-2)
    rledit.save(root / "rledit")
    data = root / "cf.json"
    data.write_text(json.dumps(records))
    return {"root": root, "model": model_dir, "hiedit": root / "hiedit", "rledit": root / "rledit", "data": data,
            "records": records}


def test_probe_set_aligns_old_labels(tiny):
    model, tok = load_model(tiny["model"])
    probes = [Probe("The Eiffel Tower is in", "Rome", "Paris"), Probe("Miles Davis plays the", "trumpet")]
    ps = ProbeSet(tok, probes)
    # Old labels sit exactly on the first min(|new|, |old|) target positions, and nowhere for probe 2.
    for i, probe in enumerate(probes[:1]):
        new_pos = (ps.labels[i] != -100).nonzero().squeeze(-1)
        old_pos = (ps.old_labels[i] != -100).nonzero().squeeze(-1)
        assert old_pos.numel() >= 1 and old_pos.tolist() == new_pos[:old_pos.numel()].tolist()
    assert (ps.old_labels[1] == -100).all()
    s = ps.scores(model, batch_size=1)
    s2 = ps.scores(model, batch_size=2)  # right padding must not change any score
    assert torch.allclose(s.top1, s2.top1) and torch.equal(s.argmax[:, :5], s2.argmax[:, :5])
    assert 0 <= float(s.new_over_true[0]) <= 1 and math.isnan(float(s.new_over_true[1]))


def test_probe_scores_match_the_full_logit_definitions(tiny):
    """ProbeSet.scores (length-sorted batches, vocabulary projection at the target positions only) gives what
    the metric functions give on the full logits of each probe alone."""
    model, tok = load_model(tiny["model"])
    recs = tiny["records"][:9]
    probes = [Probe(r["prompt"], r["target_new"], r["ground_truth"]) for r in recs] + \
        [Probe(r["locality_prompt"], r["locality_ground_truth"]) for r in recs[:3]]
    ps = ProbeSet(tok, probes)
    got = ps.scores(model, batch_size=4)
    for i in range(len(probes)):
        T = int(ps.lengths[i])
        with torch.no_grad():
            logits = model(input_ids=ps.input_ids[i:i + 1, :T]).logits.float()
        labels, old = ps.labels[i:i + 1, :T], ps.old_labels[i:i + 1, :T]
        assert float(got.top1[i]) == pytest.approx(float(top1_accuracy(logits, labels)[0]))
        assert float(got.nll[i]) == pytest.approx(float(mean_nll(logits, labels)[0]), rel=1e-4)
        assert float(got.greedy[i]) == float(all_top1(logits, labels)[0])
        ref = float(new_over_true(logits, labels, old)[0])
        assert (math.isnan(ref) and math.isnan(float(got.new_over_true[i]))) or float(got.new_over_true[i]) == ref
        keep = labels[0] != -100
        assert torch.equal(got.argmax[i, :T][keep], logits[0].argmax(-1)[keep])


def test_glue_predictions_are_the_most_probable_option(tiny):
    """GlueSet.predictions: the option with the highest summed log-probability after the prompt, as one full
    forward pass per option computes it (single-token options read at the prompt's last position)."""
    from editor_core.general import GlueSet

    model, tok = load_model(tiny["model"])
    examples = load_glue(3)
    got = GlueSet(tok, examples).predictions(model, batch_size=5)
    for ex, pred in zip(examples, got):
        prompt = tok(ex.prompt, add_special_tokens=True)["input_ids"]
        if len(prompt) > 320:
            prompt = prompt[:1] + prompt[-319:]
        totals = []
        for option in ex.options:
            opt = tok(option, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([prompt + opt])).logits[0].float().log_softmax(-1)
            totals.append(float(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(opt))))
        assert totals[pred] == pytest.approx(max(totals), abs=1e-4), (ex.task, totals, pred)


def test_baseline_editors_go_through_weight_state(tiny):
    model, tok = load_model(tiny["model"])
    hiedit = HiEditor.load(tiny["hiedit"], model, tok)
    state = WeightState(hiedit.module_map, "tiny")
    req = EditRequest("The Eiffel Tower is in", "Rome")
    ft = FineTuneEditor(model, tok, hiedit.module_map, FTConfig(steps=5, lr=1e-2, norm_bound=0.05))
    before = {n: m.weight.detach().clone() for n, m in hiedit.module_map.items()}
    prop = ft.propose(req)
    assert all(torch.equal(m.weight, before[n]) for n, m in hiedit.module_map.items())  # propose never edits
    for name, (left, right) in prop.delta.factors.items():  # the norm bound holds
        assert float((left @ right).norm()) <= 0.05 * float(before[name].norm()) * 1.001
    state.apply(1, prop.delta)
    assert state.fingerprint() != state.base_fingerprint
    for router in ("random", "gradnorm"):
        p = RoutedEditor(hiedit, router).propose(req)
        assert len(p.selected) == 2 and set(p.delta.modules) == set(p.selected_modules)
    rnd = RoutedEditor(hiedit, "random", seed=3)
    assert rnd.propose(req).selected == rnd.propose(req).selected  # seeded by the fact, not by call order
    assert NoEdit().propose(req).delta.modules == []
    state.reset()
    assert state.fingerprint() == state.base_fingerprint


def test_failed_edits_are_counted_not_fatal(tiny):
    from editor_core.delta import LowRankDelta
    from editor_core.evaluate import Bench, EvalConfig, measure_baseline, run_method
    from editor_core.data import load_records

    model, tok = load_model(tiny["model"])
    hiedit = HiEditor.load(tiny["hiedit"], model, tok)

    class NaNEditor(NoEdit):
        method = "nan"

        def propose(self, request, k=None):
            name = hiedit.modules[0]
            w = hiedit.module_map[name].weight
            bad = (torch.full((w.shape[0], 1), float("nan")), torch.ones(1, w.shape[1]))
            p = super().propose(request)
            p.delta = LowRankDelta({name: bad})
            return p

    records = load_records(tiny["data"], tokenizer=tok).records
    bench = Bench(model, tok, records[:3], records[3:6], ["The cat sat on the mat.", "Paris is in France."],
                  counterfact=True)
    cfg = EvalConfig(progress=False)
    state = WeightState(hiedit.module_map, "tiny")
    res = run_method(bench, "nan", NaNEditor(), state, measure_baseline(bench, cfg), cfg)
    assert res["n_rejected"] == 3 and res["n_edits"] == 3 and "NaN" in res["rejected"][0]
    assert res["general_retention"] == 100.0 and state.fingerprint() == state.base_fingerprint


def _check_results(out: Path, methods: list[str], n: int) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == n and list(results["methods"]) == methods
    for name, m in results["methods"].items():
        for key in (*METRICS, "mean", "edit_latency_ms_p50"):
            assert isinstance(m[key], float) and m[key] == m[key], (name, key, m[key])
        for key in (*METRICS, "mean"):
            assert 0.0 <= m[key] <= 100.0, (name, key, m[key])
            assert 0.0 <= m["top1"][key] <= 100.0
        assert m["mean"] == pytest.approx(sum(m[k] for k in METRICS[:4]) / 4)
        assert m["n_edits"] == n and m["curve"][-1]["edits"] == n
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in methods)
    for png in ("metrics_vs_edits.png", "module_selection.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return results


def _unedited_whole_object_scores(tiny, case_ids: list[str]) -> dict[str, float]:
    """The unedited model's whole-object Efficacy, Generalization and Specificity (percent) and its greedy
    Efficacy, computed fact by fact from one unpadded teacher-forced pass per (prompt, object): what the
    harness's "pre" row must report."""
    from editor_core.capture import teacher_forced
    from editor_core.data import load_records

    model, tok = load_model(tiny["model"])
    by_case = {r.case_id: r for r in load_records(tiny["data"]).records}
    facts = [by_case[c] for c in case_ids]

    @torch.no_grad()
    def scored(prompt: str, target: str) -> tuple[float, float]:
        tf = teacher_forced(tok, prompt, target)
        logits = model(input_ids=tf.input_ids).logits
        return float(mean_nll(logits, tf.labels)[0]), float(all_top1(logits, tf.labels)[0])

    def pct(hits) -> float:
        return 100.0 * sum(hits) / len(facts)

    return {"efficacy": pct(scored(r.prompt, r.target_new)[0] < scored(r.prompt, r.target_true)[0] for r in facts),
            "generalization": pct(scored(r.rephrase, r.target_new)[0] < scored(r.rephrase, r.target_true)[0]
                                  for r in facts),
            "specificity": pct(scored(r.locality_prompt, r.locality_target)[0]
                               < scored(r.locality_prompt, r.target_new)[0] for r in facts),
            "greedy_efficacy": pct(scored(r.prompt, r.target_new)[1] for r in facts)}


def test_cli_end_to_end_on_tiny_model(tiny, tmp_path):
    from service.cli import main

    methods = ["pre", "hiedit", "rledit", "ft", "random-k", "gradnorm-k"]
    out = tmp_path / "run"
    rc = main(["eval", "--methods", ",".join(methods), "--n", "20", "--every", "10", "--out", str(out),
               "--model", str(tiny["model"]), "--editor", str(tiny["hiedit"]), "--rledit-editor",
               str(tiny["rledit"]), "--data", str(tiny["data"]), "--n-known", "20", "--n-ppl", "20",
               "--threads", "1", "--no-progress", "--glue-n", "5"])
    assert rc == 0
    results = _check_results(out, methods, 20)
    assert results["setup"]["torch_threads"] == 1  # the scores depend on it, so the run records it
    pre, hi = results["methods"]["pre"], results["methods"]["hiedit"]
    assert pre["general_retention"] == 100.0 and pre["specificity_unchanged"] == 100.0
    # The scores themselves, recomputed without the harness (on this model: 35, 30, 75 and 0, far from a
    # harness that would score 50 everywhere).
    direct = _unedited_whole_object_scores(tiny, results["setup"]["stream"])
    assert {k: pre[k] for k in ("efficacy", "generalization", "specificity")} == \
        {k: pytest.approx(direct[k]) for k in ("efficacy", "generalization", "specificity")}
    assert pre["generation"]["efficacy"] == pytest.approx(direct["greedy_efficacy"])
    assert pre["edit_latency_ms_p50"] < hi["edit_latency_ms_p50"]
    assert sum(hi["selections"].values()) == 2 * 20  # k = 2 modules per edit
    assert sum(results["methods"]["rledit"]["selections"].values()) == 4 * 20
    assert [p["edits"] for p in hi["curve"]] == [10, 20]
    _check_merge(results, tmp_path, methods)
    # --order-seed: the same facts in another (recorded) order
    assert main(["eval", "--methods", "pre", "--n", "20", "--out", str(tmp_path / "shuffled"), "--model",
                 str(tiny["model"]), "--editor", str(tiny["hiedit"]), "--data", str(tiny["data"]), "--n-known", "5",
                 "--n-ppl", "5", "--order-seed", "1", "--no-progress"]) == 0
    shuffled = json.loads((tmp_path / "shuffled" / "results.json").read_text())
    assert shuffled["order_seed"] == 1 and results["order_seed"] is None
    assert sorted(shuffled["setup"]["stream"]) == sorted(results["setup"]["stream"])
    assert shuffled["setup"]["stream"] != results["setup"]["stream"]


def _check_merge(results: dict, tmp_path: Path, methods: list[str]) -> None:
    """`hiedit eval-merge` puts rows of separate runs into one table, later runs winning; it refuses runs
    of another N or another baseline and writes nothing then."""
    from service.cli import main

    def part(names, **changes):
        path = tmp_path / f"part-{len(list(tmp_path.glob('part-*')))}.json"
        path.write_text(json.dumps({**results, "methods": {n: results["methods"][n] for n in names}, **changes}))
        return str(path)

    stale = json.loads(json.dumps(results["methods"]["hiedit"]))
    stale["mean"] = -1.0
    early = part(methods[:3], partial=f"3 of {len(methods)} methods")  # written by a run stopped between methods
    stale_run = tmp_path / "stale.json"
    stale_run.write_text(json.dumps({**results, "methods": {"hiedit": stale}}))
    late = part(methods[1:])
    assert main(["eval-merge", early, str(stale_run), late, "--out", str(tmp_path / "merged")]) == 0
    merged = _check_results(tmp_path / "merged", methods, 20)          # the table keeps the first run's order
    assert merged["methods"] == results["methods"]                      # hiedit's stale row was replaced
    assert [r["methods"] for r in merged["setup"]["runs"]] == [methods[:1], methods[1:]]
    assert "partial" not in merged                                       # one run's note, not the table's
    # --drop leaves a method out (a row measured by code since changed); a method no run has is refused
    assert main(["eval-merge", early, late, "--drop", methods[1], "--out", str(tmp_path / "dropped")]) == 0
    dropped = json.loads((tmp_path / "dropped" / "results.json").read_text())
    assert list(dropped["methods"]) == [m for m in methods if m != methods[1]]
    assert main(["eval-merge", early, "--drop", "no-such-method", "--out", str(tmp_path / "refused")]) == 2
    other_base = {**results["baseline"], "perplexity": results["baseline"]["perplexity"] * 1.01}
    not_results = tmp_path / "not-results.json"
    not_results.write_text("[1, 2]")
    for bad in (part(methods, n=21), part(methods, baseline=other_base), part(methods, order_seed=3),
                str(not_results), str(tmp_path / "none")):
        assert main(["eval-merge", early, bad, "--out", str(tmp_path / "refused")]) == 2
        assert not (tmp_path / "refused").exists()
    # --mean: replicates of one comparison averaged per method, with each metric's range over the runs
    bumped = json.loads(json.dumps(results["methods"]))
    for row in bumped.values():
        row["mean"] += 2.0
        row["curve"][0]["specificity"] += 4.0
    # another order of the same facts, run with an editor trained from another seed
    reordered = {**results["setup"], "stream": list(reversed(results["setup"]["stream"])), "editor": "/seed1/hiedit"}
    one, two = part(methods, partial="stopped"), part(methods, methods=bumped, setup=reordered)
    assert main(["eval-merge", "--mean", one, two, "--out", str(tmp_path / "mean")]) == 0
    mean = json.loads((tmp_path / "mean" / "results.json").read_text())
    assert mean["replicates"] == 2 and list(mean["methods"]) == methods and "partial" not in mean
    md = (tmp_path / "mean" / "results.md").read_text()  # every cell: mean (min–max)
    hi = mean["methods"]["hiedit"]
    assert "mean of 2 replicates" in md
    assert f"{hi['mean']:.2f} ({hi['spread']['mean'][0]:.2f}–{hi['spread']['mean'][1]:.2f})" in md
    assert [r["editor"] for r in mean["setup"]["runs"]] == [results["setup"]["editor"], "/seed1/hiedit"]
    for name, row in mean["methods"].items():
        orig = results["methods"][name]
        assert row["mean"] == pytest.approx(orig["mean"] + 1.0)
        assert row["spread"]["mean"] == [orig["mean"], orig["mean"] + 2.0]
        assert row["efficacy"] == orig["efficacy"] and row["spread"]["efficacy"] == [orig["efficacy"]] * 2
        assert row["curve"][0]["specificity"] == pytest.approx(orig["curve"][0]["specificity"] + 2.0)
    # a third replicate added to the published mean of two equals the mean of the three runs
    bumped3 = json.loads(json.dumps(results["methods"]))
    for row in bumped3.values():
        row["mean"] -= 3.0
        row["curve"][0]["specificity"] += 10.0
    three = part(methods, methods=bumped3)
    assert main(["eval-merge", "--mean", str(tmp_path / "mean"), three, "--out", str(tmp_path / "mean3")]) == 0
    assert main(["eval-merge", "--mean", one, two, three, "--out", str(tmp_path / "flat3")]) == 0
    nested, flat = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("mean3", "flat3"))
    assert nested["replicates"] == flat["replicates"] == 3 and len(nested["setup"]["runs"]) == 3
    for name, row in nested["methods"].items():
        orig = results["methods"][name]
        assert row["mean"] == pytest.approx(flat["methods"][name]["mean"]) == pytest.approx(orig["mean"] - 1 / 3)
        assert row["spread"] == flat["methods"][name]["spread"]
        assert row["spread"]["mean"] == [orig["mean"] - 3.0, orig["mean"] + 2.0]
        assert row["curve"][0]["specificity"] == pytest.approx(flat["methods"][name]["curve"][0]["specificity"])
    other_facts = part(methods, setup={**results["setup"], "stream": ["x"] + results["setup"]["stream"][1:]})
    for bad in ([one], [one, part(methods, n=21)], [one, other_facts]):
        assert main(["eval-merge", "--mean", *bad, "--out", str(tmp_path / "refused")]) == 2
        assert not (tmp_path / "refused").exists()


def test_cli_trains_and_caches_mend(tiny, tmp_path):
    from service.cli import main

    out = tmp_path / "run"
    args = ["eval", "--methods", "pre,mend", "--n", "10", "--out", str(out), "--model", str(tiny["model"]),
            "--editor", str(tiny["hiedit"]), "--data", str(tiny["data"]), "--n-known", "10", "--n-ppl", "10",
            "--n-train", "8", "--train-option", "traj_len=4", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(args) == 0
    _check_results(out, ["pre", "mend"], 10)
    cached = list((tmp_path / "cache").glob("mend-*/config.json"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert main(args) == 0  # the second run loads the cached editor instead of training again
    assert cached[0].stat().st_mtime_ns == stamp


def test_cli_runs_rlsedit(tiny, tmp_path):
    from service.cli import main

    out = tmp_path / "run"
    assert main(["eval", "--methods", "rlsedit,memit-nohist", "--n", "3", "--out", str(out), "--model",
                 str(tiny["model"]), "--editor", str(tiny["hiedit"]), "--data", str(tiny["data"]), "--n-known", "5",
                 "--n-ppl", "5", "--rls-option", "v_steps=3", "--rls-option", "n_contexts=0", "--rls-option",
                 "stats_max_tokens=2000", "--no-progress"]) == 0
    results = _check_results(out, ["rlsedit", "memit-nohist"], 3)
    assert all(m["selections"] and m["edit_latency_ms_p50"] > 0 for m in results["methods"].values())


def test_cli_demo_mode_reads_the_split(tiny, tmp_path, monkeypatch):
    """With no model options the CLI uses the demo assets and the split's streams."""
    import editor_core.assets as assets
    from service.cli import main

    ids = [str(r["case_id"]) for r in tiny["records"]]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"data": str(tiny["data"]), "streams": {
        "eval": ids[:8], "editor_train": ids[8:16], "heldout": ids[16:22]}}))
    for name, value in (("DEMO_MODEL", tiny["model"]), ("DEMO_HIEDIT", tiny["hiedit"]),
                        ("DEMO_RLEDIT", tiny["rledit"]), ("DEMO_SPLIT", split)):
        monkeypatch.setattr(assets, name, Path(value))
    out = tmp_path / "run"
    assert main(["eval", "--methods", "pre,hiedit,rledit", "--n", "5", "--out", str(out), "--n-ppl", "5",
                 "--no-progress"]) == 0
    results = _check_results(out, ["pre", "hiedit", "rledit"], 5)
    assert results["baseline"]["n_known"] == 6
    assert results["setup"]["rledit_editor"] == str(tiny["rledit"])


def test_cli_refuses_bad_inputs(tiny, tmp_path, capsys):
    from service.cli import main

    base = ["eval", "--n", "5", "--out", str(tmp_path / "o"), "--model", str(tiny["model"]), "--no-progress",
            "--methods", "pre,hiedit", "--n-ppl", "0"]
    # a record with an empty target: the error names file, record index and field
    bad = [dict(r) for r in tiny["records"][:12]]
    bad[3]["target_new"] = " "
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps(bad))
    assert main(base + ["--editor", str(tiny["hiedit"]), "--data", str(bad_file)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "record 3" in err and "target_new" in err
    assert main(base + ["--editor", str(tiny["hiedit"]), "--data", str(bad_file), "--skip-bad"]) == 0
    assert "skipped 1 bad records" in capsys.readouterr().err
    # a record the scorer cannot teacher-force (a rephrase over the prompt token limit)
    long = [dict(r) for r in tiny["records"][:12]]
    long[5]["rephrase_prompt"] = "word " * 400
    long_file = tmp_path / "long.json"
    long_file.write_text(json.dumps(long))
    assert main(base + ["--editor", str(tiny["hiedit"]), "--data", str(long_file)]) == 2
    err = capsys.readouterr().err
    assert "long.json: record 5: field 'rephrase_prompt'" in err
    # an editor made for another layer spec, and one made for another model
    other_spec = tmp_path / "other-spec"
    model, tok = load_model(tiny["model"])
    HiEditor.create(model, tok, "gate[0-1]", k=1, rank=8, router_hidden=8).save(other_spec)
    assert main(base + ["--editor", str(tiny["hiedit"]), "--rledit-editor", str(other_spec), "--data",
                        str(tiny["data"]), "--methods", "rledit"]) == 2
    err = capsys.readouterr().err
    assert "same modules" in err and "'gate[0-1]'" in err and "'gate[1-2],up[1-2]'" in err
    assert err.count("base fingerprint") == 2  # both editors' fingerprints are named
    other_model = build_tiny_model(tmp_path / "m2", seed=7, vocab_size=400, hidden=32, layers=4, intermediate=64,
                                   heads=2, kv_heads=1)
    assert main(["eval", "--n", "5", "--out", str(tmp_path / "o2"), "--model", str(other_model), "--editor",
                 str(tiny["hiedit"]), "--data", str(tiny["data"]), "--methods", "pre", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "trained for base model" in err and err.count("fingerprint") == 2  # the editor's and the model's
    # an editor of a model of another width (same layer spec, other shapes): both fingerprints named too
    wide = build_tiny_model(tmp_path / "wide", seed=3, vocab_size=400, hidden=48, layers=4, intermediate=96,
                            heads=2, kv_heads=1)
    wide_model, wide_tok = load_model(wide)
    HiEditor.create(wide_model, wide_tok, SPEC, k=2, rank=8, router_hidden=8).save(tmp_path / "wide-ed")
    assert main(["eval", "--n", "5", "--out", str(tmp_path / "o3"), "--model", str(tiny["model"]), "--editor",
                 str(tmp_path / "wide-ed"), "--data", str(tiny["data"]), "--methods", "pre", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "module shapes" in err and err.count("fingerprint") == 2
    assert main(base + ["--editor", str(tiny["hiedit"]), "--methods", "nonsense"]) == 2
    assert main(base + ["--editor", str(tiny["hiedit"]), "--threads", "-1"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_registry_is_complete():
    assert {"pre", "hiedit", "rledit", "mend", "ft", "random-k", "gradnorm-k", "rlsedit",
            "memit-nohist"} <= set(METHODS)
    md = markdown_table({"n": 1, "scoring": "top-1", "methods": {"x": {
        **{k: 50.0 for k in (*METRICS, "mean")}, "edit_latency_ms_p50": 1.0, "top1": {}}}})
    assert "| x | 50.00 |" in md


# ---- the science issue's CI-sized run, greedy generation, AlphaEdit, resume, ZsRE split ----------

ALL_METHODS = ["pre", "hiedit", "rledit", "mend", "ft", "random-k", "gradnorm-k", "rlsedit", "memit-nohist",
               "alphaedit"]
TINY_RLS = ["--rls-option", "v_steps=3", "--rls-option", "n_contexts=0", "--rls-option", "stats_max_tokens=2000",
            # the tiny random model's Σ̂ (d_k = 64) has no eigenvalue below 1% of the largest: a wider null space
            "--alpha-option", "null_rel=0.3"]


def test_greedy_score_is_greedy_generation(tiny):
    """"Every target position top-1" under teacher forcing is exactly "model.generate starts with the target"."""
    model, tok = load_model(tiny["model"])
    records = tiny["records"][:12]
    probes = [Probe(r["prompt"], r["target_new"]) for r in records]
    # plus each prompt's own greedy continuation, which must score 1
    own = []
    for r in records:
        ids = tok(r["prompt"], return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
        own.append(Probe(r["prompt"], tok.decode(out[0, ids.shape[1]:])))
    ps = ProbeSet(tok, probes + own)
    scores = ps.scores(model, batch_size=5)
    for i, probe in enumerate(probes + own):
        ids = tok(probe.prompt, return_tensors="pt")["input_ids"]
        n_target = int((ps.labels[i] != -100).sum())
        out = model.generate(ids, max_new_tokens=n_target, do_sample=False, pad_token_id=tok.pad_token_id)
        target = ps.labels[i][ps.labels[i] != -100]
        assert float(scores.greedy[i]) == float(torch.equal(out[0, ids.shape[1]:], target)), probe
    # the prompts' own continuations score 1 unless they re-tokenize differently (then 0 is the honest answer)
    assert scores.greedy[len(probes):].sum() >= 1


def test_alphaedit_projects_onto_the_null_space():
    from editor_core.alphaedit import alphaedit_gain, null_space_projector

    torch.manual_seed(0)
    # float64 throughout: with a float32 basis the preserved directions themselves are only ~1e-7
    # accurate, which is the size of the residual checked below (it failed by 1.09e-8 on one CPU)
    basis = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
    eigenvalues = torch.tensor([5.0, 3.0, 2.0, 1.0, 1e-4, 1e-4, 1e-5, 1e-6], dtype=torch.float64)
    sigma = basis @ torch.diag(eigenvalues) @ basis.T
    P, dim = null_space_projector(sigma, 1e-2)
    assert dim == 4 and torch.allclose(P @ P, P, atol=1e-10)
    assert float((sigma.double() @ P).norm()) < 1e-3  # preserved keys' second moment is annihilated
    keys = torch.randn(1, 8)
    g = alphaedit_gain(P, torch.zeros(8, 8, dtype=torch.float64), keys, 1e-3)
    resid = torch.randn(1, 3, dtype=torch.float64)
    delta = g @ resid                                   # Δ_row [d_k, d_v]
    assert torch.allclose(P @ delta, delta, atol=1e-8)  # the update lives in the null space
    preserved = basis[:, :4].T.double()                 # keys in the preserved directions: outputs unchanged
    assert float((preserved @ delta).norm()) < 1e-8 * max(1.0, float(delta.norm()))
    # and it fits the new key's residual on its null-space part (λ small): k P Δ ≈ r when k = P k
    k_null = (keys.double() @ P)
    g2 = alphaedit_gain(P, torch.zeros(8, 8, dtype=torch.float64), k_null, 1e-9)
    assert torch.allclose(k_null @ (g2 @ resid), resid, atol=1e-5)
    with pytest.raises(Exception, match="null space is empty"):
        null_space_projector(torch.eye(4), 1e-2)


def test_alphaedit_editor_commits_and_forgets(tiny):
    from editor_core.alphaedit import AlphaEditor, AlphaEditParams

    model, tok = load_model(tiny["model"])
    editor = AlphaEditor.create(model, tok, params=AlphaEditParams(null_rel=0.3), v_steps=3, n_contexts=0,
                                stats_max_tokens=2000, cache_dir=str(tiny["root"] / "stats"))
    assert editor.method == "alphaedit" and all(d > 0 for d in editor.null_dim.values())
    state = WeightState(editor.module_map, "tiny")
    req = EditRequest("The Eiffel Tower is in", "Rome")
    p = editor.propose(req)
    name = editor.modules[0]
    left, right = p.delta.factors[name]
    # ΔW (nn.Linear layout) = Rᵀ Gᵀ; its row-layout transpose lies in the null space: P Δ_row = Δ_row
    d_row = (left @ right).T.double()
    assert torch.allclose(editor.P[name].cpu() @ d_row, d_row, atol=1e-5 * max(1.0, float(d_row.norm())))
    state.apply(1, p.delta)
    m0 = {n: m.clone() for n, m in editor.M.items()}
    assert torch.equal(m0[name], torch.eye(m0[name].shape[0], dtype=torch.float64) / editor.lam[name])
    editor.commit(1, p)
    assert float((editor.M[name] - m0[name]).norm()) > 0
    editor.forget(1, p.state_blob)
    for n in editor.modules:  # the downdate returns M to (λI)⁻¹: the edit's keys left the protected set
        assert torch.allclose(editor.M[n], m0[n], rtol=0, atol=1e-9 * float(m0[n].abs().max()))
    editor.commit(1, p)
    editor.reset()            # the repair when a forget is refused: M back to (λI)⁻¹ exactly
    assert editor.history == {} and all(torch.equal(editor.M[n], m0[n]) for n in editor.modules)
    state.reset()


def test_alphaedit_recursion_equals_the_closed_form():
    """The editor carries M_t = (P K_pᵀK_p + λI)⁻¹ by Woodbury steps; its gain must stay the public code's
    closed-form solve over hundreds of edits, and a downdate must remove exactly one edit's keys."""
    from editor_core.alphaedit import _woodbury, alphaedit_gain, alphaedit_step, null_space_projector

    gen = torch.Generator().manual_seed(0)
    d = 48
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    eigenvalues = torch.logspace(1, -5, d, dtype=torch.float64)
    sigma = basis @ torch.diag(eigenvalues) @ basis.T
    P, _ = null_space_projector(sigma, 1e-2)
    lam = float(torch.trace(P @ sigma))
    M = torch.eye(d, dtype=torch.float64) / lam
    kpkp = torch.zeros(d, d, dtype=torch.float64)
    keys = [torch.randn(1, d, generator=gen, dtype=torch.float64) * 3.0 for _ in range(400)]
    for k in keys:
        g_rec = alphaedit_step(M, P, k)
        g_ref = alphaedit_gain(P, kpkp, k, lam)
        assert float((g_rec - g_ref).norm()) <= 1e-8 * float(g_ref.norm())
        g, km = _woodbury(M, P, k, +1.0, "test")
        M.addmm_(g, km, alpha=-1.0)
        kpkp += k.T @ k
    exact = torch.linalg.inv(P @ kpkp + lam * torch.eye(d, dtype=torch.float64))
    assert float((M - exact).norm()) <= 1e-8 * float(exact.norm())
    # forget edit 100: the downdate gives the inverse of the stream without it
    g, km = _woodbury(M, P, keys[100], -1.0, "test")
    M.addmm_(g, km, alpha=1.0)
    kpkp -= keys[100].T @ keys[100]
    exact = torch.linalg.inv(P @ kpkp + lam * torch.eye(d, dtype=torch.float64))
    assert float((M - exact).norm()) <= 1e-8 * float(exact.norm())



def test_alphaedit_singularity_test_is_relative_to_the_keys():
    """Downdating six keys whose S = I − K M P Kᵀ is 10⁻³ each (det 10⁻¹⁸) is accurate and goes through; a key
    with ‖k‖² = 10⁷, whose S of 10⁻⁷ is mostly rounding, and a key never added (S = 1 − 1) are refused."""
    from editor_core.alphaedit import _woodbury
    from editor_core.rlsedit import SingularSystemError

    six, one = scaled_orthonormal_keys()                                  # K Kᵀ = 10³ I; ‖one‖² = 10⁷
    d = six.shape[1]
    P = torch.eye(d, dtype=torch.float64)
    M0 = torch.eye(d, dtype=torch.float64)                                # λ = 1, nothing protected yet
    g, km = _woodbury(M0, P, six, +1.0, "test")
    M = M0 - g @ km
    g, km = _woodbury(M, P, six, -1.0, "test")
    assert float((M + g @ km - M0).norm()) <= 1e-8 * float(M0.norm())
    g, km = _woodbury(M0, P, one, +1.0, "test")
    with pytest.raises(SingularSystemError, match="working precision"):
        _woodbury(M0 - g @ km, P, one, -1.0, "test")
    with pytest.raises(SingularSystemError, match="working precision"):
        _woodbury(M0, P, one / one.norm(), -1.0, "test")                  # a unit key never added: S = 1 − 1


def _run_all(tiny, out: Path, extra: list[str] = ()) -> int:
    from service.cli import main

    return main(["eval", "--methods", ",".join(ALL_METHODS), "--n", "30", "--every", "15", "--out", str(out),
                 "--model", str(tiny["model"]), "--editor", str(tiny["hiedit"]), "--rledit-editor",
                 str(tiny["rledit"]), "--data", str(tiny["data"]), "--n-known", "10", "--n-ppl", "20",
                 "--n-train", "8", "--train-option", "traj_len=4", "--glue-n", "20", "--threads", "1",
                 "--cache-dir", str(out.parent / "editors"), "--no-progress", *TINY_RLS, *extra])


def test_ci_sized_run_every_method_and_metric(tiny, tmp_path):
    """The issue's CI-sized run: every method and every metric end to end, N = 30, on the tiny model;
    then the same command again resumes from the cached rows."""
    import time

    out = tmp_path / "ci"
    assert _run_all(tiny, out) == 0
    results = _check_results(out, ALL_METHODS, 30)
    assert results["scoring"].startswith("whole-object")
    for name, m in results["methods"].items():
        for scoring in ("whole", "per_token", "top1", "generation"):
            for key in (*METRICS, "mean"):
                assert 0.0 <= m[scoring][key] <= 100.0, (name, scoring, key)
        assert m["efficacy"] == m["whole"]["efficacy"]  # primary = whole-object
        assert set(m["glue_f1"]) == {"sst2", "mrpc", "cola", "rte", "nli", "mmlu", "mean"}
        assert m["perplexity_ratio"] > 0 and isinstance(m["collapsed"], bool)
        assert [p["edits"] for p in m["curve"]] == [15, 30]
    assert results["methods"]["pre"]["general_retention"] == 100.0 and not results["methods"]["pre"]["collapsed"]
    assert results["baseline"]["n_glue"] == 120
    assert sorted(p.name for p in (out / "methods").glob("*.json")) == sorted(f"{m}.json" for m in ALL_METHODS)
    # Resume: the same command takes every row from the cache (no editing, no training): fast and identical.
    t0 = time.time()
    assert _run_all(tiny, out) == 0
    again = json.loads((out / "results.json").read_text())
    assert all(m.get("from_cache") for m in again["methods"].values()) and time.time() - t0 < 60
    for name in ALL_METHODS:
        a, b = dict(results["methods"][name]), dict(again["methods"][name])
        b.pop("from_cache")
        assert a == b
    # Another option of one method reruns that method only.
    assert _run_all(tiny, out, ["--alpha-option", "l2_rel=2.0"]) == 0
    third = json.loads((out / "results.json").read_text())
    assert not third["methods"]["alphaedit"].get("from_cache") and third["methods"]["ft"].get("from_cache")


class _Stop(Exception):
    """Stops a hiedit eval run midway, as a kill would."""


def _stop_alphaedit_at(monkeypatch, record: int, seen: list | None = None) -> None:
    """hiedit eval raises _Stop when alphaedit reaches stream ``record`` (other methods run on); every
    edit made before is appended to ``seen`` as (method, record)."""
    import editor_core.evaluate as ev

    original = ev._edit_one

    def stopping(editor, state, rec, i, *args):
        if i == record and editor.method == "alphaedit":
            raise _Stop
        if seen is not None:
            seen.append((editor.method, i))
        return original(editor, state, rec, i, *args)

    monkeypatch.setattr(ev, "_edit_one", stopping)


def _assert_same_rows(whole: dict, resumed: dict, methods: list[str]) -> None:
    """Every method's row of a resumed run is the uninterrupted run's, its (timed, nonzero) latencies aside."""
    for name in methods:
        a, b = dict(whole[name]), dict(resumed[name])
        b.pop("from_cache", None)
        for key in ("edit_latency_ms_p50", "edit_latency_ms_mean"):
            assert b[key] > 0, (name, key)
            a.pop(key), b.pop(key)
        assert a == b, name


def test_a_method_stopped_midway_resumes_to_the_same_row(tiny, tmp_path, monkeypatch, capsys):
    """A run stopped inside a method (here at record 25 of 30) continues from the progress it wrote every
    --checkpoint-every edits: the weights' checkpoint, the editor's state (RLSEdit's C, AlphaEdit's K_pᵀK_p),
    the traces. It edits only the records after that progress, and ends with the row of a run never stopped."""
    import editor_core.evaluate as ev
    from service.cli import main

    methods = ["rlsedit", "alphaedit", "hiedit"]

    def run(out: Path) -> int:
        return main(["eval", "--methods", ",".join(methods), "--n", "30", "--every", "15", "--out", str(out),
                     "--model", str(tiny["model"]), "--editor", str(tiny["hiedit"]), "--data", str(tiny["data"]),
                     "--n-known", "10", "--n-ppl", "20", "--glue-n", "20", "--threads", "1", "--no-progress",
                     "--checkpoint-every", "7", *TINY_RLS])

    assert run(tmp_path / "whole") == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["methods"]

    original, seen = ev._edit_one, []
    out = tmp_path / "stopped"
    _stop_alphaedit_at(monkeypatch, 25, seen)
    with pytest.raises(_Stop):
        run(out)
    partial = out / "methods" / "alphaedit.partial"
    assert json.loads((partial / "progress.json").read_text())["done"] == 21
    assert len(list((partial / "weights").glob("*.safetensors"))) == 2  # the last two (a stop while writing)
    capsys.readouterr()
    assert main(["eval-progress", str(out), "--json"]) == 0                # what the stopped method had measured
    (shown,) = json.loads(capsys.readouterr().out)
    assert (shown["method"], shown["done"], shown["n"], len(shown["latency_s_p50_per_100"])) == ("alphaedit", 21, 30, 1)
    at15 = next(c for c in whole["alphaedit"]["curve"] if c["edits"] == 15)  # the same running score the whole run had
    assert [c["edits"] for c in shown["curve"]] == [15]
    assert shown["curve"][0]["efficacy"] == round(at15["efficacy"], 2)
    assert shown["curve"][0]["general_retention"] == round(at15["general_retention"], 2)
    assert main(["eval-progress", str(out)]) == 0
    assert "alphaedit: 21 of 30 records done" in capsys.readouterr().out
    assert main(["eval-progress", str(partial)]) == 0                      # one method's progress, kept elsewhere
    assert "| 15 " in capsys.readouterr().out
    assert main(["eval-progress", str(tmp_path / "whole")]) == 2           # a finished run has no progress
    capsys.readouterr()
    assert main(["eval-progress", str(tmp_path / "whole" / "results.json"), "--json"]) == 0  # but has its curves
    finished = {s["method"]: s for s in json.loads(capsys.readouterr().out)}
    assert [c["edits"] for c in finished["alphaedit"]["curve"]] == [15, 30]
    assert finished["alphaedit"]["curve"][0] == shown["curve"][0]
    seen.clear()

    def recording(editor, state, rec, i, *args):
        seen.append((editor.method, i))
        return original(editor, state, rec, i, *args)

    monkeypatch.setattr(ev, "_edit_one", recording)
    assert run(out) == 0
    assert [i for m, i in seen if m == "alphaedit"] == list(range(21, 30))  # from its progress, not from W^0
    assert "rlsedit" not in {m for m, _ in seen}                            # a finished row is cached
    assert not partial.exists()
    _assert_same_rows(whole, json.loads((out / "results.json").read_text())["methods"], methods)


def test_a_collapsed_model_is_marked_collapsed(tmp_path):
    """A "method" that multiplies every editable weight of the demo model by 10: General Retention falls
    below 80, the row is marked collapsed in results.json, in every markdown table and in the plot, and it
    is not ranked. (The demo memoriser, not the random tiny model: a randomly initialised model has a
    perplexity of about its vocabulary size and chance F1 already, so it has nothing left to lose.)"""
    from itertools import islice

    from editor_core.assets import DEMO_HIEDIT, DEMO_MODEL, DEMO_SPLIT
    from editor_core.data import glue_sentences, load_records
    from editor_core.delta import LowRankDelta
    from editor_core.editor import Proposal
    from editor_core.evaluate import Bench, EvalConfig, run_benchmark, write_reports

    model, tok = load_model(DEMO_MODEL)
    hiedit = HiEditor.load(DEMO_HIEDIT, model, tok)

    class TimesTen(NoEdit):
        method = "x10"

        def __init__(self):
            self.modules = list(hiedit.modules)

        def propose(self, request, k=None):  # ΔW = 9 W: W + ΔW = 10 W (a full-rank "low-rank" pair W·I)
            factors = {n: (9.0 * m.weight.detach().float().clone(), torch.eye(m.in_features))
                       for n, m in hiedit.module_map.items()}
            return Proposal(self.modules, torch.ones(len(self.modules)), list(range(len(self.modules))),
                            LowRankDelta(factors), 0.0, 1)

    split = json.loads(DEMO_SPLIT.read_text())
    data = SHARED_CF.parent / Path(split["data"]).name
    records = load_records(data, tokenizer=tok, limit=3).records
    bench = Bench(model, tok, records[:1], [], list(islice(glue_sentences("heldout"), 30)), True, load_glue(8))
    state = WeightState(hiedit.module_map, "demo")
    results = run_benchmark(bench, {"pre": lambda: (NoEdit(), None), "x10": lambda: (TimesTen(), None)},
                            lambda e: state, EvalConfig(progress=False))
    x10, pre = results["methods"]["x10"], results["methods"]["pre"]
    assert x10["general_retention"] < COLLAPSE_THRESHOLD and x10["collapsed"], x10["general_retention"]
    assert x10["perplexity_ratio"] > 1.5
    assert not pre["collapsed"] and pre["general_retention"] == 100.0
    table = write_reports(results, tmp_path / "rep")
    assert table.count("| x10 **(collapsed)** |") == 4  # the primary table and the three secondary ones
    assert "Highest mean among methods not collapsed: **pre**" in table and "not ranked: x10" in table
    assert state.fingerprint() == state.base_fingerprint


def test_zsre_half_split_offset(tiny, tmp_path):
    """ZsRE: the evaluation stream is records 500-999 (--offset 500), the half the editors are not trained on."""
    from service.cli import main

    zsre = SHARED_CF.parents[1] / "zsre" / "zsre_mend_train_1k.json"
    out = tmp_path / "zsre"
    assert main(["eval", "--methods", "pre", "--n", "5", "--offset", "500", "--out", str(out), "--model",
                 str(tiny["model"]), "--editor", str(tiny["hiedit"]), "--data", str(zsre), "--n-ppl", "5",
                 "--glue-n", "2", "--no-progress"]) == 2  # record 534 has an empty 'alt': named, refused
    # With --skip-bad the two bad records (both in the evaluation half) are skipped and counted; records
    # 0-499 are all usable, so the stream starts at record 500 of the file.
    assert main(["eval", "--methods", "pre", "--n", "40", "--offset", "500", "--out", str(out), "--model",
                 str(tiny["model"]), "--editor", str(tiny["hiedit"]), "--data", str(zsre), "--n-ppl", "5",
                 "--glue-n", "2", "--skip-bad", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["scoring"] == "top-1 token accuracy" and "generation" in results["methods"]["pre"]
    stream = results["setup"]["stream"]
    assert stream[0] == "zsre-500" and "zsre-534" not in stream and len(stream) == 40
    assert results["setup"]["skipped_records"] >= 2  # the tiny tokenizer refuses more than the two bad ones
    assert "500-999 are evaluated" in results["setup"]["zsre_split"]


def test_value_log_reads_what_a_stop_left_and_changes_nothing(tmp_path):
    """ValueLog.read (also eval-progress's reader): the entries before a torn line, the file left as it is."""
    import editor_core.evaluate as ev
    from editor_core.memit import ValueLog
    from service.cli.eval_progress import _value_steps

    path = tmp_path / ev.VALUES_FILE
    assert ValueLog.read(path) == (None, [])                                   # no file
    head = {"format": "x", "key": "k"}
    entries = [{"i": i, "fact": f"{i:016d}", "z": "", "info": {"z_steps": 3 + i}} for i in range(3)]
    text = "".join(json.dumps(x) + "\n" for x in (head, *entries)) + '{"i": 3, "fa'   # a stop while writing
    path.write_text(text)
    assert ValueLog.read(path) == (head, entries)
    assert _value_steps(tmp_path) == [3, 4, 5]
    assert path.read_text() == text                                            # read-only, unlike ValueLog(...)
    path.write_text("not json\n" + json.dumps(entries[0]) + "\n")
    assert ValueLog.read(path) == (None, [])


def test_a_run_restarted_from_its_value_log_alone_gives_the_same_row(tiny, tmp_path, monkeypatch, capsys):
    """A MEMIT-style method stopped with no progress written (a machine that lost its disk keeps only the
    small values.jsonl) starts again from W^0 and replays the edits that file holds without MEMIT's value
    search, then searches the rest: the row is the row of a run never stopped. A log made under other
    settings, or for another fact at a record, is not used from there on."""
    import editor_core.evaluate as ev
    from editor_core.memit import MemitEditor
    from service.cli import main

    methods = ["memit-nohist", "alphaedit"]

    def run(out: Path, *extra: str) -> int:
        return main(["eval", "--methods", ",".join(methods), "--n", "30", "--every", "15", "--out", str(out),
                     "--model", str(tiny["model"]), "--editor", str(tiny["hiedit"]), "--data", str(tiny["data"]),
                     "--n-known", "10", "--n-ppl", "20", "--glue-n", "20", "--threads", "1", "--no-progress",
                     "--checkpoint-every", "0", *TINY_RLS, *extra])

    searched: list[str] = []
    original_z = MemitEditor._compute_z

    def counting(self, *args):
        searched.append(self.method)
        return original_z(self, *args)

    monkeypatch.setattr(MemitEditor, "_compute_z", counting)
    assert run(tmp_path / "whole") == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["methods"]
    assert searched.count("alphaedit") == 30

    original = ev._edit_one
    out = tmp_path / "stopped"
    _stop_alphaedit_at(monkeypatch, 25)
    with pytest.raises(_Stop):
        run(out)
    partial = out / "methods" / "alphaedit.partial"
    assert sorted(p.name for p in partial.iterdir()) == [ev.VALUES_FILE]  # no progress: --checkpoint-every 0
    lines = (partial / ev.VALUES_FILE).read_text().splitlines()
    assert len(lines) == 1 + 25
    capsys.readouterr()
    assert main(["eval-progress", str(out), "--json"]) == 0      # the log alone is a progress to show
    (shown,) = json.loads(capsys.readouterr().out)
    assert (shown["method"], shown["done"], shown["values_logged"]) == ("alphaedit", 0, 25)
    (steps,) = shown["value_steps_mean_per_100"]                 # TINY_RLS: v_steps=3
    assert 1 <= steps <= 3
    assert main(["eval-progress", str(partial)]) == 0
    assert "target values logged: 25 edits" in capsys.readouterr().out

    monkeypatch.setattr(ev, "_edit_one", original)
    searched.clear()
    assert run(out) == 0
    assert searched.count("alphaedit") == 5                  # records 25-29; 0-24 replayed from the log
    assert "memit-nohist" not in searched                    # its row was cached
    assert not partial.exists()
    _assert_same_rows(whole, json.loads((out / "results.json").read_text())["methods"], methods)

    def rerun_alphaedit_from(values: list[dict]) -> int:
        """Searches alphaedit makes when its row is gone and its progress directory holds ``values`` alone."""
        (out / "methods" / "alphaedit.json").unlink()
        partial.mkdir(parents=True)
        (partial / ev.VALUES_FILE).write_text("".join(json.dumps(x) + "\n" for x in values))
        searched.clear()
        assert run(out) == 0
        return searched.count("alphaedit")

    head, *entries = [json.loads(x) for x in lines]
    entries[3]["fact"] = "0" * 16
    assert rerun_alphaedit_from([head, *entries]) == 27      # record 3 is another fact: 0-2 replayed, then searched
    assert rerun_alphaedit_from([{**head, "key": "another"}, *entries]) == 30  # another key: not used at all
    _assert_same_rows(whole, json.loads((out / "results.json").read_text())["methods"], ["alphaedit"])
