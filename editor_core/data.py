"""Editing datasets (ZsRE in MEND format, CounterFact flattened or ROME format) as EditRecords."""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

# ../shared/data relative to the repository root; used in place, never copied.
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@dataclass(frozen=True)
class EditRecord:
    """One fact to edit, with what scores it.

    prompt/target_new:        the edit (Efficacy)
    target_true:              the fact the model knew (CounterFact; "" for ZsRE)
    rephrase:                 a paraphrase of the prompt (Generalization; training edit loss)
    locality_prompt/_target:  an unrelated prompt and its answer (Specificity; locality KL)
    subject:                  the subject span inside prompt (RLSEdit keys), "" if unknown
    """

    case_id: str
    prompt: str
    target_new: str
    target_true: str
    rephrase: str
    locality_prompt: str
    locality_target: str
    subject: str = ""


class DatasetError(ValueError):
    """A dataset file or record that cannot be turned into EditRecords.

    The message names the file, the record index and the field, e.g.
    ``counterfact-edit.json: record 17: field 'target_new': empty target``.
    """

    def __init__(self, path: str | Path, index: int | None, field: str | None, problem: str):
        self.path, self.index, self.field, self.problem = str(path), index, field, problem
        where = Path(path).name
        if index is not None:
            where += f": record {index}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {problem}")


class _BadRecord(Exception):
    """Internal: one record is unusable; carries the field to blame."""

    def __init__(self, field: str, problem: str):
        super().__init__(problem)
        self.field, self.problem = field, problem


@dataclass
class LoadResult:
    """What a loader returns: the records kept, how many bad ones were skipped, and the format seen."""

    records: list[EditRecord]
    skipped: int = 0
    format: str = ""
    errors: list[str] = dataclass_field(default_factory=list)  # one line per skipped record
    indices: list[int] = dataclass_field(default_factory=list)  # each kept record's index in the file

    def __iter__(self):  # so that ``records, skipped = load_zsre(...)`` also reads naturally
        return iter((self.records, self.skipped))

    def __len__(self) -> int:
        return len(self.records)


def _read_json_list(path: str | Path) -> list:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, None, None, "no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DatasetError(path, None, None, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise DatasetError(path, None, None, f"expected a top-level JSON list of records, got {type(data).__name__}")
    return data


def _text(rec: dict, field: str, *, target: bool = False, allow_empty: bool = False) -> str:
    """``rec[field]`` as a string; missing / non-string / empty values raise _BadRecord(field)."""
    if not isinstance(rec, dict):
        raise _BadRecord("<record>", f"expected a JSON object, got {type(rec).__name__}")
    if field not in rec or rec[field] is None:
        raise _BadRecord(field, "missing field")
    value = rec[field]
    if not isinstance(value, str):
        raise _BadRecord(field, f"expected a string, got {type(value).__name__}")
    if not value.strip() and not allow_empty:
        raise _BadRecord(field, "empty target" if target else "empty string")
    return value


def _nested(rec: dict, dotted: str) -> object:
    cur: object = rec
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur or cur[part] is None:
            raise _BadRecord(dotted, "missing field")
        cur = cur[part]
    return cur


# Which EditRecord field each text came from, so that tokenizer failures name the source field.
_TARGET_FIELDS = ("target_new", "target_true", "locality_target")


