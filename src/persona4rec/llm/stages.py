"""The four offline stages: aspects, item summaries, personas, persona selection.

Each stage is two pieces: a ``*_tasks`` function that turns inputs into
:class:`~persona4rec.llm.jobs.Task` objects (prompt + parser), and a ``parse_*``
function that turns a model answer into the stage's record fields or raises
:class:`~persona4rec.llm.schemas.SchemaError`. :func:`run_tasks` executes tasks with
a :class:`~persona4rec.llm.jobs.JobRunner`.

Leakage: every stage that reads reviews takes ``exclude_review_ids``; excluded
reviews never reach a prompt, and every record lists the ``review_ids`` whose content
reached its prompt, so a split can be audited afterwards (``persona4rec evaluate
--personas`` does). The command line refuses to run these stages without a guard
(``--exclude-review-ids``, ``--split`` or ``--allow-heldout``; see :mod:`.cli`).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from persona4rec.selection import find_selection, read_choice

from .client import ChatClient, ClientConfig
from .jobs import JobRunner, RunSummary, Task
from .prompts import PromptSet
from .schemas import (
    SELECTION_SCHEMA,
    SUMMARY_SCHEMA,
    SchemaError,
    aspects_schema,
    extract_json,
    personas_schema,
    validate,
)

MIN_PERSONAS = 2
MAX_PERSONAS = 7
# The prompt asks for 2-3 word names; gpt-4o-mini itself writes 4-5 words in about a third of
# the published sample, so only clearly broken names (sentences) are sent back for repair.
MAX_NAME_WORDS = 6
# Per-review text budget in the persona prompt, in tokens at ~4 characters per token (no tokenizer needed):
# 40 reviews x 256 tokens keeps the prompt near 12k tokens, well inside gpt-4o-mini's 128k context.
REVIEW_TEXT_TOKENS = 256
_NULL_WORDS = {"", "null", "none", "n/a", "na", "not mentioned", "unknown"}


# ---------------------------------------------------------------- aspects

def aspect_fields(prompts: PromptSet) -> list[dict[str, Any]]:
    return prompts.config["aspects"]


def parse_aspects(text: str, fields: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"aspects": {...}}`` from an answer; null-like strings ("N/A", "none") become null."""
    value = extract_json(text)
    validate(value, aspects_schema(fields))
    return {"aspects": {k: (None if isinstance(v, str) and v.strip().lower() in _NULL_WORDS else v)
                        for k, v in value.items()}}


def _aspect_prompt_values(fields: list[dict[str, Any]]) -> dict[str, str]:
    field_list = "\n".join(f"- {f['name']}: {f['description']}" for f in fields)
    shape: dict[str, str] = {}
    for f in fields:
        shape[f["name"]] = "<short phrase or null>"
        if f.get("reason", True):
            shape[f"{f['name']}_reason"] = "<one sentence citing the review, or why it cannot be told>"
    return {
        "field_list": field_list,
        "reason_rule": "Every *_reason field is one short sentence that points to the words of the review "
                       "behind the value (or says the review gives no evidence).",
        "json_shape": json.dumps(shape, indent=1),
    }


def aspect_tasks(reviews: Iterable[dict[str, Any]], prompts: PromptSet,
                 items: dict[str, dict[str, Any]] | None = None,
                 exclude_review_ids: Collection[str] = ()) -> list[Task]:
    """One task per review not excluded; reviews with no title and no text are skipped (nothing to read)."""
    fields = aspect_fields(prompts)
    schema = aspects_schema(fields)
    fixed = _aspect_prompt_values(fields)
    excluded = set(exclude_review_ids)
    tasks = []
    for r in reviews:
        if r["review_id"] in excluded or not (r["text"].strip() or r["title"].strip()):
            continue
        item = (items or {}).get(r["item_id"], {})
        messages = prompts.render("aspects", item_title=item.get("title") or r["item_id"], rating=f"{r['rating']:g}",
                                  review_title=r["title"], review_text=r["text"], **fixed)
        meta = {k: r[k] for k in ("review_id", "item_id", "user_id", "rating", "timestamp")}
        meta["review_ids"] = [r["review_id"]]
        tasks.append(Task(r["review_id"], messages, schema, lambda text, f=fields: parse_aspects(text, f), meta))
    return tasks


