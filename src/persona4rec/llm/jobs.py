"""Resumable, cached execution of many LLM calls into one JSON-lines file.

Guarantees (tested in tests/test_llm_jobs.py):

* one record per task key: each finished task is appended as one line and flushed
  at once, so a process killed at any point loses at most the calls in flight;
  on restart the keys already in the output are skipped, and a torn last line
  (the kill landed mid-write) is cut off before anything new is appended;
* nothing paid twice: every answered call is appended to a content-hash cache
  (model, messages, sampling parameters, schema, prompt version), so rerunning a
  task, or a task whose answer was received but whose record was not yet written,
  is served from the cache;
* an answer that fails parsing or its schema gets one repair turn that quotes the
  error; if that fails too the task is recorded with ``status: "failed"``, the
  error and the raw answers, and is not retried on resume unless asked;
* transient errors that outlast the client's retries leave the task pending (no
  record): the run reports them and exits non-zero, and a rerun picks them up;
* a fatal endpoint error (bad key, exhausted quota) cancels the calls in flight at
  once (their tasks stay pending) and the exception carries the run's summary, so
  the tokens and cost spent so far are still reported; an optional wall deadline
  for the whole run stops it the same way, without the error.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .client import ChatClient, ChatResult, FatalLLMError, LLMError, RequestRejected
from .schemas import SchemaError

RECORD_VERSION = 1


@dataclass
class Task:
    """One unit of LLM work: its key in the output, its prompt, and how to read the answer.

    ``parse`` turns the answer text into the stage's output fields or raises
    :class:`~persona4rec.llm.schemas.SchemaError` with a message fit for the repair turn.
    ``meta`` is copied into the record as is (ids, review ids used, ...).
    """

    key: str
    messages: list[dict[str, str]]
    schema: dict[str, Any] | None
    parse: Callable[[str], dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    # Set when the task cannot be run at all (e.g. a judge request whose target item has no personas):
    # it is recorded as failed with this reason, without a call, so it is counted and never silently lost.
    fail_reason: str | None = None


@dataclass
class RunSummary:
    """Counts and token totals of one run (``cached`` tokens were not paid again)."""

    stage: str
    total: int = 0
    already_done: int = 0
    done: int = 0
    cached: int = 0
    retried: int = 0
    failed: int = 0
    pending: int = 0
    failed_total: int = 0  # failed records of these tasks in the output after the run (earlier runs included)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    # Answers without a usage block: their tokens (included above) are estimated at ~4 characters per token.
    usage_estimated_calls: int = 0
    estimated_prompt_tokens: int = 0
    estimated_completion_tokens: int = 0
    stopped: str | None = None  # why the run ended early: "fatal: ..." or "deadline"
    mode: str = "online"  # "batch": tokens are billed at the Batch API's prices
    response_format_fallback: str | None = None  # e.g. "json_schema -> json_object" when the server refused one
    pending_errors: list[str] = field(default_factory=list)

    # The OpenAI Batch API bills half the online price unless --prices says otherwise.
    BATCH_DISCOUNT = 0.5

    @property
    def failed_fraction(self) -> float:
        return self.failed_total / self.total if self.total else 0.0

    def exit_status(self, max_failed_fraction: float = 0.0) -> int:
        """0: every task has an ok record (or failures within ``max_failed_fraction``); 1: tasks still
        pending (rerun the same command); 3: more failed records than allowed. (2, bad input or a fatal
        endpoint error, is decided by the caller.)"""
        if self.pending:
            return 1
        if self.failed_total and self.failed_fraction > max_failed_fraction:
            return 3
        return 0

    def cost(self, prices: dict[str, float] | None) -> float | None:
        """Estimated cost of the tokens paid in this run, from USD per million prompt/completion tokens.

        In batch mode ``batch_prompt``/``batch_completion`` prices are used when given, else half of
        ``prompt``/``completion`` (the Batch API's discount)."""
        if not prices:
            return None
        if self.mode == "batch":
            prompt = prices.get("batch_prompt", prices.get("prompt", 0.0) * self.BATCH_DISCOUNT)
            completion = prices.get("batch_completion", prices.get("completion", 0.0) * self.BATCH_DISCOUNT)
        else:
            prompt, completion = prices.get("prompt", 0.0), prices.get("completion", 0.0)
        return (self.prompt_tokens * prompt + self.completion_tokens * completion) / 1e6

    def as_dict(self, prices: dict[str, float] | None = None) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "pending_errors"}
        data["pending_errors"] = self.pending_errors[:10]
        data["failed_fraction"] = round(self.failed_fraction, 6)
        if prices:
            data["estimated_cost_usd"] = round(self.cost(prices) or 0.0, 6)
        return data

    def format(self, prices: dict[str, float] | None = None) -> str:
        lines = [
            f"{self.stage}: {self.total} tasks, {self.already_done} already in the output; this run: "
            f"{self.done} done ({self.cached} from cache), {self.retried} retried, {self.failed} failed, "
            f"{self.pending} still pending",
            f"tokens paid{' (batch)' if self.mode == 'batch' else ''}: prompt {self.prompt_tokens}, completion "
            f"{self.completion_tokens}; served from cache: prompt {self.cached_prompt_tokens}, completion "
            f"{self.cached_completion_tokens}",
        ]
        if self.response_format_fallback:
            lines.append(f"the server refused the requested response_format; requests fell back "
                         f"({self.response_format_fallback}); answers were still validated against the schema")
        if self.usage_estimated_calls:
            lines.append(f"{self.usage_estimated_calls} answers came without a usage block: {self.estimated_prompt_tokens} "
                         f"prompt and {self.estimated_completion_tokens} completion tokens of the totals are estimates "
                         "(4 characters per token)")
        cost = self.cost(prices)
        if cost is not None:
            lines.append(f"estimated cost: ${cost:.4f}" + (" at batch prices" if self.mode == "batch" else ""))
        if self.stopped == "deadline":
            lines.append("stopped at the run's deadline; rerun the same command to finish the pending tasks")
        elif self.stopped:
            lines.append(f"stopped early ({self.stopped}); calls in flight were cancelled, their tasks are pending")
        if self.failed_total:
            lines.append(f"failed records: {self.failed_total} of {self.total} ({100 * self.failed_fraction:.1f}%); "
                         "see their `error` field, fix the cause and rerun with --retry-failed")
        if self.pending and self.pending_errors:
            lines.append("pending tasks hit transient errors; rerun the same command to finish them. First errors:")
            lines += [f"  {e}" for e in self.pending_errors[:5]]
        return "\n".join(lines)


