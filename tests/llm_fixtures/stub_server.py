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
    # Hostile behaviours: send the body in `trickle_chunks` pieces `trickle_s` apart; send the headers
    # and half the body, then never finish (`stall`, bounded by MAX_WAIT_S); close without answering (`reset`).
    trickle_s: float = 0.0
    trickle_chunks: int = 10
    stall: bool = False
    reset: bool = False


def chat_reply_without_usage(content: str, delay_s: float = 0.0) -> Reply:
    """A chat completion with no usage block (some proxies and servers leave it out)."""
    reply = chat_reply(content, delay_s=delay_s)
    del reply.body["usage"]
    return reply


def quota_reply() -> Reply:
    """OpenAI's answer when the account has no credit left: a 429 that waiting does not fix."""
    return Reply(429, {"error": {"message": "You exceeded your current quota, please check your plan and billing "
                                            "details.", "type": "insufficient_quota", "code": "insufficient_quota"}})


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
        self.disconnected_while_waiting = 0  # requests whose client hung up before the answer was sent
        self.routes: dict[str, Callable[..., Any]] = {}  # extra "METHOD /path" handlers (the batch fake)
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
                method, path = (lines[0].split(" ") + ["", ""])[:2]
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                raw = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), MAX_WAIT_S)
                route = self._route(method, path)
                if route is not None:
                    reply = route(method, path, headers, raw)
                    await self._send(writer, reply)
                    continue
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
                        await self._wait_or_hangup(reader, min(reply.delay_s, MAX_WAIT_S))
                finally:
                    with self._lock:
                        self.in_flight -= 1
                if reply.reset:
                    return
                await self._send(writer, reply)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


    def _route(self, method: str, path: str) -> Callable[..., Any] | None:
        for pattern, handler in self.routes.items():
            want_method, _, prefix = pattern.partition(" ")
            if method == want_method and path.startswith(prefix):
                return handler
        return None

    async def _wait_or_hangup(self, reader: asyncio.StreamReader, seconds: float) -> None:
        """Sleep ``seconds``, or less when the client closes the connection (counted: a cancelled request)."""
        try:
            data = await asyncio.wait_for(reader.read(1), seconds)
        except asyncio.TimeoutError:
            return
        if not data:
            with self._lock:
                self.disconnected_while_waiting += 1
            raise ConnectionError("client hung up")

    async def _send(self, writer: asyncio.StreamWriter, reply: Reply) -> None:
        payload = reply.body if isinstance(reply.body, (str, bytes)) else json.dumps(reply.body)
        data = payload.encode() if isinstance(payload, str) else payload
        extra = "".join(f"{k}: {v}\r\n" for k, v in reply.headers.items())
        head = (f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n{extra}\r\n").encode()
        if reply.stall:  # headers and half the body, then silence (a server that never ends its answer)
            writer.write(head + data[: len(data) // 2])
            await writer.drain()
            await asyncio.sleep(MAX_WAIT_S)
            raise ConnectionError("stalled reply abandoned")
        if reply.trickle_s:
            writer.write(head)
            step = max(1, -(-len(data) // reply.trickle_chunks))
            for start in range(0, len(data), step):
                await writer.drain()
                await asyncio.sleep(reply.trickle_s)
                writer.write(data[start: start + step])
            await writer.drain()
            return
        writer.write(head + data)
        await writer.drain()


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