# ---------------------------------------------------------------- summaries

# JSON somewhere in an answer: a code fence, or an object opening with one of the stage's field names.
_FENCE_OR_OBJECT = re.compile(r'```|^\s*[{\[]|\{\s*"(?:summary|reasoning|selection|selected_persona_id)"')


def _has_json(text: str) -> bool:
    return bool(_FENCE_OR_OBJECT.search(text))


def parse_summary(text: str) -> dict[str, Any]:
    """``{"summary": str}`` from a JSON answer, or from plain prose when the model ignored the JSON request.

    JSON anywhere in the answer (a fence after a sentence of preamble, say) is read as JSON: the
    preamble is not the summary, and a fenced object that fails the schema goes back for repair.
    """
    stripped = text.strip()
    if not stripped:
        raise SchemaError("the answer is empty; write the 2-3 sentence summary")
    if _has_json(stripped):
        value = extract_json(stripped)
        validate(value, SUMMARY_SCHEMA)
        return {"summary": value["summary"].strip()}
    return {"summary": stripped}


def _format_attributes(attributes: Any) -> str:
    if isinstance(attributes, dict):
        return "; ".join(f"{k}: {v}" for k, v in attributes.items() if v not in (None, "", [], {}))
    return str(attributes or "")


def summary_tasks(items: Iterable[dict[str, Any]], prompts: PromptSet) -> list[Task]:
    """One task per item, from its title, categories, description and attributes."""
    tasks = []
    for item in items:
        categories = item.get("categories") or ""
        if isinstance(categories, list):
            categories = ", ".join(map(str, categories))
        messages = prompts.render("summary", item_title=item.get("title") or item["item_id"],
                                  categories=categories, description=item.get("description") or "",
                                  attributes=_format_attributes(item.get("attributes")))
        tasks.append(Task(item["item_id"], messages, SUMMARY_SCHEMA, parse_summary,
                          {"item_id": item["item_id"], "item_title": item.get("title") or ""}))
    return tasks


# ---------------------------------------------------------------- personas

def persona_count_range(n_reviews: int) -> tuple[int, int]:
    """How many personas an item with ``n_reviews`` reviews gets: exactly 1 for one review, else 2 to 7."""
    return (1, 1) if n_reviews <= 1 else (MIN_PERSONAS, MAX_PERSONAS)


def _name_key(name: str) -> str:
    words = re.sub(r"[^a-z0-9 ]", " ", name.lower()).split()
    return " ".join(w for w in words if w not in {"the", "a", "an"})


def parse_personas(text: str, item_id: str, n_reviews: int) -> dict[str, Any]:
    """``{"personas": [...]}`` with ids ``P1..Pn`` and ``persona_id = f"{item_id}_P{n}"`` by position.

    Accepts ``{"personas": [...]}`` or a bare list. Rejects (for repair) a wrong count, missing
    fields, sentence-long names and duplicate names.
    """
    value = extract_json(text)
    if isinstance(value, list):
        value = {"personas": value}
    low, high = persona_count_range(n_reviews)
    validate(value, personas_schema(low, high))
    seen: dict[str, str] = {}
    personas = []
    for n, p in enumerate(value["personas"], 1):
        name = " ".join(p["Name"].split())
        if len(name.split()) > MAX_NAME_WORDS:
            raise SchemaError(f"$.personas[{n - 1}].Name: {name!r} is too long; use 3 to 5 words")
        key = _name_key(name)
        if key in seen:
            raise SchemaError(f"$.personas[{n - 1}]: duplicate of persona {seen[key]!r}; merge them or make each "
                              "persona distinct")
        seen[key] = name
        personas.append({"persona_id": f"{item_id}_P{n}", "ID": f"P{n}", "Name": name,
                         "Description": p["Description"].strip(),
                         "Preference_Rationale": p["Preference_Rationale"].strip()})
    return {"personas": personas}


