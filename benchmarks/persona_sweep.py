"""Validation sweep of the extractive-persona settings on MI-5core (choices on validation only).

    PERSONA4REC_SHARED=../shared python benchmarks/persona_sweep.py [--cache DIR] [--tie-break random]

Prints validation NDCG@10 (full ranking, persona max-sim) for each (max_personas,
reviews_per_persona), plus the dense single vector and every-review max-sim, all from
the same cached review embeddings (run `persona4rec evaluate` first to fill the cache).
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    from persona4rec.default_model import load_default_encoder
    from persona4rec.evaluation.metrics import ndcg, ranks_from_scores
    from persona4rec.evaluation.runner import Evaluation, EvaluationConfig, index_scores, make_index
    from persona4rec.evaluation.candidates import exclude_history

    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default=None)
    parser.add_argument("--tie-break", default="random")
    args = parser.parse_args()
    ev = Evaluation(EvaluationConfig(tie_break=args.tie_break), load_default_encoder(intra_op_threads=0),
                    cache=args.cache)
    ev.load()
    ev.encode_texts()
    ev.build_item_side()
    ev.build_profiles()
    d = ev.data

    def valid_ndcg(scores: np.ndarray) -> float:
        return float(ndcg(ranks_from_scores(scores, d.valid_targets), 10).mean())

    dense = exclude_history(ev.valid_profiles @ ev.item_vectors.T, d.train_matrix, d.eval_users)
    print(f"dense single-vector: valid NDCG@10 {valid_ndcg(dense):.4f}")
    every = index_scores(make_index(ev.review_personas), ev.valid_profiles, d.train_matrix, d.eval_users)
    print(f"every review a persona ({ev.review_personas.n_personas} vectors): valid NDCG@10 {valid_ndcg(every):.4f}")
    print("max_personas reviews_per_persona n_personas valid_NDCG@10")
    train = d.split.train
    for max_personas in (1, 2, 3, 5, 8):
        for per in (1, 2, 3):
            if max_personas == 1 and per > 1:
                continue
            personas = ev._personas(train, max_personas, per)
            scores = index_scores(make_index(personas), ev.valid_profiles, d.train_matrix, d.eval_users)
            print(f"{max_personas:12d} {per:17d} {personas.n_personas:10d} {valid_ndcg(scores):.4f}", flush=True)


if __name__ == "__main__":
    main()
