"""`persona4rec evaluate`: the whole evaluation pipeline on a registered dataset."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate baselines, dense and persona scoring on a review dataset",
                       description=__doc__)
    p.add_argument("--dataset", default="amazon-mi-5core", help="registered dataset name (default: %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the dataset files (default: $PERSONA4REC_SHARED/data/<dataset>, then the cache)")
    p.add_argument("--split", choices=["loo", "temporal"], default="loo",
                   help="loo: per user, last review = test, second to last = validation; temporal: global time cuts "
                        "(train, then --valid-share, then --test-share of the reviews by time), each user's first "
                        "review of a period is their target (default: %(default)s)")
    p.add_argument("--valid-share", type=float, default=0.1, help="temporal: share of reviews in the validation period")
    p.add_argument("--test-share", type=float, default=0.1, help="temporal: share of reviews in the test period")
    p.add_argument("--tie-break", choices=["random", "file"], default="random",
                   help="order of same-timestamp reviews in the split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tie-break, k-means, BPR and bootstrap")
    p.add_argument("--max-personas", type=int, default=None,
                   help="personas per item at most; default: chosen on validation from 1, 2, 3, 5, 8")
    p.add_argument("--reviews-per-persona", type=int, default=2,
                   help="an item with n train reviews gets n // this many personas (default: %(default)s)")
    p.add_argument("--personas", default=None, metavar="FILE",
                   help="LLM personas (3_personas.jsonl[.gz] rows) to use instead of extractive ones; "
                        "items the file lacks keep extractive personas")
    p.add_argument("--trust-personas", action="store_true",
                   help="accept a --personas file whose rows do not list the review_ids they were written from "
                        "(rows that name a held-out review are refused regardless)")
    p.add_argument("--adapter", default=None, metavar="FILE",
                   help="a trained user-persona adapter (.npz from `persona4rec train-adapter`): user profiles go through "
                        "it, and personas and item vectors through its persona-side map when it has one")
    p.add_argument("--out", default=None, help="report folder (default: reports/evaluate/<dataset>-<tie-break>, "
                                               "with -adapter-<file stem> appended under --adapter)")
    p.add_argument("--encoder-dir", default=None, help="ONNX encoder folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--quantized-encoder", action="store_true", help="use the int8 encoder (faster, slightly different)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads for encoding (0 = all cores)")
    p.add_argument("--embedding-cache", default=None,
                   help="interaction-embedding cache folder (default: the per-user one of persona4rec.profile)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=run)


def default_out(args: argparse.Namespace) -> str:
    """The report folder when --out is not given; an adapter run never overwrites the plain one."""
    split = getattr(args, "split", "loo")
    out = f"reports/evaluate/{args.dataset}-{args.tie_break}" + ("" if split == "loo" else f"-{split}")
    return f"{out}-adapter-{Path(args.adapter).name.removesuffix('.npz')}" if args.adapter else out


def run(args: argparse.Namespace) -> int:
    from persona4rec.default_model import load_default_encoder
    from persona4rec.evaluation.provenance import PersonaProvenanceError
    from persona4rec.evaluation.report import markdown_table, write_report
    from persona4rec.evaluation.runner import AdapterFileError, Evaluation, EvaluationConfig, load_adapter

    started = time.perf_counter()

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    config = EvaluationConfig(dataset=args.dataset, data_dir=args.data_dir, split=args.split,
                              valid_share=args.valid_share, test_share=args.test_share,
                              tie_break=args.tie_break, seed=args.seed,
                              **({"max_personas": args.max_personas, "max_personas_grid": ()}
                                 if args.max_personas is not None else {}),
                              reviews_per_persona=args.reviews_per_persona,
                              persona_file=args.personas, trust_personas=args.trust_personas,
                              adapter_file=args.adapter)
    try:
        if args.adapter:  # a bad file fails before the encoder loads; its dimension is checked after
            say(f"adapter: {load_adapter(args.adapter)!r} from {args.adapter}")
        say("loading the encoder (the first run exports the packaged model once)")
        encoder = load_default_encoder(quantized=args.quantized_encoder, model_dir=args.encoder_dir,
                                       intra_op_threads=args.threads)
        evaluation = Evaluation(config, encoder, progress=say, cache=args.embedding_cache)
    except AdapterFileError as exc:
        raise SystemExit(f"persona4rec evaluate: --adapter: {exc}") from None
    try:
        report = evaluation.run()
    except PersonaProvenanceError as exc:
        raise SystemExit(f"persona4rec evaluate: --personas: {exc}") from None
    report["timings_s"]["wall_including_encoder_load"] = round(time.perf_counter() - started, 1)
    out = args.out or default_out(args)
    paths = write_report(report, out, plots=not args.no_plots)
    print(markdown_table(report))
    print()
    headline = report["headline"]
    print(f"headline (chosen on validation): {headline['method']} [{headline['setting']}], alpha "
          f"{headline['alpha']:.2f}")
    for p in report["p_values"]:
        print(f"p({p['a']} vs {p['b']}, NDCG@10) = {p['p_value']:.4f}, Holm {p['p_holm']:.4f}  "
              f"({p['mean_a']:.4f} vs {p['mean_b']:.4f})")
    print()
    for ex in report["examples"]:
        print(f"user {ex['user_id']}: recently " + "; ".join(h["title"][:50] for h in ex["recent_history"][-3:]))
        print(f"  held out: {ex['held_out']['title'][:70]}")
        for r in ex["recommendations"]:
            mark = "  <- held-out item" if r["is_held_out_item"] else ""
            print(f"  {r['rank']}. {r['title'][:60]}  [persona: {r['persona'][:60]}]{mark}")
    print(f"\nreport: {paths['markdown'].parent} ({', '.join(p.name for p in paths.values())}); "
          f"total {report['timings_s']['wall_including_encoder_load']:.0f}s")
    return 0
