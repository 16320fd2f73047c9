"""The subject of an edit: the span of the prompt whose last token MEMIT-style editors read keys at.

``find_subject`` takes the subject the request gives, or derives one: the longest run of capitalised
words (joined by connectors such as "of", "von", "de"), else the prompt's last word.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .capture import EditInputError


class SubjectError(EditInputError):
    """``subject`` was given but does not occur in ``prompt`` (or is empty)."""


_STOPWORDS = {"the", "a", "an", "in", "on", "at", "of", "what", "which", "who", "whom", "whose", "where", "when",
              "why", "how", "is", "was", "are", "were", "does", "did", "do", "it", "this", "that", "these",
              "those", "there", "his", "her", "their", "its", "my", "our", "your", "as", "for", "to", "by"}
_CONNECTORS = {"of", "de", "la", "le", "von", "van", "der", "du", "da", "di", "the", "and", "&", "y"}
_TRAIL = ",.;:!?\"')]}"


@dataclass(frozen=True)
class Subject:
    """The subject span inside the prompt: prompt[start:end] == text."""

    text: str
    start: int
    end: int
    source: str  # "given" | "derived" | "last_token"


def _is_cap(word: str) -> bool:
    first = next((c for c in word if c.isalnum()), "")
    return bool(first) and (first.isupper() or first.isdigit())


def find_subject(prompt: str, subject: str | None) -> Subject:
    """Locate a given subject, or derive one: the longest run of capitalised words (ties: the later),
    else the prompt's last word. A given subject must occur in the prompt (SubjectError otherwise)."""
    if subject is not None:
        if not isinstance(subject, str) or not subject.strip():
            raise SubjectError("subject: must be a non-empty string when given")
        text = subject.strip()
        start = prompt.find(text)
        if start < 0:
            raise SubjectError(f"subject: {text!r} does not occur in the prompt {prompt!r}")
        return Subject(text, start, start + len(text), "given")
    words = [(m.start(), m.start() + len(m.group().rstrip(_TRAIL)), m.group().rstrip(_TRAIL))
             for m in re.finditer(r"\S+", prompt)]
    words = [w for w in words if w[2]]
    runs: list[list[tuple[int, int, str]]] = []
    cur: list[tuple[int, int, str]] = []
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else None
        if _is_cap(w[2]):
            cur.append(w)
        elif cur and w[2].lower() in _CONNECTORS and nxt is not None and _is_cap(nxt[2]):
            cur.append(w)
        else:
            if cur:
                runs.append(cur)
            cur = []
        # a word with trailing punctuation ends a name ("Paris, France" is two candidates)
        if cur and prompt[w[1]:w[1] + 1] in tuple(_TRAIL):
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    best: list[tuple[int, int, str]] = []
    for run in runs:
        while len(run) > 1 and run[0][2].lower() in _STOPWORDS:
            run = run[1:]
        if len(run) == 1 and run[0][2].lower() in _STOPWORDS:
            continue
        if len(run) >= len(best):
            best = run
    if best:
        start, end = best[0][0], best[-1][1]
        return Subject(prompt[start:end], start, end, "derived")
    if not words:
        raise EditInputError("prompt: must contain at least one word")
    start, end, text = words[-1]
    return Subject(text, start, end, "last_token")
