"""Async client for OpenAI-compatible ``/chat/completions`` endpoints, on httpx.

Works with OpenAI, vLLM, llama.cpp's server (and llama-cpp-python's), and Ollama's
OpenAI endpoint. This is the only retry layer of the package: callers get either a
completed answer or an exception that says whether retrying later can help.

Retry policy: 408, 409, 429 and 5xx responses, timeouts and connection errors are
retried with exponential backoff and full jitter, waiting for ``retry-after-ms``
(OpenAI, Azure) or ``Retry-After`` (seconds or an HTTP date) instead when the server
sends one, capped at ``retry_after_cap_s``. 400/401/403/404 (and other 4xx) are never
retried, nor is a 429 whose body says the quota is exhausted: waiting does not fix those.

Deadline: ``timeout_s`` bounds each attempt as a whole (connect, send and every read of
the body), not each read, so a server that trickles its answer or never ends it cannot
hold a worker longer than that.

Structured output: a 400 that names ``response_format`` (a server without JSON-schema
support) downgrades the request format for the rest of the run, json_schema ->
json_object -> none, and the same request is sent again at once; answers are validated
client-side either way.
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib.util
import json
import os
import random
import re
import ssl
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

# httpcore asks `import sniffio` on every request to learn the async library; anyio >= 4.12 no longer
# installs sniffio, so each of those imports failed after a full search of sys.path: about 20% of the
# client's CPU per request under cProfile. A None entry in sys.modules makes the import fail at once
# (documented import behaviour), and httpcore then assumes asyncio, which is what we run on.
if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
    sys.modules["sniffio"] = None  # type: ignore[assignment]

# json_schema: OpenAI structured outputs (also vLLM, Ollama, llama.cpp's server);
# json_object: JSON mode without a schema; json_object_schema: {"type": "json_object", "schema": ...},
# the form llama-cpp-python's server turns into a grammar; none: plain text, validated client-side only.
ResponseFormat = Literal["json_schema", "json_object", "json_object_schema", "none"]
RESPONSE_FORMATS = ("json_schema", "json_object", "json_object_schema", "none")

RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
# Status codes that mean the run is misconfigured: every other request would fail the same way.
FATAL_STATUS = frozenset({401, 403, 404})
_QUOTA_PATTERN = re.compile(r"insufficient_quota|quota[^.]{0,40}(exceed|exhaust)|(exceed|exhaust)[^.]{0,40}quota", re.I)


@dataclass
class ClientConfig:
    """Endpoint, model, sampling and robustness settings of a :class:`ChatClient`.

    ``api_key_env`` names the environment variable holding the key; the key itself
    is read when the client is created, is sent only in the Authorization header
    and never appears in records, logs or ``repr``.
    """

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str | None = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 1024
    seed: int | None = 0
    extra_body: dict[str, Any] = field(default_factory=dict)
    response_format: ResponseFormat = "json_schema"
    timeout_s: float = 120.0  # total per attempt: connect plus every read of the body
    concurrency: int = 8
    max_retries: int = 6
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    retry_after_cap_s: float = 120.0
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.response_format not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be one of {RESPONSE_FORMATS}")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")

    def sampling_params(self) -> dict[str, Any]:
        """The request parameters that change the answer (part of every cache key)."""
        return {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "response_format": self.response_format,
            "extra_body": self.extra_body,
        }


class LLMError(Exception):
    """A request did not produce an answer. ``attempts`` lists what was tried."""

    def __init__(self, message: str, attempts: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.attempts = attempts or []


class RequestRejected(LLMError):
    """The server refused this particular request (400, 413, 422, ...): retrying it cannot help."""


class RetriesExhausted(LLMError):
    """Transient errors persisted through every retry; the request may succeed on a later run."""


class FatalLLMError(LLMError):
    """The run cannot continue (bad key, wrong URL or model, quota exhausted); fix the setting and rerun."""


@dataclass
class ChatResult:
    """One answered chat completion and what it cost."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    attempts: list[dict[str, Any]]
    # True when the server sent no usage block: the token counts are then estimated from characters / 4.
    usage_estimated: bool = False


