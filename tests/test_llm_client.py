"""ChatClient against a real HTTP stub on 127.0.0.1: retries, Retry-After, timeouts, fatal errors, limits."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time

import pytest

pytest.importorskip("httpx")

from llm_fixtures.stub_server import Reply, StubServer, chat_reply, chat_reply_without_usage  # noqa: E402

from persona4rec.llm.client import (  # noqa: E402
    ChatClient,
    ClientConfig,
    FatalLLMError,
    RateLimiter,
    RequestRejected,
    RetriesExhausted,
    is_quota_exhausted,
    parse_retry_after,
    retry_after_from_headers,
)

MESSAGES = [{"role": "user", "content": "hello"}]
TEST_DEADLINE_S = 20  # every async test is wrapped in wait_for so nothing can hang


def config(server: StubServer, **overrides) -> ClientConfig:
    values = dict(base_url=server.base_url, model="stub-model", api_key_env="P4R_TEST_KEY", timeout_s=2.0,
                  concurrency=4, max_retries=3, backoff_base_s=0.01, backoff_cap_s=0.05, retry_after_cap_s=1.0)
    values.update(overrides)
    return ClientConfig(**values)


def complete(cfg: ClientConfig, schema=None):
    async def go():
        async with ChatClient(cfg) as client:
            return await client.complete(MESSAGES, schema, "answer")

    return asyncio.run(asyncio.wait_for(go(), TEST_DEADLINE_S))


def scripted(*replies: Reply):
    """Responder that plays ``replies`` in order, then keeps answering "ok"."""
    return lambda body, n: replies[n] if n < len(replies) else chat_reply("ok")


def test_429_with_retry_after_seconds_is_waited_out_then_succeeds():
    with StubServer(scripted(Reply(429, {"error": {"message": "Rate limit reached"}}, {"Retry-After": "0.3"}))) as s:
        result = complete(config(s))
    assert result.text == "ok"
    assert [a.get("status") for a in result.attempts] == [429, 200]
    assert 0.3 <= result.attempts[0]["wait_s"] <= 0.31  # Retry-After plus at most 10% of the backoff base
    assert len(s.requests) == 2


def test_retry_after_is_capped():
    with StubServer(scripted(Reply(503, "busy", {"Retry-After": "3600"}))) as s:
        result = complete(config(s, retry_after_cap_s=0.2))
    assert result.attempts[0]["wait_s"] <= 0.21


def test_retry_after_http_date_and_seconds_parse():
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after(date, now=now) <= 31
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("garbage") is None
    assert parse_retry_after(None) is None


def test_5xx_and_408_409_are_retried_until_success():
    with StubServer(scripted(Reply(500, "boom"), Reply(502, "bad gw"), Reply(408, "slow"), Reply(409, "x"))) as s:
        result = complete(config(s, max_retries=4))
    assert [a.get("status") for a in result.attempts] == [500, 502, 408, 409, 200]


def test_hang_past_timeout_is_retried():
    with StubServer(scripted(chat_reply("late", delay_s=3.0))) as s:
        result = complete(config(s, timeout_s=0.3))
    assert result.text == "ok"
    assert result.attempts[0]["error"].startswith("timeout")
    assert result.attempts[1]["status"] == 200


def test_connection_refused_is_retried_then_gives_up():
    with StubServer(scripted()) as s:
        pass  # the server is gone: its port now refuses connections
    dead = config(s, max_retries=2)
    with pytest.raises(RetriesExhausted) as info:
        complete(dead)
    assert len(info.value.attempts) == 3
    assert all(a["error"].startswith("connection error") for a in info.value.attempts)


def test_persistent_500_exhausts_retries_with_every_attempt_recorded():
    with StubServer(lambda body, n: Reply(500, "down")) as s:
        with pytest.raises(RetriesExhausted) as info:
            complete(config(s, max_retries=2))
    assert [a["status"] for a in info.value.attempts] == [500, 500, 500]
    assert len(s.requests) == 3


@pytest.mark.parametrize("status", [400, 413, 422])
def test_request_errors_are_not_retried(status):
    with StubServer(lambda body, n: Reply(status, {"error": {"message": "context too long"}})) as s:
        with pytest.raises(RequestRejected, match=f"HTTP {status}"):
            complete(config(s))
    assert len(s.requests) == 1


@pytest.mark.parametrize("status,hint", [(401, "API key"), (403, "permissions"), (404, "base-url")])
def test_auth_and_not_found_stop_the_run_with_a_hint(status, hint):
    with StubServer(lambda body, n: Reply(status, {"error": {"message": "nope"}})) as s:
        with pytest.raises(FatalLLMError, match=hint):
            complete(config(s))
    assert len(s.requests) == 1


def test_429_quota_exhausted_is_fatal_and_not_retried():
    body = {"error": {"message": "You exceeded your current quota, please check your plan and billing details.",
                      "type": "insufficient_quota", "code": "insufficient_quota"}}
    with StubServer(lambda b, n: Reply(429, body, {"Retry-After": "1"})) as s:
        with pytest.raises(FatalLLMError, match="quota"):
            complete(config(s))
    assert len(s.requests) == 1


def test_quota_detection_does_not_confuse_rate_limits():
    assert not is_quota_exhausted('{"error": {"message": "Rate limit reached for gpt-4o-mini on tokens per min"}}')
    assert is_quota_exhausted('{"error": {"code": "insufficient_quota"}}')
    assert is_quota_exhausted("Quota exceeded for project")


def test_200_with_broken_body_is_retried():
    with StubServer(scripted(Reply(200, "<html>proxy error</html>"))) as s:
        result = complete(config(s))
    assert result.text == "ok"
    assert "not a chat completion" in result.attempts[0]["error"]


def test_request_body_carries_settings_schema_and_key_header(monkeypatch):
    monkeypatch.setenv("P4R_TEST_KEY", "sk-secret-123")
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    with StubServer(scripted()) as s:
        cfg = config(s, temperature=0.3, max_tokens=77, seed=5, extra_body={"top_k": 20, "temperature": 0.1})
        result = complete(cfg, schema)
    body = s.requests[0]
    assert body["model"] == "stub-model" and body["max_tokens"] == 77 and body["seed"] == 5
    assert body["temperature"] == 0.1 and body["top_k"] == 20  # extra_body wins
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    assert s.headers_seen[0]["authorization"] == "Bearer sk-secret-123"
    assert "sk-secret" not in json.dumps(result.attempts) and "sk-secret" not in repr(ChatClient(cfg))


def test_json_object_mode_and_no_key_header():
    with StubServer(scripted()) as s:
        complete(config(s, response_format="json_object", api_key_env="P4R_UNSET_VAR_XYZ"), {"type": "object"})
    assert s.requests[0]["response_format"] == {"type": "json_object"}
    assert "authorization" not in s.headers_seen[0]
    with StubServer(scripted()) as s:
        complete(config(s, response_format="json_object_schema"), {"type": "object"})
        complete(config(s, response_format="none"), {"type": "object"})
    assert s.requests[0]["response_format"] == {"type": "json_object", "schema": {"type": "object"}}
    assert "response_format" not in s.requests[1]


def test_usage_is_reported():
    with StubServer(lambda b, n: chat_reply("x", prompt_tokens=123, completion_tokens=45)) as s:
        result = complete(config(s))
    assert (result.prompt_tokens, result.completion_tokens) == (123, 45)


def test_connection_pool_bounds_requests_in_flight():
    async def go(cfg):
        async with ChatClient(cfg) as client:
            await asyncio.gather(*(client.complete(MESSAGES) for _ in range(24)))

    with StubServer(lambda b, n: chat_reply("ok", delay_s=0.05)) as s:
        asyncio.run(asyncio.wait_for(go(config(s, concurrency=3)), TEST_DEADLINE_S))
    assert len(s.requests) == 24
    assert 1 <= s.max_in_flight <= 3


def test_rate_limiter_holds_requests_beyond_the_window_budget():
    async def go():
        limiter = RateLimiter(requests_per_minute=2, tokens_per_minute=None, window_s=0.3)
        start = time.monotonic()
        for _ in range(3):
            await limiter.acquire(10)
        return time.monotonic() - start

    # The third request must wait for the first to leave the 0.3 s window (a lower bound, not a speed target).
    assert asyncio.run(asyncio.wait_for(go(), TEST_DEADLINE_S)) >= 0.29


def test_token_limiter_counts_actual_usage():
    async def go():
        limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=100, window_s=60)
        handle = await limiter.acquire(90)
        limiter.settle(handle, 10)  # the real usage was small, so another 80-token request fits at once
        await asyncio.wait_for(limiter.acquire(80), 1.0)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(limiter.acquire(50), 0.2)

    asyncio.run(asyncio.wait_for(go(), TEST_DEADLINE_S))


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="concurrency"):
        ClientConfig(concurrency=0)
    with pytest.raises(ValueError, match="response_format"):
        ClientConfig(response_format="xml")


# ------------------------------------------------------------------ hostile servers (issue 13)

def test_retry_after_ms_is_honoured_before_retry_after():
    # OpenAI and Azure send retry-after-ms; before the fix it was ignored and the retry came after ~0-10 ms.
    with StubServer(scripted(Reply(503, "busy", {"retry-after-ms": "400"}))) as s:
        result = complete(config(s))
    assert 0.4 <= result.attempts[0]["wait_s"] <= 0.41
    assert retry_after_from_headers({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_from_headers({"retry-after-ms": "junk", "retry-after": "2"}) == 2.0


def test_a_trickling_body_is_cut_off_by_the_total_deadline():
    # Each piece arrives well inside the per-read timeout, the whole answer does not: the deadline is total.
    trickle = Reply(200, chat_reply("slow").body, trickle_s=0.15, trickle_chunks=12)
    with StubServer(scripted(trickle)) as s:
        result = complete(config(s, timeout_s=0.5))
    assert result.text == "ok"
    assert "timeout" in result.attempts[0]["error"] and "0.5 s" in result.attempts[0]["error"]


def test_a_body_that_never_ends_is_cut_off_and_retried():
    with StubServer(scripted(Reply(200, chat_reply("never").body, stall=True))) as s:
        result = complete(config(s, timeout_s=0.5))
    assert result.text == "ok" and result.attempts[0]["error"].startswith("timeout")


def test_connection_reset_without_an_answer_is_retried():
    with StubServer(scripted(Reply(reset=True))) as s:
        result = complete(config(s))
    assert result.text == "ok" and result.attempts[0]["error"].startswith("connection error")


def test_missing_usage_is_estimated_and_flagged_not_counted_as_zero():
    with StubServer(lambda b, n: chat_reply_without_usage("x" * 400)) as s:
        result = complete(config(s))
    assert result.usage_estimated is True and result.attempts[-1]["usage_estimated"] is True
    assert result.completion_tokens == 100 and result.prompt_tokens >= 1
    with StubServer(lambda b, n: chat_reply("x", prompt_tokens=0, completion_tokens=0)) as s:
        result = complete(config(s))  # a real zero is a real zero
    assert (result.prompt_tokens, result.completion_tokens, result.usage_estimated) == (0, 0, False)


def test_a_server_without_json_schema_support_gets_a_simpler_format_for_the_rest_of_the_run():
    def responder(body, n):
        if body.get("response_format", {}).get("type") == "json_schema":
            return Reply(400, {"error": {"message": "response_format json_schema is not supported"}})
        return chat_reply("ok")

    async def go(cfg):
        async with ChatClient(cfg) as client:
            first = await client.complete(MESSAGES, {"type": "object"}, "answer")
            second = await client.complete(MESSAGES, {"type": "object"}, "answer")
            return first, second, client.response_format

    with StubServer(responder) as s:
        first, second, fmt = asyncio.run(asyncio.wait_for(go(config(s, max_retries=0)), TEST_DEADLINE_S))
    assert first.text == "ok" and first.attempts[0]["response_format_rejected"] == "json_schema"
    assert fmt == "json_object" and len(second.attempts) == 1
    assert [r.get("response_format", {}).get("type") for r in s.requests] == ["json_schema", "json_object",
                                                                               "json_object"]


def test_a_400_about_something_else_is_still_rejected_at_once():
    with StubServer(lambda b, n: Reply(400, {"error": {"message": "context length exceeded"}})) as s:
        with pytest.raises(RequestRejected):
            complete(config(s), {"type": "object"})
    assert len(s.requests) == 1