def _check_encodable(rec: EditRecord, tokenizer, sources: dict[str, str]) -> None:
    """Every prompt/target must tokenize to at least one token and no unknown token.

    ``sources`` maps an EditRecord field to the file's field name it came from.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    for name in ("prompt", "target_new", "target_true", "rephrase", "locality_prompt", "locality_target"):
        text = getattr(rec, name)
        if not text:  # ZsRE has no target_true
            continue
        try:
            ids = tokenizer(text if name not in _TARGET_FIELDS else " " + text.strip(),
                            add_special_tokens=False)["input_ids"]
        except Exception as exc:  # noqa: BLE001 - any tokenizer failure is a bad record
            raise _BadRecord(sources.get(name, name), f"the tokenizer cannot encode it ({exc})") from None
        if not ids:
            raise _BadRecord(sources.get(name, name), "tokenizes to no tokens")
        if unk is not None and unk in ids:
            raise _BadRecord(sources.get(name, name), "contains characters the tokenizer cannot encode (unknown token)")


def _collect(path: str | Path, raw: list, parse, fmt: str, tokenizer, skip_bad: bool,
             sources: dict[str, str], limit: int | None) -> LoadResult:
    out = LoadResult(records=[], format=fmt)
    for index, item in enumerate(raw):
        if limit is not None and len(out.records) >= limit:
            break
        try:
            rec = parse(item, index)
            if tokenizer is not None:
                _check_encodable(rec, tokenizer, sources)
        except _BadRecord as bad:
            err = DatasetError(path, index, bad.field, bad.problem)
            if not skip_bad:
                raise err from None
            out.skipped += 1
            out.errors.append(str(err))
            continue
        out.records.append(rec)
        out.indices.append(index)
    return out


# --------------------------------------------------------------------------------------------
# ZsRE, MEND format
# --------------------------------------------------------------------------------------------

ZSRE_SOURCES = {"prompt": "src", "target_new": "alt", "rephrase": "rephrase",
                "locality_prompt": "loc", "locality_target": "loc_ans"}


def _zsre_record(rec: dict, index: int) -> EditRecord:
    src = _text(rec, "src")
    alt = _text(rec, "alt", target=True)
    rephrase = _text(rec, "rephrase")
    # ``loc`` is a Natural Questions question that starts with the literal "nq question: ".
    # It is kept verbatim as the locality prompt: it is what MEND/RLEdit/HiEdit feed the model,
    # and the prefix is harmless for a KL or top-1 comparison against the unedited model.
    loc = _text(rec, "loc")
    loc_ans = _text(rec, "loc_ans", target=True)
    subject = rec.get("subject") or ""
    return EditRecord(case_id=f"zsre-{rec.get('case_id', index)}", prompt=src, target_new=alt, target_true="",
                      rephrase=rephrase, locality_prompt=loc, locality_target=loc_ans,
                      subject=subject if isinstance(subject, str) else "")


def load_zsre(path: str | Path, tokenizer=None, skip_bad: bool = False, limit: int | None = None) -> LoadResult:
    """ZsRE in MEND format -> EditRecords.

    Field mapping: ``src`` -> prompt, ``alt`` -> target_new (the edit), ``rephrase`` -> rephrase,
    ``loc`` -> locality_prompt (kept with its "nq question: " prefix), ``loc_ans`` -> locality_target,
    ``subject`` -> subject. target_true stays "" (ZsRE is scored by top-1 token accuracy only).
    case_id is ``zsre-<index in the file>``.
    """
    return _collect(path, _read_json_list(path), _zsre_record, "zsre-mend", tokenizer, skip_bad,
                    ZSRE_SOURCES, limit)


# --------------------------------------------------------------------------------------------
# CounterFact: EasyEdit flattened format and the original ROME format
# --------------------------------------------------------------------------------------------

CF_FLAT_SOURCES = {"prompt": "prompt", "target_new": "target_new", "target_true": "ground_truth",
                   "rephrase": "rephrase_prompt", "locality_prompt": "locality_prompt",
                   "locality_target": "locality_ground_truth"}
CF_ROME_SOURCES = {"prompt": "requested_rewrite.prompt", "target_new": "requested_rewrite.target_new.str",
                   "target_true": "requested_rewrite.target_true.str", "rephrase": "paraphrase_prompts",
                   "locality_prompt": "neighborhood_prompts", "locality_target": "requested_rewrite.target_true.str"}


def _cf_flat_record(rec: dict, index: int) -> EditRecord:
    if not isinstance(rec, dict):
        raise _BadRecord("<record>", f"expected a JSON object, got {type(rec).__name__}")
    if "case_id" not in rec:
        raise _BadRecord("case_id", "missing field")
    return EditRecord(case_id=str(rec["case_id"]), prompt=_text(rec, "prompt"),
                      target_new=_text(rec, "target_new", target=True),
                      target_true=_text(rec, "ground_truth", target=True),
                      rephrase=_text(rec, "rephrase_prompt"), locality_prompt=_text(rec, "locality_prompt"),
                      locality_target=_text(rec, "locality_ground_truth", target=True),
                      subject=_text(rec, "subject"))


def _pick(options: object, field: str, case_id: str, seed: int | None) -> str:
    """One prompt out of a ROME list: the first, or a seeded choice keyed on (seed, case_id)."""
    if not isinstance(options, list) or not options:
        raise _BadRecord(field, "expected a non-empty list of prompts")
    if not all(isinstance(o, str) and o.strip() for o in options):
        raise _BadRecord(field, "every prompt must be a non-empty string")
    if seed is None:
        return options[0]
    return options[random.Random(f"{seed}:{case_id}:{field}").randrange(len(options))]


def _cf_rome_record(seed: int | None):
    def parse(rec: dict, index: int) -> EditRecord:
        if not isinstance(rec, dict):
            raise _BadRecord("<record>", f"expected a JSON object, got {type(rec).__name__}")
        if "case_id" not in rec:
            raise _BadRecord("case_id", "missing field")
        case_id = str(rec["case_id"])
        rw = _nested(rec, "requested_rewrite")
        template = _nested(rec, "requested_rewrite.prompt")
        subject = _nested(rec, "requested_rewrite.subject")
        if not isinstance(subject, str) or not subject.strip():
            raise _BadRecord("requested_rewrite.subject", "empty string")
        if not isinstance(template, str) or "{}" not in template:
            raise _BadRecord("requested_rewrite.prompt", "expected a template with a {} placeholder for the subject")
        new = _nested(rec, "requested_rewrite.target_new.str")
        true = _nested(rec, "requested_rewrite.target_true.str")
        for name, val in (("requested_rewrite.target_new.str", new), ("requested_rewrite.target_true.str", true)):
            if not isinstance(val, str) or not val.strip():
                raise _BadRecord(name, "empty target")
        assert isinstance(rw, dict)
        if "paraphrase_prompts" not in rec:
            raise _BadRecord("paraphrase_prompts", "missing field")
        if "neighborhood_prompts" not in rec:
            raise _BadRecord("neighborhood_prompts", "missing field")
        rephrase = _pick(rec["paraphrase_prompts"], "paraphrase_prompts", case_id, seed)
        neighbour = _pick(rec["neighborhood_prompts"], "neighborhood_prompts", case_id, seed)
        # Neighbourhood prompts share the relation and the true object of the edited fact
        # (that is how CounterFact built them), so their expected answer is target_true.
        return EditRecord(case_id=case_id, prompt=template.replace("{}", subject), target_new=new,
                          target_true=true, rephrase=rephrase, locality_prompt=neighbour,
                          locality_target=true, subject=subject)
    return parse


def _is_rome(item: object) -> bool:
    return isinstance(item, dict) and "requested_rewrite" in item


def load_counterfact(path: str | Path, tokenizer=None, skip_bad: bool = False, limit: int | None = None,
                     seed: int | None = None) -> LoadResult:
    """CounterFact -> EditRecords, in either of its two formats (detected from the first record).

    * EasyEdit flattened (``../shared/data/counterfact/*.json``): case_id, prompt, subject,
      target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth.
    * original ROME: requested_rewrite{prompt with a {} placeholder, subject, target_new.str,
      target_true.str}, paraphrase_prompts, neighborhood_prompts. ROME has several paraphrases
      and neighbours per case; one of each is taken: the first when ``seed`` is None, else a
      choice seeded by (seed, case_id), so it is the same whatever order the file is read in.
    """
    raw = _read_json_list(path)
    if raw and _is_rome(raw[0]):
        return _collect(path, raw, _cf_rome_record(seed), "counterfact-rome", tokenizer, skip_bad,
                        CF_ROME_SOURCES, limit)
    return _collect(path, raw, _cf_flat_record, "counterfact-flat", tokenizer, skip_bad, CF_FLAT_SOURCES, limit)


def detect_format(path: str | Path) -> str:
    """'zsre-mend', 'counterfact-flat' or 'counterfact-rome', from the first record's fields."""
    raw = _read_json_list(path)
    if not raw:
        raise DatasetError(path, None, None, "the file holds no records")
    first = raw[0]
    if _is_rome(first):
        return "counterfact-rome"
    if isinstance(first, dict) and "src" in first and "alt" in first:
        return "zsre-mend"
    if isinstance(first, dict) and "target_new" in first and "ground_truth" in first:
        return "counterfact-flat"
    keys = sorted(first) if isinstance(first, dict) else type(first).__name__
    raise DatasetError(path, 0, None, f"unknown dataset format (fields {keys}); expected ZsRE (src, alt, ...) "
                                      "or CounterFact (flattened: target_new, ground_truth; ROME: requested_rewrite)")


def load_records(path: str | Path, tokenizer=None, skip_bad: bool = False, limit: int | None = None,
                 seed: int | None = None) -> LoadResult:
    """Load any supported editing dataset, detecting its format. See load_zsre / load_counterfact."""
    fmt = detect_format(path)
    if fmt == "zsre-mend":
        return load_zsre(path, tokenizer=tokenizer, skip_bad=skip_bad, limit=limit)
    return load_counterfact(path, tokenizer=tokenizer, skip_bad=skip_bad, limit=limit, seed=seed)


# --------------------------------------------------------------------------------------------
# General English text (GLUE sentences) for pretraining and perplexity
# --------------------------------------------------------------------------------------------

GLUE_TASKS: dict[str, tuple[str, ...]] = {
    "sst2": ("sentence",), "cola": ("sentence",), "mrpc": ("sentence1", "sentence2"),
    "rte": ("sentence1", "sentence2"), "nli": ("sentence1", "sentence2"),
}


def _heldout(text: str, heldout_fraction: float, seed: int) -> bool:
    """A stable, order-free split: hash the sentence with the seed (same answer on every machine)."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def glue_sentences(split: str = "train", glue_dir: str | Path | None = None, tasks: tuple[str, ...] | None = None,
                   heldout_fraction: float = 0.1, seed: int = 0) -> Iterator[str]:
    """Yield the distinct English sentences of the GLUE files, in file order.

    split: "train" (the ~90% used for pretraining), "heldout" (the ~10% kept for perplexity,
    never trained on) or "all". The split hashes each sentence with ``seed``, so it does not
    depend on file order and a sentence is on the same side wherever it appears. Sentences are
    whitespace-normalised (SST-2 has trailing spaces).
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    glue_dir = Path(glue_dir) if glue_dir is not None else SHARED_DATA / "glue"
    seen: set[str] = set()
    for task in tasks or tuple(GLUE_TASKS):
        if task not in GLUE_TASKS:
            raise ValueError(f"unknown GLUE task {task!r}; known: {sorted(GLUE_TASKS)}")
        path = glue_dir / f"{task}.json"
        for index, rec in enumerate(_read_json_list(path)):
            for field in GLUE_TASKS[task]:
                if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                    raise DatasetError(path, index, field, "missing field")
                text = " ".join(rec[field].split())
                if not text or text in seen:
                    continue
                seen.add(text)
                if split == "all" or _heldout(text, heldout_fraction, seed) == (split == "heldout"):
                    yield text