def _aspect_text(aspects: dict[str, Any] | None, fields: list[dict[str, Any]]) -> str:
    parts = []
    for f in fields:
        value = (aspects or {}).get(f["name"])
        if value is None:
            continue
        reason = (aspects or {}).get(f"{f['name']}_reason")
        parts.append(f"{f['name']}: {value}" + (f" ({reason})" if reason else ""))
    return "; ".join(parts)


def _evidence_line(index: int, record: dict[str, Any], fields: list[dict[str, Any]]) -> str:
    """The v1 evidence line: rating and aspects only."""
    body = _aspect_text(record.get("aspects"), fields) if record.get("status", "ok") == "ok" else ""
    return f"- review {index} (rating {record.get('rating', 0):g}/5): {body or 'no specific aspects stated'}"


def truncate_to_tokens(text: str, tokens: int) -> str:
    """``text`` cut at a word boundary to about ``tokens`` tokens (4 characters each), marked "[...]"."""
    text = " ".join(text.split())
    limit = tokens * 4
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut + " [...]"


def _review_block(index: int, record: dict[str, Any], review: dict[str, Any] | None,
                  fields: list[dict[str, Any]], text_tokens: int) -> str:
    """The v2 evidence of one review: rating, title, text (cut to the budget) and its aspects."""
    lines = [f"Review {index} (rating {record.get('rating', 0):g}/5)"]
    if review is not None:
        lines.append(f"  Title: {' '.join(review.get('title', '').split()) or '(none)'}")
        lines.append(f"  Text: {truncate_to_tokens(review.get('text', ''), text_tokens) or '(none)'}")
    if record.get("status", "ok") == "ok":
        lines.append(f"  Aspects: {_aspect_text(record.get('aspects'), fields) or 'none stated'}")
    else:
        lines.append("  Aspects: not available (extraction failed)")
    return "\n".join(lines)


