"""`persona4rec serve` (a sharded index on Ray Serve) and `persona4rec pipeline run` (the offline
stages on Ray Data). Ray is imported only when a command runs."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a sharded index (ShardedPersonaIndex directory) on Ray Serve",
                       description="Deploy one Ray Serve deployment per shard and an HTTP router that merges the "
                                   "exact top-k. Without --address an embedded local Ray is started.")
    p.add_argument("--index", required=True, help="directory written by ShardedPersonaIndex.build/save")
    p.add_argument("--address", help="Ray cluster address (e.g. ray://head:10001 or auto); default: embedded local Ray")
    p.add_argument("--replicas-per-shard", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default %(default)s)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--place-shards-on", metavar="RES1,RES2,...",
                   help="custom Ray resources: shard s runs on a node advertising RES[s %% n]")
    p.add_argument("--shard-cpus", type=float, default=0.0,
                   help="CPUs Ray reserves per shard replica (default 0: the OS shares cores)")
    p.add_argument("--retry-deadline", type=float, default=10.0,
                   help="seconds a query waits for an unavailable shard before it fails with 503 (default 10)")
    p.add_argument("--no-verify", action="store_true", help="skip the shard files' checksums at start")
    p.set_defaults(func=_serve)

    p = sub.add_parser("pipeline", help="the offline persona pipeline on Ray Data")
    steps = p.add_subparsers(dest="step", required=True, metavar="STEP")
    r = steps.add_parser("run", help="run every stage of CONFIG.toml and write the sharded index")
    r.add_argument("config", help="pipeline configuration (TOML); see docs/scaling.md")
    r.add_argument("--address", help="Ray cluster address; default: embedded local Ray")
    r.set_defaults(func=_pipeline)


def _serve(args: argparse.Namespace) -> int:
    from persona4rec.sharded import ManifestError, read_manifest

    try:
        from persona4rec.scale import serve as served
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        read_manifest(args.index)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    resources = [r for r in (args.place_shards_on or "").split(",") if r]
    url = served.start(args.index, address=args.address, host=args.host, port=args.port,
                       replicas_per_shard=args.replicas_per_shard, shard_resources=resources or None,
                       shard_cpus=args.shard_cpus, retry_deadline_s=args.retry_deadline, verify=not args.no_verify)
    print(f"serving {args.index} at {url} (POST /search /rerank /explain, GET /health); Ctrl-C stops", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        served.stop()
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from persona4rec.scale import pipeline, require_ray

    try:
        require_ray()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return pipeline.main(args.config, address=args.address)
