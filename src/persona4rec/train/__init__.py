"""User-persona alignment training (issue 7).

``adapter`` (numpy, no torch): a residual map ``x -> normalise(x + x A)`` on the user side
(and optionally the persona side) over frozen, cached embeddings, trained with in-batch
InfoNCE. See docs/training.md.
"""

from persona4rec.train.adapter import (
    Adapter,
    AdapterConfig,
    TrainResult,
    infonce_loss,
    persona_selection_accuracy,
    train_adapter,
)
from persona4rec.train.pairs import (
    JudgeSelection,
    TrainingPairs,
    parse_judge_selections,
    review_grounded_selection,
    selection_agreement,
)

__all__ = [
    "Adapter",
    "AdapterConfig",
    "JudgeSelection",
    "TrainResult",
    "TrainingPairs",
    "infonce_loss",
    "parse_judge_selections",
    "persona_selection_accuracy",
    "review_grounded_selection",
    "selection_agreement",
    "train_adapter",
]
