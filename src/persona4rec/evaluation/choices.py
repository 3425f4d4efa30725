"""The one home of choices made on validation: CF hyper-parameters and the fusion weight.

The harness (:mod:`persona4rec.evaluation.runner`) and the alignment experiments
(:mod:`persona4rec.evaluation.alignment`) both choose through these functions, on validation
NDCG@10, and never look at test scores to choose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import scipy.sparse as sp

from persona4rec.evaluation.candidates import exclude_history, fuse
from persona4rec.evaluation.metrics import ndcg, ranks_from_scores


@dataclass
class PhaseData:
    """What scoring one phase needs: the users, their known history and their targets."""

    users: np.ndarray
    history: sp.csr_matrix
    targets: np.ndarray


@dataclass
class CFChoice:
    """A CF model chosen on validation, with its history-excluded scores on both phases."""

    params: dict[str, Any]
    model: Any
    valid_ndcg: float
    valid_scores: np.ndarray
    test_scores: np.ndarray | None = None


def phase_scores(model: Any, phase: PhaseData) -> np.ndarray:
    """``model.score`` for the phase's users from their known history, history items -inf."""
    return exclude_history(model.score(phase.history, phase.users), phase.history, phase.users)


def mean_ndcg10(scores: np.ndarray, targets: np.ndarray) -> float:
    return float(ndcg(ranks_from_scores(scores, targets), 10).mean())


def choose_cf(make: Callable[..., Any], grid: Sequence[dict[str, Any]], train: sp.csr_matrix, valid: PhaseData,
              test: PhaseData | None = None) -> CFChoice:
    """Fit ``make(**params)`` on ``train`` for every grid point; keep the best validation
    NDCG@10 (ties: the earlier grid point); score the test phase with that model only."""
    best: CFChoice | None = None
    for params in grid:
        model = make(**params).fit(train)
        scores = phase_scores(model, valid)
        value = mean_ndcg10(scores, valid.targets)
        if best is None or value > best.valid_ndcg:
            best = CFChoice(dict(params), model, value, scores)
    if best is None:
        raise ValueError("the hyper-parameter grid is empty")
    if test is not None:
        best.test_scores = phase_scores(best.model, test)
    return best


def choose_alpha(valid_ranks: Callable[[float], np.ndarray], grid: Sequence[float]) -> tuple[float, dict[str, float]]:
    """The fusion weight with the best validation NDCG@10 (ties: the smaller alpha) and the
    curve; ``valid_ranks(alpha)`` gives the validation targets' ranks under that weight."""
    curve = {f"{a:.2f}": round(float(ndcg(valid_ranks(a), 10).mean()), 5) for a in grid}
    best = max(grid, key=lambda a: (curve[f"{a:.2f}"], -a))
    return float(best), curve


def choose_full_fusion_alpha(text_valid: np.ndarray, base_valid: np.ndarray, targets: np.ndarray,
                             grid: Sequence[float]) -> tuple[float, dict[str, float]]:
    """:func:`choose_alpha` for ``fuse(text, base, alpha)`` over the full catalog."""
    return choose_alpha(lambda a: ranks_from_scores(fuse(text_valid, base_valid, a), targets), grid)
