"""``finetune``: contrastive fine-tuning of the text encoder itself (torch), exported back to ONNX.

The adapter (:mod:`persona4rec.train.adapter`) maps frozen embeddings. Fine-tuning
changes the encoder, so every vector has to be recomputed from text: a user profile is
the profiler's weighted mean of its history's text embeddings, and a persona is the
(weighted) mean of its texts' embeddings (an LLM persona is one text; a persona derived
from reviews is the mean of its reviews). Both are L2-normalised, as at serving.

Design, and why:

* **Frozen bottom, trainable top.** Only the top ``trainable_layers`` transformer layers
  learn (LoRA on their linear maps by default, or all their weights with
  ``lora_rank=0``). The frozen bottom's output for each text never changes, so it is
  computed once and kept (ragged, unpadded), and every training step and validation pass
  runs only the top layers. On a 2-core CPU this is what makes an epoch take minutes;
  ``trainable_layers=None`` trains every layer (embeddings stay frozen).
* **Batches grouped by user.** A user's consecutive training targets share most of
  their history, so a micro-batch takes chunks of up to ``pairs_per_user`` pairs of the
  same user and encodes each distinct text once. In-batch negatives of the same user and
  the same item are masked by default, as in the adapter.
* **Gradient accumulation and a cached-negative queue.** ``grad_accum`` micro-batches
  make one optimiser step; ``queue_size`` keeps the persona embeddings of recent
  micro-batches (detached) as extra negatives, so the effective number of negatives is
  not bounded by what fits in one forward pass.
* **Loss.** The adapter's in-batch InfoNCE (temperature, label smoothing, masks, the
  positive item's other personas as optional hard negatives), written in torch;
  :func:`infonce` matches :func:`persona4rec.train.adapter.infonce_loss` on the same input.
* **Export.** LoRA is merged into the weights, the model is saved as a
  sentence-transformers folder (the source's tokenizer and pooling config copied) and
  goes through :func:`persona4rec.export.export_encoder`: fp32 and int8 ONNX plus a
  manifest. Serving never imports torch.

Requires the ``train`` extra (``torch==2.13.0`` CPU build, transformers).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

# Linear maps of a BERT layer that LoRA adapts by default (attention and feed-forward).
LORA_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
# Files of a sentence-transformers folder that the exported model needs besides the weights.
_MODEL_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                     "sentence_bert_config.json", "modules.json", "config_sentence_transformers.json")


def _require_torch():
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "finetune needs torch and transformers: pip install 'persona4rec[train]' "
            "(torch is pinned to the CPU build 2.13.0; serving never needs it)"
        ) from exc
    return torch


# --------------------------------------------------------------------------------------
# configuration and data


@dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run; saved verbatim in its report."""

    trainable_layers: int | None = 2  # top layers that learn; None = all
    lora_rank: int = 16  # 0 = train the trainable layers' weights directly
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    max_length: int = 128  # training truncation (the export keeps the source's)
    temperature: float = 0.05
    label_smoothing: float = 0.05
    mask_same_user: bool = True
    mask_same_item: bool = True
    hard_negatives: bool = False
    max_hard_negatives: int = 8
    batch_size: int = 64  # pairs per micro-batch
    pairs_per_user: int = 4
    grad_accum: int = 1
    queue_size: int = 0
    lr: float = 5e-4
    weight_decay: float = 0.0
    epochs: int = 1
    patience: int = 2
    validate_every: int = 0  # optimiser steps between validations; 0 = once per epoch
    max_minutes: float | None = None  # stop training (not validation) after this long
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None = torch's default

    def validate(self) -> None:
        if self.trainable_layers is not None and self.trainable_layers < 1:
            raise ValueError(f"trainable_layers must be >= 1 or None (all), got {self.trainable_layers}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = no LoRA), got {self.lora_rank}")
        for name in ("temperature", "lr", "lora_alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("batch_size", "pairs_per_user", "grad_accum", "epochs", "max_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("queue_size", "patience", "validate_every", "max_hard_negatives"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "pairs_per_user", "grad_accum", "epochs", "max_length", "queue_size", "patience",
                     "validate_every", "max_hard_negatives"):
            if not isinstance(getattr(self, name), (int, np.integer)) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ValueError(f"max_minutes must be positive (or None for no limit), got {self.max_minutes!r}")
        if self.threads is not None and int(self.threads) < 1:
            raise ValueError(f"threads must be >= 1 (or None for torch's default), got {self.threads!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


def _csr(ptr: Any, idx: Any, weight: Any, n_texts: int, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ptr = np.asarray(ptr, np.int64)
    idx = np.asarray(idx, np.int64)
    w = np.asarray(weight, np.float32) if weight is not None else np.ones(len(idx), np.float32)
    if ptr.ndim != 1 or len(ptr) < 1 or ptr[0] != 0 or np.any(np.diff(ptr) < 1) or ptr[-1] != len(idx):
        raise ValueError(f"{what}: offsets must start at 0, grow by at least 1 (no empty group) and end at "
                         f"len(texts)={len(idx)}")
    if len(w) != len(idx) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{what}: one finite, non-negative weight per text is required")
    if len(idx) and (idx.min() < 0 or idx.max() >= n_texts):
        raise ValueError(f"{what}: text index out of range [0, {n_texts})")
    if len(idx) and np.any(np.add.reduceat(w, ptr[:-1]) <= 0):
        raise ValueError(f"{what}: a group's weights are all zero (its mean would be the zero vector)")
    return ptr, idx, w


@dataclass
class TextPairs:
    """Training pairs over a text table, for encoder fine-tuning.

    ``texts``: the distinct texts. Pair ``i``'s user profile is the weighted mean of
    texts ``profile_text[profile_ptr[i]:profile_ptr[i+1]]`` (weights ``profile_weight``,
    e.g. :func:`persona4rec.profile.recency_weights` of the profiler's selection). Persona
    ``p`` is the weighted mean of texts ``persona_text[persona_ptr[p]:persona_ptr[p+1]]``.
    ``item_ptr`` groups personas by item (CSR); ``pair_item``/``positive`` name each pair's
    target item and positive persona row; ``user`` masks same-user negatives;
    ``exclude`` (-1 for none) is a persona of the item never used as the pair's negative.
    """

    texts: Sequence[str]
    profile_ptr: np.ndarray
    profile_text: np.ndarray
    profile_weight: np.ndarray
    persona_ptr: np.ndarray
    persona_text: np.ndarray
    persona_weight: np.ndarray | None
    item_ptr: np.ndarray
    pair_item: np.ndarray
    positive: np.ndarray
    user: np.ndarray
    exclude: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.texts = list(self.texts)
        if any(not isinstance(t, str) or not t.strip() for t in self.texts):
            raise ValueError("texts must be non-empty strings")
        n_texts = len(self.texts)
        self.profile_ptr, self.profile_text, self.profile_weight = _csr(
            self.profile_ptr, self.profile_text, self.profile_weight, n_texts, "profile")
        self.persona_ptr, self.persona_text, self.persona_weight = _csr(
            self.persona_ptr, self.persona_text, self.persona_weight, n_texts, "persona")
        n = len(self.profile_ptr) - 1
        if n < 1:
            raise ValueError("no training pairs")
        n_personas = len(self.persona_ptr) - 1
        self.item_ptr = np.asarray(self.item_ptr, np.int64)
        if self.item_ptr.ndim != 1 or len(self.item_ptr) < 2 or self.item_ptr[0] != 0 or self.item_ptr[-1] != n_personas or np.any(np.diff(self.item_ptr) < 0):
            raise ValueError(f"item_ptr must be CSR offsets over the {n_personas} personas")
        self.pair_item = np.asarray(self.pair_item, np.int64)
        self.positive = np.asarray(self.positive, np.int64)
        self.user = np.asarray(self.user, np.int64)
        self.exclude = np.full(n, -1, np.int64) if self.exclude is None else np.asarray(self.exclude, np.int64)
        for name in ("pair_item", "positive", "user", "exclude"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have one entry per pair ({n}), got shape {getattr(self, name).shape}")
        if np.any(self.pair_item < 0) or np.any(self.pair_item >= len(self.item_ptr) - 1):
            raise ValueError("pair_item out of range of item_ptr")
        lo, hi = self.item_ptr[self.pair_item], self.item_ptr[self.pair_item + 1]
        bad = np.flatnonzero((self.positive < lo) | (self.positive >= hi))
        if len(bad):
            raise ValueError(f"pair {bad[0]}: positive persona {self.positive[bad[0]]} is not a persona of item "
                             f"{self.pair_item[bad[0]]}")
        if np.any(self.exclude == self.positive):
            raise ValueError("a pair's positive persona is also its excluded persona")

    def __len__(self) -> int:
        return len(self.profile_ptr) - 1

    @property
    def n_personas(self) -> int:
        return len(self.persona_ptr) - 1

    def hard_negatives(self, i: int, limit: int) -> list[int]:
        lo, hi = int(self.item_ptr[self.pair_item[i]]), int(self.item_ptr[self.pair_item[i] + 1])
        return [p for p in range(lo, hi) if p != self.positive[i] and p != self.exclude[i]][:limit]


# --------------------------------------------------------------------------------------
# loss


def infonce(users, personas, valid, *, temperature: float, label_smoothing: float, hard=None, hard_valid=None,
            extra=None, extra_valid=None):
    """Torch InfoNCE of normalised ``users`` (B, d) against in-batch ``personas`` (B, d).

    Same target and masking as :func:`persona4rec.train.adapter.infonce_loss`: columns are
    the in-batch positives (``valid`` (B, B)), each row's own hard negatives (``hard``
    (B, H, d), ``hard_valid`` (B, H)) and shared extra negatives such as the queue
    (``extra`` (Q, d), ``extra_valid`` (B, Q)). Returns (mean loss, top-1 accuracy).
    """
    import torch

    b = users.shape[0]
    parts = [torch.where(valid, users @ personas.T, torch.tensor(-math.inf))]
    if hard is not None and hard.shape[1] > 0:
        parts.append(torch.where(hard_valid, torch.einsum("bhd,bd->bh", hard, users), torch.tensor(-math.inf)))
    if extra is not None and extra.shape[0] > 0:
        parts.append(torch.where(extra_valid, users @ extra.T, torch.tensor(-math.inf)))
    logits = torch.cat(parts, dim=1) / temperature
    finite = torch.isfinite(logits)
    logp = torch.log_softmax(logits, dim=1)
    logp = torch.where(finite, logp, torch.zeros_like(logp))
    k = finite.sum(dim=1, keepdim=True).to(logits.dtype)
    target = torch.where(finite, label_smoothing / k, torch.zeros_like(logits))
    eye = torch.arange(b)
    target[eye, eye] += 1.0 - label_smoothing
    loss = -(target * logp).sum() / b
    accuracy = (logits.argmax(dim=1) == eye).float().mean()
    return loss, float(accuracy)


# --------------------------------------------------------------------------------------
# the model


def _lora_linear_class():
    import torch
    from torch import nn

    class LoRALinear(nn.Module):
        """``base(x) + (x A^T B^T) * alpha / r`` with B = 0 at start, so training starts at the base model."""

        def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
            super().__init__()
            self.base = base
            self.scale = alpha / rank
            self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
            self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
            with torch.no_grad():
                bound = 1.0 / math.sqrt(base.in_features)
                self.lora_a.uniform_(-bound, bound, generator=generator)

        def forward(self, x):
            return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

        def merged(self) -> nn.Linear:
            out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
            with torch.no_grad():
                out.weight.copy_(self.base.weight + (self.lora_b @ self.lora_a) * self.scale)
                if self.base.bias is not None:
                    out.bias.copy_(self.base.bias)
            return out

    return LoRALinear


def _read_pooling(model_dir: Path) -> str:
    """The pooling the export will also read (``1_Pooling/config.json``); mean or CLS only."""
    from persona4rec.encoder import POOLING_FILE, read_pooling

    if not (model_dir / POOLING_FILE).is_file():
        raise FileNotFoundError(f"{model_dir} has no {POOLING_FILE}: finetune needs a sentence-transformers folder "
                                "(its pooling decides what is trained and what is exported)")
    pooling = read_pooling(model_dir)
    if pooling not in ("mean", "cls"):
        raise ValueError(f"{model_dir}: {pooling!r} pooling cannot be fine-tuned here; mean or cls only")
    return pooling


class TextTower:
    """A BERT-style encoder split into a frozen bottom (outputs cached per text) and a trainable top."""

    def __init__(self, model_dir: str | os.PathLike, config: FinetuneConfig):
        torch = _require_torch()
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.model_dir = Path(model_dir)
        self.config = config
        if config.threads:
            torch.set_num_threads(int(config.threads))
        torch.manual_seed(config.seed)
        self.pooling = _read_pooling(self.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.tokenizer.padding_side = "right"  # the cache keeps the first `length` positions of each row
        self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True, attn_implementation="eager")
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if layers is None or not hasattr(self.model, "embeddings"):
            raise ValueError(f"{model_dir}: finetune supports BERT-style encoders (embeddings + encoder.layer); "
                             f"got {type(self.model).__name__}")
        self.layers = layers
        n = len(layers)
        self.n_top = n if config.trainable_layers is None else min(int(config.trainable_layers), n)
        self.n_bottom = n - self.n_top
        limit = int(getattr(self.model.config, "max_position_embeddings", config.max_length))
        if config.max_length > limit:
            raise ValueError(f"max_length {config.max_length} exceeds the model's {limit} positions; pass "
                             f"--max-length {limit} or less")
        self.model.eval()  # no dropout: the cached bottom and the top must see the same function
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.lora_modules: list[tuple[Any, str, Any]] = []
        gen = torch.Generator().manual_seed(config.seed)
        lora_cls = _lora_linear_class() if config.lora_rank else None
        for layer in layers[self.n_bottom:]:
            if lora_cls is None:
                for p in layer.parameters():
                    p.requires_grad_(True)
                continue
            for name, module in list(layer.named_modules()):
                if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t)
                                                               for t in config.lora_targets):
                    parent_name, _, child = name.rpartition(".")
                    parent = layer.get_submodule(parent_name) if parent_name else layer
                    wrapped = lora_cls(module, config.lora_rank, config.lora_alpha, gen)
                    setattr(parent, child, wrapped)
                    self.lora_modules.append((parent, child, wrapped))
            if not self.lora_modules:
                raise ValueError(f"no linear layer matches lora_targets {config.lora_targets}")
        self._cache: dict[int, Any] = {}

    def parameters(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- bottom (frozen, cached)

    def _run_layers(self, hidden, mask, layers):
        ext = self.model.get_extended_attention_mask(mask, mask.shape)
        for layer in layers:
            hidden = layer(hidden, attention_mask=ext)[0]
        return hidden

    def cache_bottom(self, texts: Sequence[str], ids: Sequence[int], batch_size: int = 64,
                     progress: Callable[[int], Any] | None = None) -> None:
        """Compute and keep the frozen bottom's output of each text (ids: their keys)."""
        torch = self.torch
        todo = [(i, t) for i, t in zip(ids, texts) if i not in self._cache]
        if not todo:
            return
        # tokenized once, unpadded; batches of similar length are padded as they are run
        tokens = self.tokenizer([t for _, t in todo], truncation=True, max_length=self.config.max_length)
        fields = list(tokens.keys())
        order = np.argsort([len(x) for x in tokens["input_ids"]], kind="stable")
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                enc = self.tokenizer.pad({f: [tokens[f][j] for j in rows] for f in fields}, return_tensors="pt")
                hidden = self.model.embeddings(input_ids=enc["input_ids"],
                                               token_type_ids=enc.get("token_type_ids"))
                hidden = self._run_layers(hidden, enc["attention_mask"], self.layers[:self.n_bottom])
                real = enc["attention_mask"].sum(dim=1)
                for row, j in enumerate(rows):
                    self._cache[todo[j][0]] = hidden[row, : int(real[row])].clone()
                if progress is not None:
                    progress(len(rows))

    # -- top (trainable)

    def encode_cached(self, ids: Sequence[int]):
        """L2-normalised embeddings (len(ids), d) of cached texts, through the trainable top."""
        torch = self.torch
        states = [self._cache[int(i)] for i in ids]
        longest = max(s.shape[0] for s in states)
        hidden = torch.zeros(len(states), longest, states[0].shape[1])
        mask = torch.zeros(len(states), longest, dtype=torch.long)
        for row, s in enumerate(states):
            hidden[row, : s.shape[0]] = s
            mask[row, : s.shape[0]] = 1
        out = self._run_layers(hidden, mask, self.layers[self.n_bottom:])
        if self.pooling == "cls":
            pooled = out[:, 0]
        else:
            m = mask.unsqueeze(-1).to(out.dtype)
            pooled = (out * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def embed(self, ids: Sequence[int], batch_size: int = 128) -> np.ndarray:
        """float32 embeddings of cached texts without gradients (validation)."""
        torch = self.torch
        ids = np.asarray(ids, np.int64)
        lengths = np.array([self._cache[int(i)].shape[0] for i in ids])
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(ids), self.model.config.hidden_size), np.float32)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                part = order[start:start + batch_size]
                out[part] = self.encode_cached(ids[part]).numpy()
        return out

    # -- export

    def save_model(self, out: str | os.PathLike) -> Path:
        """Merge LoRA into the weights and write a sentence-transformers folder."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for parent, child, wrapped in self.lora_modules:
            setattr(parent, child, wrapped.merged())
        try:
            self.model.save_pretrained(out, safe_serialization=True)
        finally:
            for parent, child, wrapped in self.lora_modules:
                setattr(parent, child, wrapped)
        for name in _MODEL_SIDE_FILES:
            if (self.model_dir / name).is_file():
                shutil.copyfile(self.model_dir / name, out / name)
        if (self.model_dir / "1_Pooling").is_dir():
            shutil.copytree(self.model_dir / "1_Pooling", out / "1_Pooling", dirs_exist_ok=True)
        return out


# --------------------------------------------------------------------------------------
# training


def _weighted_means(torch, emb, ptr: np.ndarray, idx: np.ndarray, weight: np.ndarray, groups: np.ndarray,
                    position: dict[int, int]):
    """Normalised weighted means of rows of ``emb`` for CSR ``groups`` (a differentiable sparse product)."""
    rows, cols, vals = [], [], []
    for r, g in enumerate(groups):
        lo, hi = int(ptr[g]), int(ptr[g + 1])
        rows.extend([r] * (hi - lo))
        cols.extend(position[int(t)] for t in idx[lo:hi])
        vals.extend(weight[lo:hi].tolist())
    w = torch.zeros(len(groups), emb.shape[0])
    w.index_put_((torch.tensor(rows), torch.tensor(cols)), torch.tensor(vals, dtype=emb.dtype), accumulate=True)
    return torch.nn.functional.normalize(w @ emb, dim=-1)


def user_chunks(pairs: TextPairs, per_user: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Pairs in chunks of at most ``per_user`` consecutive pairs of one user, in a random order."""
    chunks: list[np.ndarray] = []
    order = np.argsort(pairs.user, kind="stable")
    bounds = np.flatnonzero(np.diff(pairs.user[order])) + 1
    for group in np.split(order, bounds):
        chunks.extend(group[i:i + per_user] for i in range(0, len(group), per_user))
    return [chunks[i] for i in rng.permutation(len(chunks))]


def micro_batches(pairs: TextPairs, config: FinetuneConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Every pair once per epoch, in batches of whole user chunks (``batch_size`` up to
    ``batch_size + pairs_per_user - 1`` pairs); a last batch of one pair joins the one before."""
    batches, current, size = [], [], 0
    for chunk in user_chunks(pairs, config.pairs_per_user, rng):
        current.append(chunk)
        size += len(chunk)
        if size >= config.batch_size:
            batches.append(np.concatenate(current))
            current, size = [], 0
    if size:
        if size >= 2 or not batches:
            batches.append(np.concatenate(current))
        else:  # a single pair has no in-batch negative
            batches[-1] = np.concatenate([batches[-1], *current])
    return batches


@dataclass
class FinetuneResult:
    tower: TextTower
    report: dict[str, Any] = field(default_factory=dict)

    def write_report(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.report, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def finetune(
    model_dir: str | os.PathLike,
    pairs: TextPairs,
    config: FinetuneConfig | None = None,
    *,
    validate: Callable[[TextTower], float] | None = None,
    extra_texts: Sequence[str] = (),
    progress: bool = False,
    report_path: str | os.PathLike | None = None,
    say: Callable[[str], Any] | None = None,
) -> FinetuneResult:
    """Fine-tune the encoder in ``model_dir`` (a sentence-transformers folder) on ``pairs``.

    ``validate(tower) -> float`` (higher is better) runs before training and after each
    epoch (or every ``validate_every`` steps); the best weights are kept, so a run that
    never improves validation returns the untrained model. ``extra_texts`` are cached with
    the training texts (give the validation texts, keyed after them: text id
    ``len(pairs.texts) + j``). Deterministic for a given seed and thread count.
    """
    config = config or FinetuneConfig()
    config.validate()
    torch = _require_torch()
    say = say or (lambda message: None)
    started = time.perf_counter()
    tower = TextTower(model_dir, config)
    params = tower.parameters()
    all_texts = list(pairs.texts) + list(extra_texts)
    bar = _bar(len(all_texts), progress, "caching frozen layers", "text")
    tower.cache_bottom(all_texts, range(len(all_texts)), progress=None if bar is None else bar.update)
    if bar is not None:
        bar.close()
    cache_seconds = time.perf_counter() - started
    say(f"finetune: cached the frozen bottom ({tower.n_bottom} of {tower.n_bottom + tower.n_top} layers) of "
        f"{len(all_texts)} texts in {cache_seconds:.0f}s; training {sum(p.numel() for p in params):,} parameters")

    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    queue: list[tuple[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # vectors, items, users, personas, excluded
    curve: list[dict[str, Any]] = []
    best_state = {id(p): p.detach().clone() for p in params}
    best_metric = -math.inf
    best_step = 0
    validated_step = -1
    bad_rounds = 0
    losses: list[float] = []
    accuracies: list[float] = []

    def recent(values: list[float]) -> float | None:
        return float(np.mean(values[-50:])) if values else None

    def evaluate(epoch: int, step: int) -> None:
        """Validate the current weights once per step; keep them when they are the best so far."""
        nonlocal best_metric, best_step, best_state, validated_step, bad_rounds
        if validate is None or step == validated_step:
            return
        validated_step = step
        t = time.perf_counter()
        metric = float(validate(tower))
        loss, accuracy = recent(losses), recent(accuracies)
        curve.append({"epoch": epoch, "step": step, "train_loss": loss, "train_accuracy": accuracy,
                      "val_metric": metric, "val_seconds": round(time.perf_counter() - t, 2),
                      "elapsed": round(time.perf_counter() - started, 2)})
        say(f"finetune: epoch {epoch} step {step}: train loss "
            f"{'-' if loss is None else f'{loss:.4f}'}, val {metric:.4f}")
        if metric > best_metric:
            best_metric, best_step, bad_rounds = metric, step, 0
            best_state = {id(p): p.detach().clone() for p in params}
        else:
            bad_rounds += 1

    def out_of_patience() -> bool:
        return validate is not None and config.patience > 0 and bad_rounds >= config.patience

    evaluate(0, 0)
    step, epochs_run = 0, 0
    stopped_early = out_of_time = False
    # The time limit counts from the start of finetune (model load, frozen-layer cache and validations included).
    deadline = None if config.max_minutes is None else started + 60.0 * config.max_minutes
    for epoch in range(1, config.epochs + 1):
        batches = micro_batches(pairs, config, rng)
        bar = _bar(len(batches), progress, f"finetune epoch {epoch}", "batch")
        optimiser.zero_grad(set_to_none=True)
        pending = 0  # micro-batches accumulated since the last optimiser step
        for k, batch in enumerate(batches):
            group = min(config.grad_accum, len(batches) - (k - pending))  # the epoch's last group may be short
            loss, acc, entry = _micro_step(torch, tower, pairs, batch, config, queue)
            (loss / group).backward()
            pending += 1
            losses.append(float(loss.detach()))
            accuracies.append(acc)
            if config.queue_size:
                queue.append(entry)
                _trim_queue(queue, config.queue_size)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if pending == group:
                optimiser.step()
                optimiser.zero_grad(set_to_none=True)
                pending = 0
                step += 1
                if config.validate_every and step % config.validate_every == 0:
                    evaluate(epoch, step)
                    if out_of_patience():
                        stopped_early = True
                        break
            if deadline is not None and time.perf_counter() > deadline and pending == 0:
                out_of_time = True
                break
        if bar is not None:
            bar.close()
        epochs_run = epoch
        if not stopped_early:
            evaluate(epoch, step)  # the epoch's last weights (a no-op when this step was just validated)
            stopped_early = out_of_patience()
        if stopped_early or out_of_time:
            break
    if validate is None:
        best_step = step
    else:
        with torch.no_grad():
            for p in params:
                p.copy_(best_state[id(p)])
    window = min(20, len(losses))
    report = {
        "method": "finetune",
        "config": config.to_dict(),
        "model_dir": str(model_dir),
        "data": {"pairs": len(pairs), "texts": len(pairs.texts), "extra_texts": len(extra_texts),
                 "personas": pairs.n_personas, "users": int(len(np.unique(pairs.user)))},
        "layers": {"frozen": tower.n_bottom, "trained": tower.n_top, "pooling": tower.pooling},
        "max_length": {"training": config.max_length, "source": _source_max_length(tower)},
        "trainable_parameters": int(sum(p.numel() for p in params)),
        "cache_seconds": round(cache_seconds, 2),
        "curve": curve,
        "best_step": best_step,
        "best_val_metric": best_metric if validate is not None else None,
        "steps": step,
        "epochs_run": epochs_run,
        "stopped_early": stopped_early,
        "stopped_by_time_limit": out_of_time,
        "train_loss_first_last": ([float(np.mean(losses[:window])), float(np.mean(losses[-window:]))]
                                  if losses else None),
        "seconds": round(time.perf_counter() - started, 2),
    }
    result = FinetuneResult(tower, report)
    if report_path is not None:
        result.write_report(report_path)
    return result


def queue_valid_mask(positive, user, item, excluded, q_positive, q_user, q_item, config: FinetuneConfig) -> np.ndarray:
    """(B, Q) bool: queued persona j is a negative of row i unless it is the row's positive or
    excluded persona, or (as configured) belongs to the same user or the same item."""
    drop = (positive[:, None] == q_positive[None, :]) | ((excluded[:, None] == q_positive[None, :])
                                                         & (excluded[:, None] >= 0))
    if config.mask_same_user:
        drop |= user[:, None] == q_user[None, :]
    if config.mask_same_item:
        drop |= item[:, None] == q_item[None, :]
    return ~drop


def _trim_queue(queue: list, capacity: int) -> None:
    """Keep the newest ``capacity`` queued personas (the oldest entry is cut row-wise)."""
    total = sum(len(q[1]) for q in queue)
    while total > capacity:
        excess = total - capacity
        oldest = queue[0]
        if len(oldest[1]) <= excess:
            queue.pop(0)
            total -= len(oldest[1])
        else:
            queue[0] = tuple(part[excess:] for part in oldest)
            total -= excess


def _source_max_length(tower: TextTower) -> int | None:
    from persona4rec.encoder import read_max_length

    try:
        return int(read_max_length(tower.model_dir, None))
    except (ValueError, OSError, TypeError):
        return None


def _micro_step(torch, tower: TextTower, pairs: TextPairs, batch: np.ndarray, config: FinetuneConfig, queue):
    hard_rows: list[list[int]] = []
    if config.hard_negatives:
        hard_rows = [pairs.hard_negatives(int(i), config.max_hard_negatives) for i in batch]
    persona_rows = np.unique(np.concatenate([pairs.positive[batch]] + [np.asarray(h, np.int64) for h in hard_rows]))
    text_ids: set[int] = set()
    for i in batch:
        text_ids.update(pairs.profile_text[pairs.profile_ptr[i]:pairs.profile_ptr[i + 1]].tolist())
    for p in persona_rows:
        text_ids.update(pairs.persona_text[pairs.persona_ptr[p]:pairs.persona_ptr[p + 1]].tolist())
    ids = sorted(text_ids)
    position = {t: j for j, t in enumerate(ids)}
    emb = tower.encode_cached(ids)
    users = _weighted_means(torch, emb, pairs.profile_ptr, pairs.profile_text, pairs.profile_weight, batch, position)
    personas_all = _weighted_means(torch, emb, pairs.persona_ptr, pairs.persona_text, pairs.persona_weight,
                                   persona_rows, position)
    row_of = {int(p): j for j, p in enumerate(persona_rows)}
    positives = personas_all[[row_of[int(p)] for p in pairs.positive[batch]]]
    from persona4rec.train.adapter import in_batch_valid_mask

    items, users_ids, pos_ids = pairs.pair_item[batch], pairs.user[batch], pairs.positive[batch]
    excluded = pairs.exclude[batch]
    keep = in_batch_valid_mask(users_ids, items, pos_ids, mask_same_user=config.mask_same_user,
                               mask_same_item=config.mask_same_item)
    # a row's excluded persona (e.g. the user's own review of the target) is never its negative
    keep &= ~((excluded[:, None] == pos_ids[None, :]) & (excluded[:, None] >= 0))
    valid = torch.from_numpy(keep)
    hard = hard_valid = None
    if hard_rows:
        h = max((len(r) for r in hard_rows), default=0)
        if h:
            index = np.zeros((len(batch), h), np.int64)
            hv = np.zeros((len(batch), h), bool)
            for r, rows in enumerate(hard_rows):
                index[r, : len(rows)] = [row_of[int(p)] for p in rows]
                hv[r, : len(rows)] = True
            hard = personas_all[torch.from_numpy(index)]
            hard_valid = torch.from_numpy(hv)
    extra = extra_valid = None
    if queue:
        extra = torch.cat([q[0] for q in queue])
        q_items = np.concatenate([q[1] for q in queue])
        q_users = np.concatenate([q[2] for q in queue])
        q_pos = np.concatenate([q[3] for q in queue])
        extra_valid = torch.from_numpy(queue_valid_mask(pos_ids, users_ids, items, excluded, q_pos, q_users, q_items,
                                                        config))
    loss, acc = infonce(users, positives, valid, temperature=config.temperature,
                        label_smoothing=config.label_smoothing, hard=hard, hard_valid=hard_valid,
                        extra=extra, extra_valid=extra_valid)
    return loss, acc, (positives.detach(), items, users_ids, pos_ids, excluded)


def _bar(total: int, enabled: bool, desc: str, unit: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, leave=False)


def export_finetuned(result: FinetuneResult | TextTower, out: str | os.PathLike, *, name: str | None = None,
                     int8: bool = True, max_length: int | None = None, overwrite: bool = False,
                     allow_low_int8_agreement: bool = False) -> Path:
    """Write the fine-tuned model to ``out/model`` (merged weights) and its ONNX export to ``out/onnx``.

    The ONNX folder is what :class:`persona4rec.encoder.Encoder` loads; its manifest names
    the fine-tuned model, so its fingerprint (and any embedding cache keyed by it) differs
    from the base model's. ``max_length`` is the serving truncation (default: the source
    model's, which may be longer than the training truncation ``config.max_length``).
    """
    from persona4rec.export import export_encoder

    tower = result.tower if isinstance(result, FinetuneResult) else result
    out = Path(out)
    model_dir = tower.save_model(out / "model")
    return export_encoder(model_dir, out / "onnx", int8=int8, name=name or f"{tower.model_dir.name}-finetuned",
                          pooling=tower.pooling, max_length=max_length, overwrite=overwrite,
                          allow_low_int8_agreement=allow_low_int8_agreement)
