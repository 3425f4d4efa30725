"""The OpenAI Batch API as a drop-in for :class:`~persona4rec.llm.client.ChatClient` (``--mode batch``).

A :class:`BatchClient` has the client's ``complete(messages, schema, name)`` and ``config``,
so :class:`~persona4rec.llm.jobs.JobRunner` runs unchanged on top of it: same tasks, same
parsers and repair turns, same records and the same content-hash cache entries as the
online mode. Only the transport differs. Each task's call waits on a future; when every
task is waiting (or done), the pending requests go out as one batch:

1. the requests are written as JSON lines (``custom_id``, ``method``, ``url``, ``body``)
   and uploaded to ``POST /files`` (purpose ``batch``);
2. ``POST /batches`` creates the batch (``completion_window`` 24h), and its id is written
   to a state file (``<out>.batch.json``) before anything else happens;
3. ``GET /batches/{id}`` is polled with a growing interval (``poll_initial_s`` times 1.5
   per poll, at most ``poll_max_s``) until the batch is completed, expired, failed or
   cancelled;
4. the output file (answers) and the error file (failed lines) are downloaded; each
   answer resolves its waiting calls. Failed lines follow the online retry policy: 5xx,
   408, 409, 429 and errors without a response (``batch_expired``) are sent again in the
   next batch, at most ``max_retries`` times; 400/413/422 reject that call; 401/403/404
   and an exhausted quota stop the run.

Repair turns go out in the next batch. A run killed while a batch is in flight resumes
from the state file: the next run polls that batch instead of submitting its requests
again, so nothing is paid twice (the only window is between ``POST /batches`` answering
and the state file being written). Tokens are counted from each answer's usage like the
online mode; the run summary prices them at batch rates (see
:meth:`~persona4rec.llm.jobs.RunSummary.cost`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .client import (
    FATAL_STATUS,
    RETRYABLE_STATUS,
    ChatResult,
    ClientConfig,
    FatalLLMError,
    LLMError,
    RequestRejected,
    RetriesExhausted,
    _short,
    build_chat_body,
    is_quota_exhausted,
    read_usage,
)

FINAL_STATES = frozenset({"completed", "expired", "failed", "cancelled"})
CHAT_ENDPOINT = "/v1/chat/completions"
# OpenAI's limits per batch: 50,000 requests and a 200 MB input file; larger rounds are split.
MAX_BATCH_REQUESTS = 50_000
MAX_BATCH_BYTES = 190 * 1024 * 1024


@dataclass
class _Request:
    body: dict[str, Any]
    messages: list[dict[str, str]]
    futures: list[asyncio.Future[ChatResult]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    failures: int = 0


class BatchClient:
    """Sends chat completions through the Batch API; use as ``async with BatchClient(config, state) as c``."""

    def __init__(self, config: ClientConfig, state_path: str | Path, poll_initial_s: float = 10.0,
                 poll_max_s: float = 300.0, completion_window: str = "24h",
                 transport: httpx.AsyncBaseTransport | None = None, max_batch_requests: int = MAX_BATCH_REQUESTS,
                 max_batch_bytes: int = MAX_BATCH_BYTES):
        self.config = config
        self.state_path = Path(state_path)
        self.poll_initial_s = poll_initial_s
        self.poll_max_s = poll_max_s
        self.completion_window = completion_window
        self.max_batch_requests = max_batch_requests
        self.max_batch_bytes = max_batch_bytes
        self.response_format = config.response_format
        api_key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=config.base_url.rstrip("/") + "/", headers=headers,
                                       timeout=config.timeout_s, transport=transport)
        self._waiting: dict[str, _Request] = {}
        self._ready: dict[str, ChatResult] = {}  # answers of a resumed batch that no call has asked for yet
        self._calls = 0  # bumped on every call and answer: the coordinator waits until it stops moving
        self._wake = asyncio.Event()
        self._coordinator: asyncio.Task[None] | None = None
        self.batches_created = 0

    def __repr__(self) -> str:
        return f"BatchClient(url={self.config.base_url!r}, model={self.config.model!r})"

    async def __aenter__(self) -> BatchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._coordinator is not None:
            self._coordinator.cancel()
            try:
                await self._coordinator
            except (asyncio.CancelledError, Exception):
                pass
        await self._http.aclose()

    # ------------------------------------------------------------ the ChatClient interface

    async def complete(self, messages: list[dict[str, str]], schema: dict[str, Any] | None = None,
                       schema_name: str = "answer") -> ChatResult:
        """Queue one chat completion for the next batch and wait for its answer."""
        body = build_chat_body(self.config, messages, schema, schema_name, self.response_format)
        custom_id = request_id(body)
        self._calls += 1
        if custom_id in self._ready:
            return self._ready.pop(custom_id)
        future: asyncio.Future[ChatResult] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(custom_id, _Request(body, messages)).futures.append(future)
        if self._coordinator is None or self._coordinator.done():
            self._coordinator = asyncio.create_task(self._coordinate())
        self._wake.set()
        return await future

    # ------------------------------------------------------------ rounds

    async def _coordinate(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                await self._quiesce()
                if not self._waiting:
                    continue
                await self._round()
                if self._waiting:
                    self._wake.set()
        except FatalLLMError as exc:
            self._fail_all(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must reach the callers, not hang them
            self._fail_all(LLMError(f"batch mode failed: {type(exc).__name__}: {exc}"))

    async def _quiesce(self) -> None:
        """Yield until no task makes progress: every caller is waiting on an answer or finished."""
        last, stable = -1, 0
        while stable < 3:
            await asyncio.sleep(0)
            if self._calls == last:
                stable += 1
            else:
                last, stable = self._calls, 0

    async def _round(self) -> None:
        state = self._load_state()
        in_flight = [b for b in state["batches"] if not b.get("done")]  # left by a killed run: resume them
        if not in_flight:
            for chunk in self._chunks():
                batch_id = await self._submit(chunk)
                batch = {"id": batch_id, "custom_ids": [cid for cid, _ in chunk], "created": time.time()}
                state["batches"].append(batch)
                in_flight.append(batch)
                self._save_state(state)
        for batch in in_flight:
            result = await self._wait_for(batch["id"])
            batch["done"] = True  # read once: even a fatal line below must not make every rerun read it again
            batch["status"] = result.get("status")
            try:
                batch["answered"] = await self._collect(result, set(batch["custom_ids"]))
            finally:
                self._save_state(state)

    def _chunks(self) -> list[list[tuple[str, bytes]]]:
        """The waiting requests as JSONL lines, split to the Batch API's limits per batch."""
        chunks: list[list[tuple[str, bytes]]] = [[]]
        size = 0
        for cid, request in self._waiting.items():
            line = (json.dumps({"custom_id": cid, "method": "POST", "url": CHAT_ENDPOINT, "body": request.body},
                               ensure_ascii=False) + "\n").encode()
            if chunks[-1] and (len(chunks[-1]) >= self.max_batch_requests or size + len(line) > self.max_batch_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append((cid, line))
            size += len(line)
        return chunks

    async def _submit(self, chunk: list[tuple[str, bytes]]) -> str:
        lines = b"".join(line for _, line in chunk)
        uploaded = await self._api("POST", "files", data={"purpose": "batch"},
                                   files={"file": ("requests.jsonl", lines, "application/jsonl")})
        created = await self._api("POST", "batches", json={"input_file_id": uploaded["id"], "endpoint": CHAT_ENDPOINT,
                                                           "completion_window": self.completion_window})
        self.batches_created += 1
        return str(created["id"])

    async def _wait_for(self, batch_id: str) -> dict[str, Any]:
        interval = self.poll_initial_s
        while True:
            batch = await self._api("GET", f"batches/{batch_id}")
            if batch.get("status") in FINAL_STATES:
                return batch
            await asyncio.sleep(interval)
            interval = min(self.poll_max_s, interval * 1.5)

    async def _collect(self, batch: dict[str, Any], submitted: set[str]) -> int:
        """Resolve the calls answered by ``batch``; re-queue, reject or stop on the failed lines."""
        batch_id = batch["id"]
        seen: set[str] = set()
        answered = 0
        for line in await self._download(batch.get("output_file_id")):
            cid = line.get("custom_id")
            seen.add(cid)
            response = line.get("response") or {}
            if response.get("status_code") == 200 and self._answer(cid, response.get("body") or {}, batch_id):
                answered += 1
            else:
                self._line_failed(cid, response, line.get("error"), batch_id)
        for line in await self._download(batch.get("error_file_id")):
            cid = line.get("custom_id")
            seen.add(cid)
            self._line_failed(cid, line.get("response") or {}, line.get("error"), batch_id)
        for cid in submitted - seen:  # a failed or cancelled batch lists nothing: every line goes again
            errors = (batch.get("errors") or {}).get("data") or []
            why = errors[0].get("message") if errors else f"batch {batch.get('status')}"
            self._line_failed(cid, {}, {"code": batch.get("status"), "message": why}, batch_id)
        return answered

    def _answer(self, cid: str, body: dict[str, Any], batch_id: str) -> bool:
        request = self._waiting.get(cid)
        try:
            choice = body["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            return False
        messages = request.messages if request is not None else []
        prompt, completion, estimated = read_usage(body.get("usage"), messages, text)
        attempt: dict[str, Any] = {"attempt": 1, "status": 200, "batch_id": batch_id,
                                   "prompt_tokens": prompt, "completion_tokens": completion}
        if estimated:
            attempt["usage_estimated"] = True
        if request is None:  # answered by a batch submitted before a restart; no call is waiting yet
            self._ready[cid] = ChatResult(text, prompt, completion, choice.get("finish_reason"), [attempt], estimated)
            return True
        del self._waiting[cid]
        attempt["attempt"] = len(request.attempts) + 1
        attempts = request.attempts + [attempt]
        for future in request.futures:
            if not future.done():
                future.set_result(ChatResult(text, prompt, completion, choice.get("finish_reason"), list(attempts),
                                             estimated))
        self._calls += 1
        return True

    def _line_failed(self, cid: str, response: dict[str, Any], error: dict[str, Any] | None, batch_id: str) -> None:
        request = self._waiting.get(cid)
        if request is None:
            return
        status = response.get("status_code")
        text = json.dumps(response.get("body") or error or {})
        request.attempts.append({"attempt": len(request.attempts) + 1, "batch_id": batch_id,
                                 **({"status": status} if status else {}), "error": _short(text)})
        if status == 429 and is_quota_exhausted(text) or status in FATAL_STATUS:
            raise FatalLLMError(f"batch line answered HTTP {status}: {_short(text)}; fix the key, model or quota "
                                "and rerun (finished records are kept)", request.attempts)
        if status is not None and status != 200 and status not in RETRYABLE_STATUS:
            self._settle(cid, RequestRejected(f"HTTP {status}: {_short(text)}", list(request.attempts)))
            return
        request.failures += 1
        if request.failures > self.config.max_retries:
            self._settle(cid, RetriesExhausted(f"gave up after {request.failures} batches; last error: "
                                               f"{_short(text)}", list(request.attempts)))

    def _settle(self, cid: str, exc: LLMError) -> None:
        request = self._waiting.pop(cid)
        for future in request.futures:
            if not future.done():
                future.set_exception(exc)
        self._calls += 1

    def _fail_all(self, exc: LLMError) -> None:
        for cid in list(self._waiting):
            self._settle(cid, exc)

    # ------------------------------------------------------------ HTTP and state

    async def _download(self, file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        response = await self._send("GET", f"files/{file_id}/content")
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]

    async def _api(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = await self._send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise LLMError(f"{method} {path}: answer is not JSON: {_short(response.text)}") from None

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One Batch API call with the online retry policy (transient errors retried, fatal ones raised)."""
        last = ""
        for attempt in range(self.config.max_retries + 1):
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    response = await self._http.request(method, path, **kwargs)
            except (httpx.TransportError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 300:
                    return response
                text = response.text
                last = f"HTTP {response.status_code}: {_short(text)}"
                if response.status_code in FATAL_STATUS or (response.status_code == 429 and is_quota_exhausted(text)):
                    raise FatalLLMError(f"{method} {path}: {last}; check the key, --base-url and quota")
                if response.status_code not in RETRYABLE_STATUS:
                    raise FatalLLMError(f"{method} {path} was refused: {last}")
            await asyncio.sleep(min(self.config.backoff_cap_s, self.config.backoff_base_s * 2**attempt))
        raise FatalLLMError(f"{method} {path} kept failing ({last}); rerun later to resume")

    def _load_state(self) -> dict[str, Any]:
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            if state.get("model") == self.config.model:
                return state
        return {"model": self.config.model, "batches": []}

    def _save_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
        os.replace(tmp, self.state_path)


def request_id(body: dict[str, Any]) -> str:
    """The ``custom_id`` of a request: a hash of its body, so the same call is one line in a batch."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]