class RateLimiter:
    """Sliding-window limits on requests and tokens per minute (either may be None)."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None, window_s: float = 60.0):
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self.window_s = window_s
        self._events: deque[list[float]] = deque()  # [timestamp, tokens]
        self._lock = asyncio.Lock()

    @property
    def active(self) -> bool:
        return bool(self.rpm or self.tpm)

    async def acquire(self, estimated_tokens: int) -> list[float] | None:
        """Wait until one more request of ``estimated_tokens`` fits; returns a handle for :meth:`settle`."""
        if not self.active:
            return None
        async with self._lock:  # one waiter at a time keeps the order fair
            while True:
                now = time.monotonic()
                while self._events and now - self._events[0][0] >= self.window_s:
                    self._events.popleft()
                used_tokens = sum(e[1] for e in self._events)
                fits_requests = self.rpm is None or len(self._events) < self.rpm
                # A request larger than the whole budget is let through alone rather than never.
                fits_tokens = self.tpm is None or not self._events or used_tokens + estimated_tokens <= self.tpm
                if fits_requests and fits_tokens:
                    event = [now, float(estimated_tokens)]
                    self._events.append(event)
                    return event
                await asyncio.sleep(max(0.01, self.window_s - (now - self._events[0][0])))

    def settle(self, handle: list[float] | None, actual_tokens: int | None) -> None:
        """Replace the estimate of a finished request by its real token count."""
        if handle is not None and actual_tokens is not None:
            handle[1] = float(actual_tokens)


def retry_after_from_headers(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI, Azure; preferred, finer) or ``Retry-After``."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis.strip()) / 1000.0)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"), now)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def is_quota_exhausted(body: str) -> bool:
    """True when a 429 body says the account's quota is used up (as opposed to a rate limit)."""
    try:
        error = json.loads(body).get("error") or {}
        if isinstance(error, dict) and (error.get("code") == "insufficient_quota" or error.get("type") == "insufficient_quota"):
            return True
    except (ValueError, AttributeError):
        pass
    return bool(_QUOTA_PATTERN.search(body))


def estimate_tokens(messages: list[dict[str, str]], max_tokens: int) -> int:
    """A cheap upper-ish estimate for rate limiting: ~4 characters per token plus the answer budget."""
    return prompt_token_estimate(messages) + max_tokens


def prompt_token_estimate(messages: list[dict[str, str]]) -> int:
    """~4 characters per token (used when a server sends no usage block, and for rate limiting)."""
    return sum(len(m.get("content") or "") for m in messages) // 4


def names_response_format(status: int, body: str) -> bool:
    """True when a 400/422 says the request's ``response_format`` is not supported."""
    return status in (400, 422) and bool(re.search(r"response_format|json_schema|structured output", body, re.I))


FORMAT_FALLBACK: dict[str, str] = {"json_schema": "json_object", "json_object_schema": "json_object",
                                   "json_object": "none"}


