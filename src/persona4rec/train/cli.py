"""`persona4rec train-adapter`: train the user-persona adapter on a dataset and compare it with no training.

Heavy imports (the encoder, the data loaders, the harness) happen inside ``run``.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "train-adapter",
        help="train the numpy user-persona adapter on a dataset's training split; evaluate it against no training",
        description=(
            "Embed the dataset's reviews with the project's encoder, build item personas from training reviews, "
            "train adapter variants with early stopping on validation NDCG@10, and report test NDCG@10 / HR@10 "
            "(bootstrap CIs, paired p-values against no training) and persona-selection accuracy."
        ),
    )
    p.add_argument("--dataset", default="amazon-mi-5core", help="registered dataset name (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="directory holding the dataset files (else the registry's search)")
    p.add_argument("--out", required=True, help="output directory: adapters (.npz), run reports, evaluation.json/.md")
    p.add_argument("--tie-break", choices=("random", "file"), default="random",
                   help="order of same-timestamp reviews in the split (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the random tie-break")
    p.add_argument("--personas", choices=("reviews", "mean"), default="reviews",
                   help="item personas: every training review, or one mean vector per item (default: %(default)s)")
    p.add_argument("--variants", default="adapter,adapter+persona_side,adapter+hard_negatives",
                   help="comma-separated variants to train (from: adapter, adapter+persona_side, "
                        "adapter+hard_negatives); 'none' is always evaluated")
    p.add_argument("--rank", type=int, default=None, help="low-rank map of this rank (default: full d x d)")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--label-smoothing", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--no-mask-same-user", action="store_true", help="keep in-batch negatives of the same user")
    p.add_argument("--no-mask-same-item", action="store_true", help="keep in-batch negatives of the same item")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: the package cache)/embeddings")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from persona4rec.train.adapter import AdapterConfig
    from persona4rec.train.experiment import DEFAULT_VARIANTS, prepare_data, run_experiment

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in DEFAULT_VARIANTS]
    if unknown:
        raise SystemExit(f"train-adapter: unknown variant(s) {unknown}; known: {sorted(DEFAULT_VARIANTS)}")
    config = AdapterConfig(
        rank=args.rank, temperature=args.temperature, label_smoothing=args.label_smoothing, lr=args.lr,
        weight_decay=args.weight_decay, batch_size=args.batch_size, epochs=args.epochs, patience=args.patience,
        mask_same_user=not args.no_mask_same_user, mask_same_item=not args.no_mask_same_item, seed=args.seed,
    )
    try:
        config.validate()
    except ValueError as exc:
        raise SystemExit(f"train-adapter: {exc}") from exc
    data = prepare_data(args.dataset, data_dir=args.data_dir, tie_break=args.tie_break, seed=args.split_seed,
                        cache_dir=args.cache_dir, progress=not args.no_progress)
    summary = run_experiment(data, persona_kind=args.personas, config=config,
                             variants={n: DEFAULT_VARIANTS[n] for n in names}, out_dir=args.out,
                             progress=not args.no_progress)
    from persona4rec.train.experiment import format_table

    print(format_table(summary), end="")
    return 0