def cache_key(model: str, messages: list[dict[str, str]], params: dict[str, Any],
              schema: dict[str, Any] | None, prompt_version: str) -> str:
    """Content hash identifying one call: same inputs, same answer (at temperature 0), never paid twice."""
    blob = json.dumps([model, messages, params, schema, prompt_version], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class JsonlAppender:
    """Append-only JSON lines with a flush per record; cuts a torn last line on open."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_torn_tail(path)
        self._file: TextIO = open(path, "a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _truncate_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (gzip if the name ends in .gz), skipping a torn last line."""
    import gzip

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # torn by a kill mid-write; the task is simply redone
                break
            raise ValueError(f"{path}:{number}: not a JSON line; fix or remove that line and rerun") from None
    return records


class ResponseCache:
    """Answered calls keyed by :func:`cache_key`, persisted as append-only JSON lines."""

    def __init__(self, path: Path | None, readonly: bool = False):
        self._entries: dict[str, dict[str, Any]] = {}
        self._out: JsonlAppender | None = None
        if path is not None:
            if path.exists():
                for entry in read_jsonl(path):
                    self._entries[entry["key"]] = entry
            if not readonly:
                self._out = JsonlAppender(path)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def put(self, key: str, result: ChatResult) -> None:
        entry = {"key": key, "text": result.text, "prompt_tokens": result.prompt_tokens,
                 "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason}
        if result.usage_estimated:
            entry["usage_estimated"] = True
        self._entries[key] = entry
        if self._out is not None:
            self._out.append(entry)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


def load_finished(path: Path, retry_failed: bool) -> set[str]:
    """Keys already recorded in ``path``; with ``retry_failed`` the failed records are dropped first.

    Dropping rewrites the file atomically (temp file + rename), so a kill during it loses nothing.
    """
    return set(load_statuses(path, retry_failed))


def load_statuses(path: Path, retry_failed: bool) -> dict[str, str]:
    """Key -> status of the records in ``path`` (see :func:`load_finished`)."""
    if not path.exists():
        return {}
    records = read_jsonl(path)
    if retry_failed and any(r.get("status") == "failed" for r in records):
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                if r.get("status") != "failed":
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        records = [r for r in records if r.get("status") != "failed"]
    return {r["key"]: r.get("status", "ok") for r in records}


class JobRunner:
    """Runs :class:`Task` lists through a :class:`ChatClient` into a resumable JSON-lines file."""

    def __init__(self, client: ChatClient, stage: str, prompt_version: str, prompt_fingerprint: str = "",
                 cache_path: Path | None = None, progress: bool = True, deadline_s: float | None = None,
                 stage_fingerprint: str | None = None, mode: str = "online"):
        self.client = client
        self.stage = stage
        self.prompt_version = prompt_version
        self.prompt_fingerprint = prompt_fingerprint
        self.cache_path = cache_path
        self.progress = progress
        self.deadline_s = deadline_s  # wall-clock limit of the whole run; None: no limit
        # What besides the request itself keys the cache: the stage's own prompt fingerprint, so that a new
        # prompt version invalidates only the stages whose templates changed (default: the version tag).
        self.stage_fingerprint = stage_fingerprint
        self.cache_scope = f"{stage}:{stage_fingerprint}" if stage_fingerprint else prompt_version
        self.mode = mode

    def _key(self, messages: list[dict[str, str]], schema: dict[str, Any] | None) -> str:
        cfg = self.client.config
        return cache_key(cfg.model, messages, cfg.sampling_params(), schema, self.cache_scope)

    def plan(self, tasks: Iterable[Task], output: Path, retry_failed: bool = False) -> tuple[list[Task], int, int]:
        """(pending tasks, how many are already recorded, how many pending ones the cache would answer)."""
        finished = load_finished(output, retry_failed=False) if not retry_failed else _unfailed_keys(output)
        tasks = list(tasks)
        pending = [t for t in tasks if t.key not in finished]
        cache = ResponseCache(self.cache_path, readonly=True)
        cached = sum(self._key(t.messages, t.schema) in cache for t in pending)
        return pending, len(tasks) - len(pending), cached

    async def run(self, tasks: Iterable[Task], output: Path, retry_failed: bool = False) -> RunSummary:
        """Run every task not yet recorded in ``output``; returns the run's :class:`RunSummary`.

        Raises :class:`FatalLLMError` (after stopping the workers) when the endpoint rejects the run
        as a whole; everything finished before that stays in ``output``.
        """
        tasks = list(tasks)
        keys = [t.key for t in tasks]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{self.stage}: task keys must be unique")
        statuses = load_statuses(output, retry_failed)
        pending = [t for t in tasks if t.key not in statuses]
        summary = RunSummary(self.stage, total=len(tasks), already_done=len(tasks) - len(pending), mode=self.mode)
        task_keys = set(keys)
        summary.failed_total = sum(status == "failed" for key, status in statuses.items() if key in task_keys)
        if not pending:
            return summary
        out = JsonlAppender(output)
        cache = ResponseCache(self.cache_path)
        queue: asyncio.Queue[Task] = asyncio.Queue()
        for t in pending:
            queue.put_nowait(t)
        bar = _progress_bar(len(pending), self.stage, self.progress)
        fatal: list[FatalLLMError] = []
        workers: list[asyncio.Task[None]] = []

        async def worker() -> None:
            while not fatal:
                try:
                    task = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    record = await self._run_task(task, cache, summary)
                except FatalLLMError as exc:
                    fatal.append(exc)
                    # Stop now: every other call in flight would cost money or time for nothing.
                    me = asyncio.current_task()
                    for w in workers:
                        if w is not me:
                            w.cancel()
                    return
                except LLMError as exc:  # transient errors outlasted the retries: leave it pending
                    summary.pending += 1
                    summary.retried += len(exc.attempts) > 1
                    summary.pending_errors.append(f"{task.key}: {exc}")
                else:
                    out.append(record)
                    summary.done += 1
                    summary.failed += record["status"] == "failed"
                    summary.failed_total += record["status"] == "failed"
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(done=summary.done, cached=summary.cached, retried=summary.retried,
                                    failed=summary.failed, refresh=False)

        workers += [asyncio.create_task(worker()) for _ in range(self._workers(len(pending)))]
        try:
            _, unfinished = await asyncio.wait(workers, timeout=self.deadline_s)
            if unfinished:
                summary.stopped = "deadline"
                for w in unfinished:
                    w.cancel()
                await asyncio.wait(unfinished)
        finally:
            for w in workers:
                w.cancel()
            if bar is not None:
                bar.close()
            out.close()
            cache.close()
        used = getattr(self.client, "response_format", None)
        if used is not None and used != self.client.config.response_format:
            summary.response_format_fallback = f"{self.client.config.response_format} -> {used}"
        if fatal or summary.stopped:
            summary.pending = len(pending) - summary.done  # the cancelled ones and those never started
        if fatal:
            summary.stopped = f"fatal: {fatal[0]}"
            fatal[0].summary = summary  # type: ignore[attr-defined]
            raise fatal[0]
        return summary

    def _workers(self, pending: int) -> int:
        # Batch mode: every task is in flight at once (its calls wait for the next batch), so that one
        # batch carries every first turn and the next one every repair turn.
        return pending if self.mode == "batch" else min(self.client.config.concurrency, pending)

    async def _call(self, messages: list[dict[str, str]], schema: dict[str, Any] | None, cache: ResponseCache,
                    usage: dict[str, Any], summary: RunSummary) -> str:
        key = self._key(messages, schema)
        hit = cache.get(key)
        if hit is not None:
            usage["cached_calls"] += 1
            usage["prompt_tokens"] += hit["prompt_tokens"]
            usage["completion_tokens"] += hit["completion_tokens"]
            usage["estimated"] |= bool(hit.get("usage_estimated"))
            return hit["text"]
        try:
            result = await self.client.complete(messages, schema, self.stage)
        except LLMError as exc:
            usage["attempts"] += exc.attempts
            raise
        usage["attempts"] += result.attempts
        usage["prompt_tokens"] += result.prompt_tokens
        usage["completion_tokens"] += result.completion_tokens
        usage["paid_prompt_tokens"] += result.prompt_tokens
        usage["paid_completion_tokens"] += result.completion_tokens
        # Counted as soon as paid: a run stopped while this task's repair turn is in flight still reports it.
        summary.prompt_tokens += result.prompt_tokens
        summary.completion_tokens += result.completion_tokens
        if result.usage_estimated:
            usage["estimated"] = True
            summary.usage_estimated_calls += 1
            summary.estimated_prompt_tokens += result.prompt_tokens
            summary.estimated_completion_tokens += result.completion_tokens
        cache.put(key, result)
        return result.text

    async def _run_task(self, task: Task, cache: ResponseCache, summary: RunSummary) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": 0, "completion_tokens": 0, "paid_prompt_tokens": 0,
                                 "paid_completion_tokens": 0, "cached_calls": 0, "attempts": [], "estimated": False}
        raw_texts: list[str] = []
        errors: list[str] = [task.fail_reason] if task.fail_reason else []
        output: dict[str, Any] | None = None
        messages = task.messages
        try:
            for turn in range(0 if task.fail_reason else 2):  # the first answer, then at most one repair turn
                text = await self._call(messages, task.schema, cache, usage, summary)
                raw_texts.append(text)
                try:
                    output = task.parse(text)
                    break
                except SchemaError as exc:
                    errors.append(str(exc))
                    messages = task.messages + [
                        {"role": "assistant", "content": text},
                        {"role": "user", "content": f"That answer cannot be used: {exc}. Reply again with only "
                                                    "the corrected JSON object in the requested shape."},
                    ]
        except RequestRejected as exc:
            errors.append(str(exc))
        calls = len(raw_texts)
        from_cache = calls > 0 and usage["cached_calls"] == calls
        summary.cached += from_cache
        summary.retried += len(usage["attempts"]) > calls
        summary.cached_prompt_tokens += usage["prompt_tokens"] - usage["paid_prompt_tokens"]
        summary.cached_completion_tokens += usage["completion_tokens"] - usage["paid_completion_tokens"]
        record: dict[str, Any] = {
            "key": task.key,
            "stage": self.stage,
            **task.meta,
            "status": "ok" if output is not None else "failed",
            **(output or {}),
            "model": self.client.config.model,
            "prompt_version": self.prompt_version,
            "prompt_fingerprint": self.prompt_fingerprint,
            **({"stage_prompt_fingerprint": self.stage_fingerprint} if self.stage_fingerprint else {}),
            "record_version": RECORD_VERSION,
            "usage": {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                      **({"estimated": True} if usage["estimated"] else {})},
            "calls": calls,
            "repaired": output is not None and calls == 2,
            "cached": from_cache,
            "attempts": usage["attempts"],
        }
        if output is None:
            record["error"] = errors[-1] if errors else "no answer"
            record["errors"] = errors
            record["raw_text"] = raw_texts
        return record


def _unfailed_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {r["key"] for r in read_jsonl(path) if r.get("status") != "failed"}


def _progress_bar(total: int, stage: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # Redirected to a log (CI), redraw rarely so the log stays readable.
    return tqdm(total=total, desc=stage, unit="call", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 10.0)
