"""Reading which persona an LLM judge chose, from its free text (one rule for live answers and stored rows).

The judge is asked to end with a "Selection:" line naming a persona id; real answers wrap
it in markdown, number it, name the persona instead, or lose the colon. This module sits
below both the LLM stages (which parse live answers strictly and ask for a repair when
that fails) and the training code (which parses stored rows leniently).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["SelectionMatch", "find_selection", "read_choice"]


# A "Selection:" marker as the judge prompt asks for it ("Selection:", "**Selection:**",
# "Final selection:", "Selected persona -", "Answer:"): the word, then a colon or dash.
_STRICT_MARK = re.compile(r"[*_#\s]*\b(?:final\s+)?(?:selection|selected persona|choice|answer)\b[*_\s]*[:\-]",
                          re.IGNORECASE)
# Any "selection" word, for stored rows whose marker lost its colon ("Selection 3. X_P3").
_LOOSE_MARK = re.compile(r"\bselection\b\W{0,8}", re.IGNORECASE)
_BARE_PID = re.compile(r"(?<![A-Za-z0-9])P(\d+)\b")
_LEADING_NUMBER = re.compile(r"[#(\[]?(\d{1,2})\b")
_PID_RE = re.compile(r"^P(\d+)$")


@dataclass(frozen=True)
class SelectionMatch:
    """Where a judge's text names its persona (see :func:`find_selection`)."""

    persona_id: str | None  # "P<k>" (k-th persona of the item, 1-based), or a persona_names key; None: not found
    source: str  # "reasoning_id" | "reasoning_number" | "reasoning_name" | "none"
    marker: tuple[int, int] | None = None  # span of the last selection marker (the reasoning is text[:start])
    choice: str = ""  # the text read as the choice (the line after the marker)

    @property
    def number(self) -> int | None:
        m = _PID_RE.match(self.persona_id or "")
        return int(m.group(1)) if m else None


def _id_tokens(text: str, persona_ids: Sequence[str] | None, item_id: str | None) -> list[tuple[int, str]]:
    """(position, "P<k>") of every full persona id in ``text``: one of ``persona_ids`` (the k-th
    in the list) or an ``<item_id>_P<k>`` token."""
    found: list[tuple[int, str]] = []
    for k, pid in enumerate(persona_ids or (), 1):
        found += [(m.start(), f"P{k}") for m in re.finditer(re.escape(pid) + r"(?![0-9])", text)]
    if item_id:
        found += [(m.start(), f"P{int(m.group(1))}") for m in re.finditer(re.escape(item_id) + r"_P(\d+)\b", text)]
    return sorted(found)


def _name_hit(text: str, persona_names: Mapping[str, str] | None) -> str | None:
    """The persona (key of ``persona_names``) whose name occurs last in ``text``."""
    low = text.lower()
    hits = [(low.rfind(name.lower()), pid) for pid, name in (persona_names or {}).items() if name and name.lower() in low]
    return max(hits)[1] if hits else None


def read_choice(
    choice: str,
    *,
    persona_ids: Sequence[str] | None = None,
    item_id: str | None = None,
    persona_names: Mapping[str, str] | None = None,
) -> tuple[str | None, str]:
    """The persona one choice string names ("X_P3", "3. X_P3", "P3", "3", a quoted name).

    Order of trust: a full persona id (first in the text; one of ``persona_ids``, whose k-th
    entry is "P<k>", or ``<item_id>_P<k>``), then a bare "P<k>", then a number at the start,
    then a persona name (``persona_names``: id -> name). Returns ("P<k>" or a names key,
    source) or (None, "none"); no range check (the caller knows how many personas exist).
    """
    tokens = _id_tokens(choice, persona_ids, item_id)
    if tokens:
        return tokens[0][1], "reasoning_id"
    bare = _BARE_PID.search(choice)
    if bare:
        return f"P{int(bare.group(1))}", "reasoning_id"
    number = _LEADING_NUMBER.match(choice.lstrip(" \t\r\n*_"))
    if number:
        return f"P{int(number.group(1))}", "reasoning_number"
    name = _name_hit(choice, persona_names)
    if name is not None:
        return name, "reasoning_name"
    return None, "none"


def find_selection(
    text: str,
    *,
    persona_ids: Sequence[str] | None = None,
    item_id: str | None = None,
    persona_names: Mapping[str, str] | None = None,
    strict: bool = False,
) -> SelectionMatch:
    """The persona a judge's prose selects: the one home of this rule for live answers
    (:func:`persona4rec.llm.stages.parse_selection`, ``strict=True``) and stored rows
    (:func:`parse_selection`, ``strict=False``).

    The choice is read (:func:`read_choice`) from the first non-empty line after the last
    "Selection:" marker (the last one, so the word inside the reasoning does not count).
    ``strict=False`` then accepts more, for rows that cannot be asked again: a bare
    "selection" word as the marker when no "Selection:" exists, and, when the line after
    it names nothing, the last full persona id anywhere in the text, then the last
    persona name. ``strict=True`` reads only the line after a "Selection:" marker.
    """
    text = text if isinstance(text, str) else ""
    marks = list(_STRICT_MARK.finditer(text))
    if not marks and not strict:
        marks = list(_LOOSE_MARK.finditer(text))
    span = (marks[-1].start(), marks[-1].end()) if marks else None
    choice = ""
    if span is not None:
        choice = text[span[1]:].lstrip(" \t\r\n*_").split("\n", 1)[0][:200].strip()
        pid, source = read_choice(choice, persona_ids=persona_ids, item_id=item_id, persona_names=persona_names)
        if pid is not None:
            return SelectionMatch(pid, source, span, choice)
    if not strict:
        tokens = _id_tokens(text, persona_ids, item_id)
        if tokens:
            return SelectionMatch(tokens[-1][1], "reasoning_id", span, choice)
        name = _name_hit(text, persona_names)
        if name is not None:
            return SelectionMatch(name, "reasoning_name", span, choice)
    return SelectionMatch(None, "none", span, choice)