class ChatClient:
    """Async OpenAI-compatible chat client with retries, rate limits and a bounded connection pool.

    Use as ``async with ChatClient(config) as client: await client.complete(messages)``.
    """

    def __init__(self, config: ClientConfig, transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        api_key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # One single-connection httpx client per slot, handed out through a queue: the queue bounds the
        # requests in flight to `concurrency` (the connection-pool size), and a pool of one skips httpcore's
        # scan over all pooled connections on every request, which halved client CPU per request at 32.
        self._slots: asyncio.LifoQueue[httpx.AsyncClient] = asyncio.LifoQueue()
        # Loading the CA bundle costs ~50 ms per client: build one TLS context and share it (none for http).
        verify: ssl.SSLContext | bool = False
        if config.base_url.startswith("https"):
            import certifi

            verify = ssl.create_default_context(cafile=certifi.where())
        for _ in range(config.concurrency):
            self._slots.put_nowait(httpx.AsyncClient(
                headers=headers, timeout=httpx.Timeout(config.timeout_s), transport=transport, verify=verify,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)))
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._limiter = RateLimiter(config.requests_per_minute, config.tokens_per_minute)
        # The request format actually sent; lowered for the rest of the run when the server rejects it.
        self.response_format: str = config.response_format

    def __repr__(self) -> str:
        return f"ChatClient(url={self._url!r}, model={self.config.model!r})"

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        while not self._slots.empty():
            await self._slots.get_nowait().aclose()

    def build_body(self, messages: list[dict[str, str]], schema: dict[str, Any] | None, schema_name: str,
                   response_format: str | None = None) -> dict[str, Any]:
        """The JSON body of a chat-completions request (``extra_body`` fields win)."""
        return build_chat_body(self.config, messages, schema, schema_name,
                               response_format or self.response_format)

    def _downgrade_format(self, sent: str) -> bool:
        """Lower the request format after the server rejected ``sent``; False when nothing is left to drop."""
        if sent not in FORMAT_FALLBACK:
            return False
        if self.response_format == sent:
            self.response_format = FORMAT_FALLBACK[sent]
        return True

    def _backoff(self, retry_index: int, retry_after: float | None) -> float:
        cfg = self.config
        if retry_after is not None:
            return min(retry_after, cfg.retry_after_cap_s) + random.uniform(0, 0.1 * cfg.backoff_base_s)
        return random.uniform(0, min(cfg.backoff_cap_s, cfg.backoff_base_s * 2**retry_index))

    async def complete(
        self, messages: list[dict[str, str]], schema: dict[str, Any] | None = None, schema_name: str = "answer"
    ) -> ChatResult:
        """Send one chat completion, retrying transient failures; see the module docstring for the policy.

        Raises :class:`RequestRejected`, :class:`RetriesExhausted` or :class:`FatalLLMError`,
        each carrying the list of attempts made.
        """
        attempts: list[dict[str, Any]] = []
        estimated = estimate_tokens(messages, self.config.max_tokens)
        attempt = 0
        format_changes = 0
        while attempt <= self.config.max_retries:
            sent_format = self.response_format
            body = self.build_body(messages, schema, schema_name, sent_format)
            handle = await self._limiter.acquire(estimated)
            record: dict[str, Any] = {"attempt": len(attempts) + 1}
            retry_after = None
            started = time.monotonic()
            try:
                response = await self._post(body)
            except (httpx.TimeoutException, TimeoutError) as exc:
                record.update(error=f"timeout ({type(exc).__name__}; the whole attempt is bounded by "
                                    f"{self.config.timeout_s:g} s)")
            except httpx.TransportError as exc:
                record.update(error=f"connection error ({type(exc).__name__}: {exc})")
            else:
                record["status"] = response.status_code
                status = response.status_code
                if status == 200:
                    try:
                        result = self._parse_success(response, attempts, record, started, messages)
                    except ValueError as exc:  # a 200 with a broken body is a server fault: retry it
                        record.update(error=str(exc))
                    else:
                        self._limiter.settle(handle, result.prompt_tokens + result.completion_tokens)
                        return result
                else:
                    text = response.text
                    record["error"] = _short(text)
                    if status == 429 and is_quota_exhausted(text):
                        attempts.append(_finish(record, started))
                        raise FatalLLMError(
                            "HTTP 429 quota exhausted: add credit or use another key, then rerun "
                            "(finished records are kept and will not be redone)", attempts)
                    if status in FATAL_STATUS:
                        attempts.append(_finish(record, started))
                        hint = {401: "check the API key variable", 403: "check the key's permissions",
                                404: "check --base-url (it should end in /v1) and --model"}[status]
                        raise FatalLLMError(f"HTTP {status} from {self._url}: {hint}. Server said: {_short(text)}",
                                            attempts)
                    if ("response_format" in body and names_response_format(status, text)
                            and format_changes < 2 and self._downgrade_format(sent_format)):
                        # Not the request's fault and not transient: send it again at once, in a simpler format.
                        format_changes += 1
                        record["response_format_rejected"] = sent_format
                        attempts.append(_finish(record, started))
                        continue
                    if status not in RETRYABLE_STATUS:
                        attempts.append(_finish(record, started))
                        raise RequestRejected(f"HTTP {status}: {_short(text)}", attempts)
                    retry_after = retry_after_from_headers(response.headers)
            attempts.append(_finish(record, started))
            if attempt < self.config.max_retries:
                wait = self._backoff(attempt, retry_after)
                record["wait_s"] = round(wait, 3)
                await asyncio.sleep(wait)
            attempt += 1
        raise RetriesExhausted(
            f"gave up after {len(attempts)} attempts; last error: {attempts[-1].get('error')}", attempts)

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        http = await self._slots.get()
        try:
            # One deadline for the whole attempt: httpx's timeout bounds each read, so a trickling body
            # would otherwise hold the worker for as long as the server keeps sending.
            async with asyncio.timeout(self.config.timeout_s):
                return await http.post(self._url, json=body)  # reads the whole body before the slot is freed
        finally:
            self._slots.put_nowait(http)

    def _parse_success(self, response: httpx.Response, attempts: list[dict[str, Any]],
                       record: dict[str, Any], started: float, messages: list[dict[str, str]]) -> ChatResult:
        try:
            payload = response.json()
            choice = payload["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise ValueError(f"HTTP 200 with a body that is not a chat completion: {_short(response.text)}") from None
        prompt_tokens, completion_tokens, estimated = read_usage(payload.get("usage"), messages, text)
        record.update(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        if estimated:
            record["usage_estimated"] = True
        attempts.append(_finish(record, started))
        return ChatResult(text, prompt_tokens, completion_tokens, choice.get("finish_reason"), attempts, estimated)


def read_usage(usage: Any, messages: list[dict[str, str]], text: str) -> tuple[int, int, bool]:
    """(prompt tokens, completion tokens, estimated?) from a response's usage block.

    A missing or unreadable block is not zero tokens: the counts are estimated at ~4
    characters per token and flagged, so the run's totals and cost say they are estimates.
    """
    if isinstance(usage, dict):
        try:
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if prompt is not None and completion is not None:
                return int(prompt), int(completion), False
        except (TypeError, ValueError):
            pass
    return prompt_token_estimate(messages), max(1, len(text) // 4), True


def build_chat_body(cfg: ClientConfig, messages: list[dict[str, str]], schema: dict[str, Any] | None,
                    schema_name: str, response_format: str) -> dict[str, Any]:
    """The JSON body of a chat-completions request (``extra_body`` fields win); shared with the batch mode."""
    body: dict[str, Any] = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
                            "max_tokens": cfg.max_tokens}
    if cfg.seed is not None:
        body["seed"] = cfg.seed
    if schema is not None and response_format == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": schema_name, "schema": schema}}
    elif schema is not None and response_format == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif schema is not None and response_format == "json_object_schema":
        body["response_format"] = {"type": "json_object", "schema": schema}
    body.update(cfg.extra_body)
    return body


def _finish(record: dict[str, Any], started: float) -> dict[str, Any]:
    record["elapsed_s"] = round(time.monotonic() - started, 4)
    return record


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
