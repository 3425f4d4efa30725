"""Helpers of the Ray tests (tests/test_scale_*.py): loopback-only Ray, small catalogs, free ports."""

from __future__ import annotations

import os
import socket

import numpy as np

# Ray advertises the machine's own address unless it believes it runs on a laptop without a
# cluster; this switch (read by Ray at import, and by the processes it starts) keeps every Ray
# socket of the tests on 127.0.0.1.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def loopback_ray():
    """Import Ray configured for 127.0.0.1 only (also for the processes it starts)."""
    os.environ.update(LOOPBACK_ENV)
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case Ray was imported before the variable was set
    return ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def catalog(n_items: int = 400, seed: int = 0, dim: int = 16):
    """Items with 1-4 personas on a coarse grid of values (many exact score ties)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, size=n_items)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    vecs = rng.integers(-2, 3, size=(int(offsets[-1]), dim)).astype(np.float32)
    vecs[~vecs.any(axis=1), 0] = 1
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"item-{i}" for i in range(n_items)]
    personas = [{"persona_id": f"{ids[i]}/p{r - offsets[i]}", "name": f"name {r}"}
                for i in range(n_items) for r in range(offsets[i], offsets[i + 1])]
    return ids, vecs, offsets, personas


def users(n: int, seed: int = 1, dim: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    q[~q.any(axis=1), 0] = 1
    return q / np.linalg.norm(q, axis=1, keepdims=True)


class ScriptedLLM:
    """A deterministic stand-in for an LLM behind the loopback stub: a schema-valid answer read off each
    prompt, after ``delay_s``. Counts how often each distinct request was sent (what would be paid)."""

    def __init__(self, domain: str = "product", delay_s: float = 0.0):
        from persona4rec.llm.prompts import load_prompt_set

        self.fields = load_prompt_set(domain).config["aspects"]
        self.delay_s = delay_s
        self.sent: dict[str, int] = {}

    def __call__(self, body: dict, n: int):
        import hashlib
        import json
        import re

        from llm_fixtures.stub_server import chat_reply

        key = hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).hexdigest()
        self.sent[key] = self.sent.get(key, 0) + 1
        stage = body["response_format"]["json_schema"]["name"]
        prompt = body["messages"][1]["content"]
        if stage == "aspects":
            text = prompt.split("Text: ", 1)[1].split("\n", 1)[0] if "Text: " in prompt else "n/a"
            answer = {}
            for f in self.fields:
                answer[f["name"]] = " ".join(text.split()[:3]) or None
                answer[f"{f['name']}_reason"] = "The review says so."
        elif stage == "summary":
            title = prompt.split("Title: ", 1)[1].split("\n", 1)[0] if "Title: " in prompt else "It"
            answer = {"summary": f"{title} is a product. It is sold online."}
        elif stage == "personas":
            n_reviews = len(re.findall(r"^Review \d+ \(rating", prompt, re.M))
            count = 1 if "exactly 1" in prompt else min(3, max(2, n_reviews))
            words = re.findall(r"[a-z]+", prompt.lower())[-40:]
            answer = {"personas": [{"Name": f"Persona Number {k}",
                                    "Description": " ".join(words[k::3][:8]) + ". Two. Three.",
                                    "Preference_Rationale": "Review 1 says so."} for k in range(1, count + 1)]}
        else:
            first_id = re.search(r"^(\S+_P\d+):", prompt, re.M).group(1)
            answer = {"reasoning": "The history fits.", "selection": first_id}
        return chat_reply(json.dumps(answer), delay_s=self.delay_s)

    @property
    def paid_twice(self) -> int:
        return sum(c - 1 for c in self.sent.values() if c > 1)


def review_subset(shared_dir, out_path, n_items: int = 30) -> tuple[list[str], list[str]]:
    """The reviews of the first ``n_items`` MI-5core items (raw lines) into ``out_path``; returns (item ids,
    held-out review ids: each item's latest review, as a leave-one-out split holds out)."""
    import gzip
    import json

    src = shared_dir / "data" / "amazon-mi-5core" / "reviews_Musical_Instruments_5.json.gz"
    with gzip.open(src, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    chosen = sorted({r["asin"] for r in rows})[:n_items]
    keep = [r for r in rows if r["asin"] in set(chosen)]
    with open(out_path, "w", encoding="utf-8") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")
    latest: dict[str, dict] = {}
    for r in keep:
        if r["asin"] not in latest or r["unixReviewTime"] > latest[r["asin"]]["unixReviewTime"]:
            latest[r["asin"]] = r
    return chosen, [f"{r['reviewerID']}:{r['asin']}" for r in latest.values()]
