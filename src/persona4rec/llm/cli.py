"""`persona4rec llm {aspects,summaries,personas,select}`: the offline stages from the command line.

Every stage reads and writes JSON lines, can be interrupted and rerun (it resumes),
and prints a summary of calls, cache hits, retries, failures and tokens. Exit status:
0 when every task has an ok record (or the failed share is within --max-failed-fraction),
1 when some tasks are still pending after transient errors or the --deadline (rerun the
same command), 2 for bad input or a fatal endpoint error (the summary of tokens and cost
so far is still printed), 3 when more records failed than --max-failed-fraction allows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .guard import LeakageGuardMissing, leakage_guard  # noqa: F401 - the stage commands use both


def register(sub: Any) -> None:
    parser = sub.add_parser("llm", help="offline persona generation over an OpenAI-compatible endpoint",
                            description=__doc__.splitlines()[0])
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    p = stages.add_parser("aspects", help="extract what each reviewer valued (one record per review)")
    p.add_argument("--reviews", required=True, help="reviews JSONL(.gz): Amazon 5-core or normalised fields")
    p.add_argument("--items", help="item metadata (items.csv or JSONL), for item titles in the prompt")
    _common(p, exclude=True)

    p = stages.add_parser("summaries", help="2-3 sentence neutral item summaries (one record per item)")
    p.add_argument("--items", required=True, help="item metadata (items.csv or JSONL)")
    _common(p)

    p = stages.add_parser("personas", help="2-7 personas per item from its reviews' aspects")
    p.add_argument("--aspects", required=True, help="output of `llm aspects`")
    p.add_argument("--reviews", help="the reviews JSONL(.gz) the aspects came from: each review's title and text "
                                     "go into the prompt beside its aspects (the paper's input)")
    p.add_argument("--summaries", help="output of `llm summaries` (context for the personas)")
    p.add_argument("--items", help="item metadata, for titles and descriptions")
    p.add_argument("--max-reviews-per-item", type=int, default=40, help="most recent reviews used as evidence")
    p.add_argument("--review-text-tokens", type=int, default=256,
                   help="each review text is cut to about this many tokens (4 characters each; default 256)")
    _common(p, exclude=True)

    p = stages.add_parser("select", help="LLM-as-judge: the persona that explains each user's target item")
    p.add_argument("--reviews", required=True, help="the training reviews (history and targets come from them)")
    p.add_argument("--personas", required=True, help="output of `llm personas`")
    p.add_argument("--aspects", help="output of `llm aspects`: the judge sees what each history review valued")
    p.add_argument("--summaries", help="output of `llm summaries`")
    p.add_argument("--items", help="item metadata, for titles")
    p.add_argument("--history-size", type=int, default=10)
    p.add_argument("--targets-per-user", type=int, default=1)
    p.add_argument("--like-threshold", type=float, default=4.0, help="ratings at or above count as liked")
    _common(p, exclude=True)


def _common(p: argparse.ArgumentParser, exclude: bool = False) -> None:
    p.add_argument("--out", required=True, help="output JSONL; an existing file is resumed, never overwritten")
    if exclude:
        g = p.add_argument_group("leakage guard (one of --exclude-review-ids, --split or --allow-heldout is required)")
        g.add_argument("--exclude-review-ids", metavar="FILE",
                       help="file of review ids (one per line) that must not be used, e.g. the held-out reviews "
                            "of a split from `persona4rec data heldout`")
        g.add_argument("--split", choices=["loo", "temporal"],
                       help="exclude the held-out reviews of this split of --dataset (as `persona4rec evaluate` "
                            "splits it)")
        g.add_argument("--dataset", default="amazon-mi-5core", help="registered dataset of --split (default: %(default)s)")
        g.add_argument("--data-dir", help="folder holding the dataset files of --split")
        g.add_argument("--split-tie-break", choices=["random", "file"], default="random",
                       help="tie-break of --split, as evaluate's --tie-break (default: %(default)s)")
        g.add_argument("--split-seed", type=int, default=0, help="seed of --split, as evaluate's --seed (default 0)")
        g.add_argument("--allow-heldout", action="store_true",
                       help="use every review: for production personas only, never for an evaluated split")
    g = p.add_argument_group("endpoint")
    g.add_argument("--base-url", default="https://api.openai.com/v1", help="OpenAI-compatible base URL incl. /v1")
    g.add_argument("--model", default="gpt-4o-mini")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--max-tokens", type=int, default=1024)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--extra-body", default="{}", help="JSON object merged into every request body")
    g.add_argument("--response-format", choices=["json_schema", "json_object", "json_object_schema", "none"],
                   default="json_schema", help="how to ask for JSON (json_object_schema for llama-cpp-python)")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="seconds per attempt in total: connect, send and every read of the answer (default 120)")
    g.add_argument("--concurrency", type=int, default=8, help="workers = connection-pool size")
    g.add_argument("--max-retries", type=int, default=6)
    g.add_argument("--rpm", type=float, help="requests-per-minute limit")
    g.add_argument("--tpm", type=float, help="tokens-per-minute limit")
    g = p.add_argument_group("run")
    g.add_argument("--domain", default="product", help="prompt domain: product, book or restaurant")
    g.add_argument("--prompt-version", default=None, help="prompt set version (default: the newest shipped)")
    g.add_argument("--cache", help="response cache JSONL (default: <out>.cache.jsonl)")
    g.add_argument("--prices", help='USD per 1M tokens for a cost estimate, e.g. \'{"prompt": 0.15, "completion": 0.6}\'')
    g.add_argument("--dry-run", nargs="?", const=2, type=int, metavar="N",
                   help="print the first N rendered prompts (default 2) and the number of calls; send nothing")
    g.add_argument("--retry-failed", action="store_true", help="redo tasks recorded as failed")
    g.add_argument("--mode", choices=["online", "batch"], default="online",
                   help="online: chat completions as they go; batch: the OpenAI Batch API (half price, up to 24 h; "
                        "state in <out>.batch.json, a rerun resumes the batch in flight)")
    g.add_argument("--batch-poll", type=float, default=10.0, metavar="SECONDS",
                   help="first wait between batch status polls; grows 1.5x per poll (default 10)")
    g.add_argument("--batch-poll-max", type=float, default=300.0, metavar="SECONDS",
                   help="longest wait between batch status polls (default 300)")
    g.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="wall-clock limit of the whole run: stop then, cancel the calls in flight and exit 1 "
                        "(a rerun resumes)")
    g.add_argument("--max-failed-fraction", type=float, default=0.0, metavar="F",
                   help="accept up to this share of failed records (0-1) with exit status 0 (default 0: any "
                        "failed record exits 3)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--summary-json", help="also write the run summary as JSON here")
    p.set_defaults(func=run)


def _json_arg(text: str | None, name: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object")
    return value


def _build_tasks(args: argparse.Namespace, prompts: Any) -> list[Any]:
    from . import inputs, stages
    from .jobs import read_jsonl

    excluded, guard = leakage_guard(args)
    items = inputs.load_items(args.items) if getattr(args, "items", None) else {}
    summaries = stages.summaries_from_records(read_jsonl(args.summaries)) if getattr(args, "summaries", None) else {}
    if args.stage == "aspects":
        tasks = stages.aspect_tasks(inputs.load_reviews(args.reviews), prompts, items, excluded)
    elif args.stage == "summaries":
        tasks = stages.summary_tasks(items.values(), prompts)
    elif args.stage == "personas":
        reviews = inputs.load_reviews(args.reviews) if args.reviews else None
        if reviews is None:
            print("llm personas: no --reviews: the prompts show each review's rating and aspects only, not its "
                  "title and text (the paper's input has them)", file=sys.stderr)
        tasks = stages.persona_tasks(read_jsonl(args.aspects), prompts, summaries, items, excluded,
                                     args.max_reviews_per_item, reviews, args.review_text_tokens)
    else:
        requests = stages.selection_requests(inputs.load_reviews(args.reviews), excluded, args.history_size,
                                             args.targets_per_user)
        aspects = read_jsonl(args.aspects) if args.aspects else None
        if aspects is None:
            print("llm select: no --aspects: the judge sees the user's history without what their own reviews "
                  "valued (the paper's input has it)", file=sys.stderr)
        tasks = stages.selection_tasks(requests, read_jsonl(args.personas), prompts, summaries, items,
                                       args.like_threshold, aspects)
    if guard is not None:
        for task in tasks:
            task.meta["leakage_guard"] = guard
    return tasks


def run(args: argparse.Namespace) -> int:
    import asyncio

    from .client import ClientConfig, FatalLLMError
    from .prompts import DEFAULT_PROMPT_VERSION, load_prompt_set
    from .stages import run_tasks

    try:
        prompts = load_prompt_set(args.domain, args.prompt_version or DEFAULT_PROMPT_VERSION)
        config = ClientConfig(
            base_url=args.base_url, model=args.model, api_key_env=args.api_key_env, temperature=args.temperature,
            max_tokens=args.max_tokens, seed=args.seed, extra_body=_json_arg(args.extra_body, "--extra-body"),
            response_format=args.response_format, timeout_s=args.timeout, concurrency=args.concurrency,
            max_retries=args.max_retries, requests_per_minute=args.rpm, tokens_per_minute=args.tpm)
        prices = _json_arg(args.prices, "--prices")
        tasks = _build_tasks(args, prompts)
    except (ValueError, OSError, KeyError) as exc:
        print(f"llm {args.stage}: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out.with_name(out.name + ".cache.jsonl")
    stage = {"summaries": "summary", "select": "selection"}.get(args.stage, args.stage)

    if args.dry_run is not None:
        return _dry_run(tasks, config, stage, prompts, out, cache, args)
    if not 0.0 <= args.max_failed_fraction <= 1.0:
        print(f"llm {args.stage}: --max-failed-fraction must be between 0 and 1", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(run_tasks(tasks, config, out, stage, prompts, cache, progress=not args.no_progress,
                                        retry_failed=args.retry_failed, deadline_s=args.deadline,
                                        mode=args.mode, batch_options={"poll_initial_s": args.batch_poll,
                                                                       "poll_max_s": args.batch_poll_max}))
    except FatalLLMError as exc:
        print(f"llm {args.stage}: stopped: {exc}", file=sys.stderr)
        stopped = getattr(exc, "summary", None)
        if stopped is not None:
            _report(stopped, prices, args)
        return 2
    _report(summary, prices, args)
    return summary.exit_status(args.max_failed_fraction)


def _report(summary: Any, prices: dict[str, Any], args: argparse.Namespace) -> None:
    print(summary.format(prices), file=sys.stderr)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.as_dict(prices), indent=1))


def _dry_run(tasks: list[Any], config: Any, stage: str, prompts: Any, out: Path, cache: Path,
             args: argparse.Namespace) -> int:
    from .client import ChatClient
    from .jobs import JobRunner

    async def plan() -> tuple[list[Any], int, int]:
        async with ChatClient(config) as client:
            return JobRunner(client, stage, prompts.tag, prompts.fingerprint, cache, False,
                             stage_fingerprint=prompts.stage_fingerprint(stage)).plan(
                tasks, out, args.retry_failed)

    import asyncio

    pending, done, cached = asyncio.run(plan())
    for task in pending[: args.dry_run]:
        print(f"=== {stage} {task.key} ({prompts.tag}) ===")
        for m in task.messages:
            print(f"[{m['role']}]\n{m['content']}\n")
    print(f"{stage}: {len(tasks)} tasks, {done} already in {out}, {len(pending)} to run, {cached} of them answered "
          f"by the cache: {len(pending) - cached} calls would be sent to {config.base_url} (plus at most one "
          "repair call each)")
    return 0
