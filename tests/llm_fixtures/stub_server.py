"""A real HTTP server speaking enough of OpenAI's ``/v1/chat/completions`` for the tests.

It listens on 127.0.0.1 on a free port, runs its own asyncio loop in a daemon
thread (or, for the benchmark, in its own process via ``python stub_server.py``),
speaks HTTP/1.1 with keep-alive, and answers each request with whatever a
``responder(body, n)`` callable returns: a :class:`Reply` with a status, headers,
body and optional delay. Every wait is bounded, so a test cannot hang on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_WAIT_S = 30.0  # upper bound on any delay or hang, so a broken test still ends


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict/list -> JSON, str -> sent as is
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


def chat_reply(content: str, prompt_tokens: int = 11, completion_tokens: int = 7, delay_s: float = 0.0) -> Reply:
    """A successful chat completion whose message content is ``content``."""
    return Reply(200, {
        "id": "chatcmpl-stub", "object": "chat.completion", "model": "stub",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }, delay_s=delay_s)


Responder = Callable[[dict[str, Any], int], Reply]
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 408: "Request Timeout",
            429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


class StubServer:
    """Start with ``with StubServer(responder) as server: server.base_url``; ``server.requests`` logs bodies."""

    def __init__(self, responder: Responder):
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        self.headers_seen: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0  # most requests being answered at the same moment
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> StubServer:
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("stub server did not start within 10 s")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one iteration per request
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), MAX_WAIT_S)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                raw = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), MAX_WAIT_S)
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"_unparsed": raw.decode("utf-8", "replace")}
                with self._lock:
                    n = len(self.requests)
                    self.requests.append(body)
                    self.headers_seen.append(headers)
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    reply = self.responder(body, n)
                    if reply.delay_s:
                        await asyncio.sleep(min(reply.delay_s, MAX_WAIT_S))
                finally:
                    with self._lock:
                        self.in_flight -= 1
                payload = reply.body if isinstance(reply.body, (str, bytes)) else json.dumps(reply.body)
                data = payload.encode() if isinstance(payload, str) else payload
                extra = "".join(f"{k}: {v}\r\n" for k, v in reply.headers.items())
                writer.write(
                    f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n{extra}\r\n".encode() + data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def main() -> int:
    """Run a stub that answers every request with a fixed JSON after ``--delay`` seconds (for benchmarks)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.05)
    args = parser.parse_args()
    content = json.dumps({"summary": "A stub summary."})
    with StubServer(lambda body, n: chat_reply(content, delay_s=args.delay)) as server:
        print(server.port, flush=True)
        sys.stdin.read()  # serve until the parent closes our stdin
    return 0


if __name__ == "__main__":
    sys.exit(main())
