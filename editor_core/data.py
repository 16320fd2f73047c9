"""Editing datasets (ZsRE in MEND format, CounterFact flattened or ROME format) as EditRecords."""
from __future__ import annotations

from dataclasses import dataclass
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