def group_aspects_by_item(aspect_records: Iterable[dict[str, Any]], exclude_review_ids: Collection[str] = (),
                          include_failed: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Aspect records by item id (successful ones; every one with ``include_failed``), minus excluded
    reviews, oldest first."""
    excluded = set(exclude_review_ids)
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in aspect_records:
        if (include_failed or rec.get("status") == "ok") and rec["review_id"] not in excluded:
            grouped[rec["item_id"]].append(rec)
    for recs in grouped.values():
        recs.sort(key=lambda r: (str(r.get("timestamp", "")), r["review_id"]))
    return dict(grouped)


def persona_tasks(aspect_records: Iterable[dict[str, Any]], prompts: PromptSet,
                  summaries: dict[str, str] | None = None, items: dict[str, dict[str, Any]] | None = None,
                  exclude_review_ids: Collection[str] = (), max_reviews_per_item: int = 40,
                  reviews: Iterable[dict[str, Any]] | None = None,
                  review_text_tokens: int = REVIEW_TEXT_TOKENS) -> list[Task]:
    """One task per item with at least one review in the aspects file; the evidence is its most recent
    ``max_reviews_per_item`` reviews: each one's title and text (from ``reviews``, cut to
    ``review_text_tokens``) and its extracted aspects.

    The persona count follows the item's reviews, not its successful aspect extractions: a review
    whose aspect call failed still counts (and still shows its title and text when ``reviews`` is
    given), so a partly failed aspects run does not shrink an item to one persona. Records list
    every ``review_ids`` that reached the prompt, and ``aspect_failed_review_ids`` when any did so
    without aspects.
    """
    fields = aspect_fields(prompts)
    excluded = set(exclude_review_ids)
    by_id = {r["review_id"]: r for r in reviews if r["review_id"] not in excluded} if reviews is not None else {}
    tasks = []
    grouped = group_aspects_by_item(aspect_records, excluded, include_failed=True)
    for item_id, recs in sorted(grouped.items()):
        recs = recs[-max_reviews_per_item:]
        low, high = persona_count_range(len(recs))
        # Ask for no more personas than there are reviews to ground them; the schema keeps the 2-7 range.
        suggested = min(high, max(low, len(recs)))
        rule = f"exactly {low} persona{'s' * (low > 1)}" if suggested == low else f"between {low} and {suggested} personas"
        item = (items or {}).get(item_id, {})
        evidence = "\n".join(_evidence_line(i, r, fields) for i, r in enumerate(recs, 1))
        reviews_block = "\n".join(_review_block(i, r, by_id.get(r["review_id"]), fields, review_text_tokens)
                                  for i, r in enumerate(recs, 1))
        messages = prompts.render("personas", item_title=item.get("title") or item_id,
                                  item_description=item.get("description") or "",
                                  item_summary=(summaries or {}).get(item_id) or item.get("title") or "",
                                  evidence=evidence, reviews_block=reviews_block, persona_count_rule=rule)
        meta: dict[str, Any] = {"item_id": item_id, "review_ids": [r["review_id"] for r in recs]}
        failed = [r["review_id"] for r in recs if r.get("status", "ok") != "ok"]
        if failed:
            meta["aspect_failed_review_ids"] = failed
        tasks.append(Task(item_id, messages, personas_schema(low, high),
                          lambda text, i=item_id, n=len(recs): parse_personas(text, i, n), meta))
    return tasks


# ---------------------------------------------------------------- selection

_JSON_CHOICE_KEYS = ("selection", "selected_persona_id", "persona_id", "selected_persona", "choice", "persona")


def _resolve_choice(choice: str, persona_ids: list[str]) -> int:
    """1-based index of the persona named by ``choice`` ("P2", "2. X_P2", "X_P2", "2")."""
    pid, _ = read_choice(choice, persona_ids=persona_ids)
    return _checked_index(pid, choice, persona_ids)


def _checked_index(pid: str | None, choice: str, persona_ids: list[str]) -> int:
    if pid is None:
        raise SchemaError(f"the selection {choice.strip()[:60]!r} names no persona; answer with one of {persona_ids}")
    index = int(pid[1:])
    if not 1 <= index <= len(persona_ids):
        raise SchemaError(f"the selection names persona {index}, but only {persona_ids} exist")
    return index


def parse_selection(text: str, persona_ids: list[str]) -> dict[str, Any]:
    """The chosen persona and the reasoning, from JSON or from prose ending in "Selection: ...".

    Handles the forms gpt-4o-mini produced for the paper ("Selection: 3. X_P3",
    "**Selection:** 2. X_P2") as well as ``{"reasoning": ..., "selection": "X_P2"}``.
    When the prose carries both a number and a persona id, the id wins. Prose is read by
    :func:`persona4rec.selection.find_selection` (strict: only the line after the last
    "Selection:" marker counts), the same rule that reads stored judge rows for training;
    a missing, unresolvable or out-of-range choice raises :class:`SchemaError` for repair.
    """
    stripped = text.strip()
    if not stripped:
        raise SchemaError("the answer is empty; give the reasoning and the selected persona id")
    value = None
    if _has_json(stripped):  # also after a sentence of preamble ("Here is my answer: ```json ...")
        try:
            value = extract_json(stripped)
        except SchemaError:
            if find_selection(stripped, persona_ids=persona_ids, strict=True).marker is None:
                raise
    if isinstance(value, dict):
        choice_key = next((k for k in _JSON_CHOICE_KEYS if k in value), None)
        if choice_key is None:
            raise SchemaError(f"missing field 'selection' (one of {persona_ids})")
        choice = value[choice_key]
        if isinstance(choice, dict):
            choice = choice.get("persona_id") or choice.get("ID") or json.dumps(choice)
        reasoning = str(value.get("reasoning") or value.get("reason") or "").strip()
        index = _resolve_choice(str(choice), persona_ids)
    else:
        found = find_selection(stripped, persona_ids=persona_ids, strict=True)
        if found.marker is None:
            raise SchemaError('no "Selection:" found; end with "Selection: <persona id>" or answer in JSON')
        index = _checked_index(found.persona_id, found.choice, persona_ids)
        reasoning = stripped[: found.marker[0]].strip()
    reasoning = re.sub(r"^(?:[*_#\s]*(?:reasoning|explanation)?[*_\s]*[:\-]?)", "", reasoning, flags=re.I).strip()
    reasoning = reasoning.strip("* \n")
    if not reasoning:
        raise SchemaError("the reasoning is empty; give 2-3 sentences of reasoning before the selection")
    return {"selected_persona_id": persona_ids[index - 1], "selected_index": index, "reasoning": reasoning}


def selection_requests(reviews: Iterable[dict[str, Any]], exclude_review_ids: Collection[str] = (),
                       history_size: int = 10, targets_per_user: int = 1) -> list[dict[str, Any]]:
    """Judge requests from training reviews: per user, the last ``targets_per_user`` interactions as targets,
    each with the ``history_size`` interactions before it (oldest first)."""
    excluded = set(exclude_review_ids)
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in reviews:
        if r["review_id"] not in excluded:
            by_user[r["user_id"]].append(r)
    requests = []
    for user_id, rs in sorted(by_user.items()):
        rs.sort(key=lambda r: (r["timestamp"], r["review_id"]))
        for t in range(max(1, len(rs) - targets_per_user), len(rs)):
            history = rs[max(0, t - history_size): t]
            requests.append({"user_id": user_id, "target_item_id": rs[t]["item_id"],
                             "target_review_id": rs[t]["review_id"],
                             "history": [{"item_id": h["item_id"], "rating": h["rating"],
                                          "review_id": h["review_id"]} for h in history]})
    return requests


def selection_tasks(requests: Iterable[dict[str, Any]], persona_records: Iterable[dict[str, Any]],
                    prompts: PromptSet, summaries: dict[str, str] | None = None,
                    items: dict[str, dict[str, Any]] | None = None, like_threshold: float = 4.0,
                    aspect_records: Iterable[dict[str, Any]] | None = None) -> list[Task]:
    """One task per request; history ratings >= ``like_threshold`` count as liked.

    With ``aspect_records`` (the aspects stage's output), each history item shows what the user's
    own review of it valued, so the judge can tell why they liked or disliked it.

    A request whose target item has no valid personas (its persona record failed or is missing)
    becomes a task that is recorded as failed without a call, so the run counts it and exits
    non-zero instead of silently judging fewer users.
    """
    persona_records = list(persona_records)
    personas_by_item = {r["item_id"]: r["personas"] for r in persona_records if r.get("status") == "ok"}
    failed_items = {r["item_id"] for r in persona_records if r.get("status") == "failed"}
    summaries = summaries or {}
    items = items or {}
    fields = aspect_fields(prompts)
    own_aspects = {r["review_id"]: r.get("aspects") for r in aspect_records or () if r.get("status") == "ok"}

    def describe(entry: dict[str, Any]) -> str:
        item_id, rating = entry["item_id"], entry["rating"]
        title = items.get(item_id, {}).get("title") or item_id
        summary = summaries.get(item_id, "")
        line = f"- {title} ({rating:g}/5)" + (f": {summary}" if summary else "")
        valued = _aspect_text(own_aspects.get(entry.get("review_id", "")), fields)
        return line + (f"\n  Their review valued: {valued}" if valued else "")

    tasks = []
    for req in requests:
        personas = personas_by_item.get(req["target_item_id"])
        if not personas:
            target = req["target_item_id"]
            why = "its persona record failed" if target in failed_items else "it has no persona record"
            tasks.append(Task(f"{req['user_id']}|{target}", [], None, _never_called,
                              {"user_id": req["user_id"], "target_item_id": target,
                               "history_item_ids": [h["item_id"] for h in req["history"]]},
                              fail_reason=f"target item {target} has no personas ({why}); rerun the personas "
                                          "stage for it, then this stage with --retry-failed"))
            continue
        liked = [describe(h) for h in req["history"] if h["rating"] >= like_threshold]
        disliked = [describe(h) for h in req["history"] if h["rating"] < like_threshold]
        ids = [p["persona_id"] for p in personas]
        persona_list = "\n".join(f"{p['persona_id']}: {p['Name']}. {p['Description']} {p['Preference_Rationale']}"
                                 for p in personas)
        target = req["target_item_id"]
        messages = prompts.render("selection", liked="\n".join(liked) or "(none)",
                                  disliked="\n".join(disliked) or "(none)",
                                  target_title=items.get(target, {}).get("title") or target,
                                  target_summary=summaries.get(target, ""), persona_list=persona_list,
                                  example_id=ids[0])
        key = f"{req['user_id']}|{target}"
        meta = {"user_id": req["user_id"], "target_item_id": target,
                "history_item_ids": [h["item_id"] for h in req["history"]],
                "review_ids": [h["review_id"] for h in req["history"] if "review_id" in h]
                + ([req["target_review_id"]] if "target_review_id" in req else [])}
        # The enum lets grammar-constrained servers (and OpenAI structured outputs) emit only valid ids.
        schema = json.loads(json.dumps(SELECTION_SCHEMA))
        schema["properties"]["selection"]["enum"] = ids
        tasks.append(Task(key, messages, schema, lambda text, ids=ids: parse_selection(text, ids), meta))
    return tasks


def _never_called(text: str) -> dict[str, Any]:
    raise SchemaError("this task has no prompt")


# ---------------------------------------------------------------- running

def ok_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("status") == "ok"]


def summaries_from_records(records: Iterable[dict[str, Any]]) -> dict[str, str]:
    """item id -> summary, from the summary stage's output records."""
    return {r["item_id"]: r["summary"] for r in ok_records(records)}


async def run_tasks(tasks: list[Task], config: ClientConfig, output: str | Path, stage: str, prompts: PromptSet,
                    cache_path: str | Path | None = None, progress: bool = False,
                    retry_failed: bool = False, deadline_s: float | None = None, mode: str = "online",
                    batch_options: dict[str, Any] | None = None) -> RunSummary:
    """Run ``tasks`` against the endpoint of ``config``, appending records to ``output``.

    ``mode="batch"`` sends the calls through the OpenAI Batch API (:mod:`.batch`), keeping its
    state next to the output (``<output>.batch.json``) so that a rerun resumes the batch in flight;
    ``batch_options`` go to :class:`~persona4rec.llm.batch.BatchClient` (``poll_initial_s``, ...).
    """
    if mode not in ("online", "batch"):
        raise ValueError(f"mode must be 'online' or 'batch', got {mode!r}")
    if mode == "batch":
        from .batch import BatchClient

        output = Path(output)
        async with BatchClient(config, output.with_name(output.name + ".batch.json"),
                               **(batch_options or {})) as batch_client:
            runner = JobRunner(batch_client, stage, prompts.tag, prompts.fingerprint,  # type: ignore[arg-type]
                               Path(cache_path) if cache_path else None, progress, deadline_s=deadline_s,
                               stage_fingerprint=prompts.stage_fingerprint(stage), mode="batch")
            return await runner.run(tasks, output, retry_failed=retry_failed)
    async with ChatClient(config) as client:
        runner = JobRunner(client, stage, prompts.tag, prompts.fingerprint,
                           Path(cache_path) if cache_path else None, progress, deadline_s=deadline_s,
                           stage_fingerprint=prompts.stage_fingerprint(stage))
        return await runner.run(tasks, Path(output), retry_failed=retry_failed)
