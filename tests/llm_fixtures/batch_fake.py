"""A loopback fake of the OpenAI Batch API (files and batches endpoints) on top of :class:`StubServer`.

``POST /v1/files`` stores an uploaded JSONL, ``POST /v1/batches`` creates a batch over it,
``GET /v1/batches/{id}`` reports ``in_progress`` for ``polls_until_done`` polls and then
answers every line through the chat ``responder`` (the same one the online tests use), and
``GET /v1/files/{id}/content`` serves the output and error files. Hostile knobs apply to the
first batch only: ``fail_lines`` (line numbers answered 500 in the error file),
``expire_after`` (only that many lines answered, the rest ``batch_expired``, status
``expired``), ``fail_batch`` (the batch fails validation as a whole), and ``hold`` (the batch
stays ``in_progress`` until released, to kill a run while it is in flight).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from llm_fixtures.stub_server import Reply, Responder, StubServer


class BatchFake:
    def __init__(self, server: StubServer, responder: Responder, polls_until_done: int = 1,
                 fail_lines: frozenset[int] = frozenset(), expire_after: int | None = None, fail_batch: bool = False,
                 hold: bool = False):
        self.server = server
        self.responder = responder
        self.polls_until_done = polls_until_done
        self.fail_lines = fail_lines
        self.expire_after = expire_after
        self.fail_batch = fail_batch
        self.held = threading.Event()
        if hold:
            self.held.set()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.lines_answered: list[dict[str, Any]] = []  # every request body answered, in order
        self._lock = threading.Lock()
        server.routes.update({"POST /v1/files": self._upload, "POST /v1/batches": self._create,
                              "GET /v1/batches/": self._poll, "GET /v1/files/": self._content})

    def release(self) -> None:
        self.held.clear()

    @property
    def created(self) -> list[dict[str, Any]]:
        return list(self.batches.values())

    def _upload(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Reply:
        boundary = headers["content-type"].split("boundary=", 1)[1].strip('"').encode()
        content = None
        for part in raw.split(b"--" + boundary):
            head, _, body = part.partition(b"\r\n\r\n")
            if b'name="file"' in head:
                content = body[: -2] if body.endswith(b"\r\n") else body
            elif b'name="purpose"' in head and not body.startswith(b"batch"):
                return Reply(400, {"error": {"message": "purpose must be batch"}})
        if content is None:
            return Reply(400, {"error": {"message": "no file part"}})
        with self._lock:
            file_id = f"file-{len(self.files)}"
            self.files[file_id] = content
        return Reply(200, {"id": file_id, "object": "file", "purpose": "batch", "bytes": len(content)})

    def _create(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Reply:
        request = json.loads(raw)
        if request.get("input_file_id") not in self.files or request.get("endpoint") != "/v1/chat/completions":
            return Reply(400, {"error": {"message": "bad input_file_id or endpoint"}})
        with self._lock:
            batch_id = f"batch_{len(self.batches)}"
            self.batches[batch_id] = {"id": batch_id, "object": "batch", "status": "validating", "polls": 0,
                                      "input_file_id": request["input_file_id"], "output_file_id": None,
                                      "error_file_id": None, "first": not self.batches}
        return Reply(200, self._public(batch_id))

    def _public(self, batch_id: str) -> dict[str, Any]:
        return {k: v for k, v in self.batches[batch_id].items() if k not in ("polls", "first")}

    def _poll(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Reply:
        batch_id = path.rsplit("/", 1)[1]
        if batch_id not in self.batches:
            return Reply(404, {"error": {"message": f"no batch {batch_id}"}})
        batch = self.batches[batch_id]
        if batch["status"] in ("completed", "expired", "failed"):
            return Reply(200, self._public(batch_id))
        batch["polls"] += 1
        if batch["polls"] < self.polls_until_done or self.held.is_set():
            batch["status"] = "in_progress"
            return Reply(200, self._public(batch_id))
        self._finish(batch)
        return Reply(200, self._public(batch_id))

    def _finish(self, batch: dict[str, Any]) -> None:
        first = batch["first"]
        if first and self.fail_batch:
            batch["status"] = "failed"
            batch["errors"] = {"data": [{"code": "invalid_request", "message": "fake validation failure", "line": 1}]}
            return
        outputs, errors = [], []
        lines = [json.loads(ln) for ln in self.files[batch["input_file_id"]].decode().splitlines() if ln.strip()]
        expired = False
        for index, line in enumerate(lines):
            cid = line["custom_id"]
            if first and self.expire_after is not None and index >= self.expire_after:
                expired = True
                errors.append({"id": f"req_{index}", "custom_id": cid, "response": None,
                               "error": {"code": "batch_expired", "message": "not completed within 24h"}})
                continue
            if first and index in self.fail_lines:
                errors.append({"id": f"req_{index}", "custom_id": cid, "response": {
                    "status_code": 500, "body": {"error": {"message": "server error"}}}, "error": None})
                continue
            reply = self.responder(line["body"], len(self.lines_answered))
            self.lines_answered.append(line["body"])
            entry = {"id": f"req_{index}", "custom_id": cid,
                     "response": {"status_code": reply.status, "body": reply.body}, "error": None}
            (outputs if reply.status == 200 else errors).append(entry)
        with self._lock:
            for kind, rows in (("output_file_id", outputs), ("error_file_id", errors)):
                if rows:
                    file_id = f"file-{len(self.files)}"
                    self.files[file_id] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                    batch[kind] = file_id
        batch["status"] = "expired" if expired else "completed"

    def _content(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Reply:
        file_id = path.split("/")[3]
        if not path.endswith("/content") or file_id not in self.files:
            return Reply(404, {"error": {"message": f"no file {file_id}"}})
        return Reply(200, self.files[file_id].decode())
