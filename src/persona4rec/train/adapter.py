"""The `adapter` alignment method: a residual map over frozen embeddings, trained in numpy.

The base encoder stays frozen. A user profile ``u`` (and optionally a persona vector ``p``)
goes through ``x -> normalise(x + x @ A)`` where ``A`` is a full ``d x d`` matrix or a
low-rank product ``P @ Q``. ``A`` starts at zero (``Q`` at zero for low rank), so an
untrained adapter is the identity on normalised inputs.

The loss is in-batch InfoNCE over user x persona cosine similarities divided by a
temperature, with label smoothing spread over the row's valid columns, optional masking of
in-batch negatives that share the row's user or item (or are the very same persona), and
optional per-row hard negatives (the other personas of the positive item).

Everything here is numpy; the hot parts are BLAS matrix products.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from persona4rec.train.pairs import TrainingPairs

FORMAT_NAME = "persona4rec.adapter"
FORMAT_VERSION = 1
REPORT_VERSION = 1

_SIDES = ("user", "persona")


# --------------------------------------------------------------------------------------
# configuration


@dataclass
class AdapterConfig:
    """Hyper-parameters of adapter training (all have defaults; see docs/training.md)."""

    rank: int | None = None  # None: full d x d map; an int r: low-rank P (d x r) @ Q (r x d)
    persona_side: bool = False  # also train a residual map on the persona side
    temperature: float = 0.1
    label_smoothing: float = 0.05
    mask_same_user: bool = True  # in-batch negatives of the same user are masked
    mask_same_item: bool = True  # in-batch negatives of the same target item are masked
    hard_negatives: bool = False  # add the positive item's other personas as negatives
    batch_size: int = 256
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.0  # decoupled (AdamW-style) decay of the residual towards 0
    patience: int = 5  # epochs without validation improvement before stopping
    min_delta: float = 0.0
    seed: int = 0
    lowrank_init_scale: float = 0.02  # std of the random factor P of a low-rank map

    def validate(self) -> None:
        if self.rank is not None and (not isinstance(self.rank, (int, np.integer)) or self.rank < 1):
            raise ValueError(f"rank must be None or a positive int, got {self.rank!r}")
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not (0.0 <= self.label_smoothing < 1.0):
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs!r}")
        if not (self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# the map and its backward pass


def _param_names(side: str, rank: int | None) -> tuple[str, ...]:
    return (f"{side}.A",) if rank is None else (f"{side}.P", f"{side}.Q")


def init_params(dim: int, config: AdapterConfig, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Parameters of an identity adapter: A = 0, or P random small and Q = 0."""
    rng = rng if rng is not None else np.random.default_rng(config.seed)
    params: dict[str, np.ndarray] = {}
    sides = _SIDES if config.persona_side else _SIDES[:1]
    for side in sides:
        if config.rank is None:
            params[f"{side}.A"] = np.zeros((dim, dim), np.float32)
        else:
            r = int(config.rank)
            params[f"{side}.P"] = (rng.standard_normal((dim, r)) * config.lowrank_init_scale).astype(np.float32)
            params[f"{side}.Q"] = np.zeros((r, dim), np.float32)
    return params


def _residual(x: np.ndarray, params: Mapping[str, np.ndarray], side: str) -> np.ndarray:
    """x + x @ A (x is (..., d)); identity when the side has no parameters."""
    a = params.get(f"{side}.A")
    if a is not None:
        return x + x @ a
    p = params.get(f"{side}.P")
    if p is not None:
        return x + (x @ p) @ params[f"{side}.Q"]
    return x


def _normalise(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.sqrt(np.sum(y * y, axis=-1, keepdims=True))
    norms = np.maximum(norms, np.finfo(y.dtype).tiny)
    return y / norms, norms


def _normalise_backward(yn: np.ndarray, norms: np.ndarray, d_yn: np.ndarray) -> np.ndarray:
    return (d_yn - yn * np.sum(yn * d_yn, axis=-1, keepdims=True)) / norms


def _residual_backward(
    x: np.ndarray, d_y: np.ndarray, params: Mapping[str, np.ndarray], side: str, grads: dict[str, np.ndarray]
) -> None:
    """Accumulate d loss / d params of y = x + x @ A given d_y; x and d_y are (n, d)."""
    if f"{side}.A" in params:
        g = x.T @ d_y
        key = f"{side}.A"
        grads[key] = grads[key] + g if key in grads else g
    elif f"{side}.P" in params:
        p, q = params[f"{side}.P"], params[f"{side}.Q"]
        xp = x @ p
        gq = xp.T @ d_y
        gp = x.T @ (d_y @ q.T)
        for key, g in ((f"{side}.P", gp), (f"{side}.Q", gq)):
            grads[key] = grads[key] + g if key in grads else g


# --------------------------------------------------------------------------------------
# loss


def in_batch_valid_mask(
    user_ids: np.ndarray | None,
    item_ids: np.ndarray | None,
    positive_ids: np.ndarray | None,
    *,
    mask_same_user: bool,
    mask_same_item: bool,
) -> np.ndarray:
    """(B, B) bool, True where column j is a usable logit for row i (the diagonal always is).

    Column j != i is dropped when it is the row's own positive persona again (same
    ``positive_ids``, always), or, as options, when it belongs to the same user or the same
    target item as row i.
    """
    sizes = [len(a) for a in (user_ids, item_ids, positive_ids) if a is not None]
    if not sizes:
        raise ValueError("in_batch_valid_mask needs at least one id array")
    b = sizes[0]
    drop = np.zeros((b, b), bool)
    if positive_ids is not None:
        pid = np.asarray(positive_ids)
        drop |= (pid[:, None] == pid[None, :]) & (pid[:, None] >= 0)
    if mask_same_user and user_ids is not None:
        uid = np.asarray(user_ids)
        drop |= uid[:, None] == uid[None, :]
    if mask_same_item and item_ids is not None:
        iid = np.asarray(item_ids)
        drop |= iid[:, None] == iid[None, :]
    np.fill_diagonal(drop, False)
    return ~drop


def infonce_loss(
    params: Mapping[str, np.ndarray],
    users: np.ndarray,
    positives: np.ndarray,
    *,
    temperature: float,
    label_smoothing: float = 0.05,
    valid: np.ndarray | None = None,
    hard_negatives: np.ndarray | None = None,
    hard_valid: np.ndarray | None = None,
    need_grad: bool = True,
) -> tuple[float, dict[str, np.ndarray], dict[str, Any]]:
    """In-batch InfoNCE of one batch, and its gradients with respect to ``params``.

    users, positives: (B, d). valid: (B, B) bool (None: all valid). hard_negatives:
    (B, H, d) with hard_valid (B, H) bool. Row i's logits are the cosine similarities of its
    mapped, normalised user vector with every in-batch positive and its own hard negatives,
    divided by the temperature; masked columns are removed. The target puts 1 - eps on the
    row's positive and spreads eps uniformly over the row's K valid columns (positive
    included). Returns (mean loss, grads, stats) where stats has the batch's top-1 accuracy.
    """
    b, d = users.shape
    if positives.shape != (b, d):
        raise ValueError(f"positives shape {positives.shape} != users shape {users.shape}")
    if b < 1:
        raise ValueError("empty batch")
    tau = float(temperature)
    eps = float(label_smoothing)
    if valid is None:
        valid = np.ones((b, b), bool)
    elif valid.shape != (b, b):
        raise ValueError(f"valid mask shape {valid.shape} != {(b, b)}")
    if not np.all(np.diagonal(valid)):
        raise ValueError("the diagonal (each row's positive) must be valid")

    yu = _residual(users, params, "user")
    un, u_norm = _normalise(yu)
    yp = _residual(positives, params, "persona")
    pn, p_norm = _normalise(yp)
    logits = (un @ pn.T) / tau  # (B, B)
    parts = [np.where(valid, logits, -np.inf)]
    use_hard = hard_negatives is not None and hard_negatives.shape[1] > 0
    if use_hard:
        h = hard_negatives.shape[1]
        if hard_negatives.shape != (b, h, d):
            raise ValueError(f"hard_negatives shape {hard_negatives.shape} != {(b, h, d)}")
        if hard_valid is None:
            hard_valid = np.ones((b, h), bool)
        elif hard_valid.shape != (b, h):
            raise ValueError(f"hard_valid shape {hard_valid.shape} != {(b, h)}")
        flat = hard_negatives.reshape(b * h, d)
        yh = _residual(flat, params, "persona")
        hn, h_norm = _normalise(yh)
        hn3 = hn.reshape(b, h, d)
        hlogits = np.matmul(hn3, un[:, :, None])[:, :, 0] / tau  # (B, H)
        parts.append(np.where(hard_valid, hlogits, -np.inf))
    full = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    fvalid = np.isfinite(full)
    m = np.max(full, axis=1, keepdims=True)
    ex = np.where(fvalid, np.exp(full - m), 0.0)
    z = np.sum(ex, axis=1, keepdims=True)
    logp = np.where(fvalid, full - m - np.log(z), 0.0)
    k = np.sum(fvalid, axis=1, keepdims=True).astype(full.dtype)
    target = np.where(fvalid, eps / k, 0.0).astype(full.dtype)
    target[np.arange(b), np.arange(b)] += 1.0 - eps
    loss = float(-np.sum(target * logp) / b)
    acc = float(np.mean(np.argmax(full, axis=1) == np.arange(b)))
    stats = {"accuracy": acc}
    grads: dict[str, np.ndarray] = {}
    if not need_grad:
        return loss, grads, stats

    g = (ex / z - target) / b  # d loss / d logits (0 at masked columns)
    g = g.astype(users.dtype, copy=False)
    gb = g[:, :b]
    d_un = (gb @ pn) / tau
    d_pn = (gb.T @ un) / tau
    if use_hard:
        gh = g[:, b:]
        d_un += np.matmul(gh[:, None, :], hn3)[:, 0, :] / tau
        d_hn = (gh[:, :, None] * un[:, None, :]).reshape(b * h, d) / tau
    _residual_backward(users, _normalise_backward(un, u_norm, d_un), params, "user", grads)
    if any(key.startswith("persona.") for key in params):
        _residual_backward(positives, _normalise_backward(pn, p_norm, d_pn), params, "persona", grads)
        if use_hard:
            _residual_backward(flat, _normalise_backward(hn, h_norm, d_hn), params, "persona", grads)
    for key in params:
        if key not in grads:
            grads[key] = np.zeros_like(params[key])
    return loss, grads, stats


# --------------------------------------------------------------------------------------
# the trained object


def _check_vectors(x: Any, dim: int, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{what}: expected shape (d,) or (n, d), got {arr.shape}")
    if arr.shape[-1] != dim:
        raise ValueError(f"{what}: last dimension {arr.shape[-1]} != adapter dimension {dim}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what}: expected floating-point vectors, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: contains NaN or infinite values")
    return arr


class Adapter:
    """A trained (or identity) residual map for user profiles and, optionally, personas.

    ``adapter(x)`` / ``adapter.apply(x)`` maps user-side vectors: (d,) or (n, d) floats in,
    float32 L2-normalised rows of the same shape out, so an ``Adapter`` can be passed as the
    ``transform`` of a profile builder. ``apply_persona`` maps persona vectors (the identity
    plus normalisation when no persona-side map was trained).
    """

    def __init__(self, dim: int, params: Mapping[str, np.ndarray] | None = None, *, meta: Mapping[str, Any] | None = None):
        if int(dim) < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = int(dim)
        self.params: dict[str, np.ndarray] = {}
        for key, val in (params or {}).items():
            side, _, kind = key.partition(".")
            if side not in _SIDES or kind not in ("A", "P", "Q"):
                raise ValueError(f"unknown adapter parameter {key!r}")
            self.params[key] = np.ascontiguousarray(val, dtype=np.float32)
        for side in _SIDES:
            if f"{side}.A" in self.params:
                if self.params[f"{side}.A"].shape != (self.dim, self.dim):
                    raise ValueError(f"{side}.A must be {(self.dim, self.dim)}, got {self.params[f'{side}.A'].shape}")
                if f"{side}.P" in self.params or f"{side}.Q" in self.params:
                    raise ValueError(f"{side}: both a full and a low-rank map given")
            elif (f"{side}.P" in self.params) != (f"{side}.Q" in self.params):
                raise ValueError(f"{side}: low-rank map needs both P and Q")
            elif f"{side}.P" in self.params:
                p, q = self.params[f"{side}.P"], self.params[f"{side}.Q"]
                if p.ndim != 2 or q.ndim != 2 or p.shape[0] != self.dim or q.shape != (p.shape[1], self.dim):
                    raise ValueError(f"{side}: low-rank shapes P {p.shape}, Q {q.shape} do not fit dim {self.dim}")
        for key, val in self.params.items():
            if not np.all(np.isfinite(val)):
                raise ValueError(f"adapter parameter {key} contains NaN or infinite values")
        self.meta: dict[str, Any] = dict(meta or {})

    @classmethod
    def identity(cls, dim: int) -> "Adapter":
        return cls(dim)

    @property
    def rank(self) -> int | None:
        p = self.params.get("user.P")
        return None if p is None else int(p.shape[1])

    @property
    def has_persona_map(self) -> bool:
        return any(k.startswith("persona.") for k in self.params)

    def _apply(self, x: Any, side: str, what: str) -> np.ndarray:
        arr = _check_vectors(x, self.dim, what)
        single = arr.ndim == 1
        rows = arr[None, :] if single else arr
        out, _ = _normalise(_residual(rows, self.params, side))
        out = np.ascontiguousarray(out, dtype=np.float32)
        return out[0] if single else out

    def apply(self, x: Any) -> np.ndarray:
        """Map user-side vectors ((d,) or (n, d)); returns float32 L2-normalised rows."""
        return self._apply(x, "user", "Adapter.apply")

    __call__ = apply

    def apply_persona(self, x: Any) -> np.ndarray:
        """Map persona vectors ((d,) or (n, d)); identity + normalisation without a persona map."""
        return self._apply(x, "persona", "Adapter.apply_persona")

    # persistence -------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dim": self.dim,
            "params": sorted(self.params),
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` (no pickle): the parameter arrays plus a JSON header."""
        header = json.dumps(self.header(), sort_keys=True).encode("utf-8")
        arrays = {f"param:{k}": v for k, v in self.params.items()}
        arrays["header"] = np.frombuffer(header, dtype=np.uint8)
        path = os.fspath(path)
        tmp = path + ".tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Adapter":
        with np.load(os.fspath(path), allow_pickle=False) as data:
            if "header" not in data.files:
                raise ValueError(f"{path}: not a persona4rec adapter file (no header)")
            try:
                header = json.loads(bytes(data["header"].astype(np.uint8)).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: unreadable adapter header: {exc}") from exc
            if header.get("format") != FORMAT_NAME:
                raise ValueError(f"{path}: format {header.get('format')!r} is not {FORMAT_NAME!r}")
            if header.get("version") != FORMAT_VERSION:
                raise ValueError(
                    f"{path}: adapter format version {header.get('version')!r} is not supported "
                    f"(this build reads version {FORMAT_VERSION})"
                )
            params = {}
            for key in header.get("params", []):
                name = f"param:{key}"
                if name not in data.files:
                    raise ValueError(f"{path}: missing parameter array {key!r}")
                params[key] = data[name]
            return cls(int(header["dim"]), params, meta=header.get("meta") or {})

    def __repr__(self) -> str:
        kind = "identity" if not self.params else ("full" if self.rank is None else f"rank {self.rank}")
        return f"Adapter(dim={self.dim}, {kind}, persona_map={self.has_persona_map})"


# --------------------------------------------------------------------------------------
# metrics on pairs


def persona_selection_accuracy(adapter: Adapter, pairs: TrainingPairs) -> float:
    """Fraction of pairs whose positive persona outscores every other persona of its item.

    Needs ``pairs.hard_negatives`` (the item's other personas). Ties count as failures
    (strictly greater is required), so a degenerate map cannot score well. Pairs whose item
    has a single persona are skipped (no choice to make); NaN when none is left.
    """
    if pairs.hard_negatives is None:
        raise ValueError("persona_selection_accuracy needs pairs with hard_negatives (the item's other personas)")
    hv = pairs.hard_valid
    keep = np.any(hv, axis=1)
    if not np.any(keep):
        return float("nan")
    u = adapter.apply(pairs.users[keep])
    p = adapter.apply_persona(pairs.positives[keep])
    hn = pairs.hard_negatives[keep]
    b, h, d = hn.shape
    hn = adapter.apply_persona(hn.reshape(b * h, d)).reshape(b, h, d)
    pos = np.sum(u * p, axis=1)
    neg = np.matmul(hn, u[:, :, None])[:, :, 0]
    neg = np.where(hv[keep], neg, -np.inf)
    return float(np.mean(pos > np.max(neg, axis=1)))


def pairs_loss(adapter: Adapter, pairs: TrainingPairs, config: AdapterConfig, batch_size: int | None = None) -> float:
    """Mean InfoNCE loss of ``pairs`` in fixed, unshuffled batches (no gradients)."""
    bs = batch_size or config.batch_size
    total, count = 0.0, 0
    for start in range(0, len(pairs), bs):
        idx = np.arange(start, min(start + bs, len(pairs)))
        loss, _, _ = _batch_loss(adapter.params, pairs, idx, config, need_grad=False)
        total += loss * len(idx)
        count += len(idx)
    return total / max(count, 1)


def _batch_loss(params, pairs: TrainingPairs, idx: np.ndarray, config: AdapterConfig, need_grad: bool):
    valid = None
    if pairs.user_ids is not None or pairs.item_ids is not None or pairs.positive_ids is not None:
        valid = in_batch_valid_mask(
            None if pairs.user_ids is None else pairs.user_ids[idx],
            None if pairs.item_ids is None else pairs.item_ids[idx],
            None if pairs.positive_ids is None else pairs.positive_ids[idx],
            mask_same_user=config.mask_same_user,
            mask_same_item=config.mask_same_item,
        )
    hard = hard_valid = None
    if config.hard_negatives and pairs.hard_negatives is not None:
        hard = pairs.hard_negatives[idx]
        hard_valid = pairs.hard_valid[idx]
    return infonce_loss(
        params,
        pairs.users[idx],
        pairs.positives[idx],
        temperature=config.temperature,
        label_smoothing=config.label_smoothing,
        valid=valid,
        hard_negatives=hard,
        hard_valid=hard_valid,
        need_grad=need_grad,
    )


# --------------------------------------------------------------------------------------
# training


@dataclass
class TrainResult:
    adapter: Adapter
    report: dict[str, Any] = field(default_factory=dict)

    def write_report(self, path: str | os.PathLike) -> None:
        with open(os.fspath(path), "w", encoding="utf-8") as fh:
            json.dump(self.report, fh, indent=2, sort_keys=True)
            fh.write("\n")


class _Adam:
    def __init__(self, params: dict[str, np.ndarray], lr: float, weight_decay: float, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, b1, b2, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        self.t += 1
        c1 = 1.0 - self.b1**self.t
        c2 = 1.0 - self.b2**self.t
        for key, p in params.items():
            g = grads[key]
            m, v = self.m[key], self.v[key]
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * (g * g)
            upd = (m / c1) / (np.sqrt(v / c2) + self.eps)
            if self.wd:
                upd = upd + self.wd * p
            p -= (self.lr * upd).astype(p.dtype, copy=False)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        return None
    return tqdm(total=total, desc=desc, unit="batch", leave=False)


def train_adapter(
    pairs: TrainingPairs,
    config: AdapterConfig | None = None,
    *,
    validate: Callable[[Adapter], float] | None = None,
    val_pairs: TrainingPairs | None = None,
    progress: bool = False,
    report_path: str | os.PathLike | None = None,
    extra_report: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train an adapter on ``pairs`` with Adam; early-stop on a validation metric.

    The metric (higher is better) comes from ``validate(adapter)`` when given; else, when
    ``val_pairs`` has hard negatives, their persona-selection accuracy; else minus their
    loss; with neither, training runs all ``config.epochs`` epochs and keeps the last
    weights. The metric is measured before training (epoch 0, the identity map) and after
    every epoch; the best weights are kept, so a run whose training never helps returns the
    identity. Returns the adapter and a JSON-ready report (also written to ``report_path``).
    """
    config = config or AdapterConfig()
    config.validate()
    if not isinstance(pairs, TrainingPairs):
        raise TypeError("pairs must be a TrainingPairs")
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 training pairs for in-batch negatives, got {len(pairs)}")
    if config.hard_negatives and pairs.hard_negatives is None:
        raise ValueError("config.hard_negatives is set but the training pairs have no hard_negatives")
    if val_pairs is not None and val_pairs.dim != pairs.dim:
        raise ValueError(f"validation pairs have dimension {val_pairs.dim}, training pairs {pairs.dim}")

    metric_name = "custom"
    if validate is None and val_pairs is not None:
        if val_pairs.hard_negatives is not None:
            metric_name = "val_persona_selection_accuracy"

            def validate(a: Adapter) -> float:
                return persona_selection_accuracy(a, val_pairs)
        else:
            metric_name = "neg_val_loss"

            def validate(a: Adapter) -> float:
                return -pairs_loss(a, val_pairs, config)
    elif validate is None:
        metric_name = None

    t0 = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    params = init_params(pairs.dim, config, rng)
    opt = _Adam(params, config.lr, config.weight_decay)
    meta = {"config": config.to_dict()}

    def snapshot() -> Adapter:
        return Adapter(pairs.dim, {k: v.copy() for k, v in params.items()}, meta=meta)

    curve: list[dict[str, Any]] = []
    best_metric = -np.inf
    best_epoch = 0
    best_adapter = snapshot()
    if validate is not None:
        m0 = float(validate(best_adapter))
        if not np.isfinite(m0):
            raise ValueError(f"validation metric is not finite before training: {m0}")
        best_metric = m0
        curve.append({"epoch": 0, "train_loss": None, "val_metric": m0, "seconds": time.perf_counter() - t0})

    n = len(pairs)
    bs = min(config.batch_size, n)
    n_batches = n // bs  # drop the ragged tail: every step sees a full batch of negatives
    stale = 0
    stopped_early = False
    epochs_run = 0
    bar = _progress(n_batches * config.epochs, progress, "adapter")
    for epoch in range(1, config.epochs + 1):
        order = rng.permutation(n)
        total, acc_sum = 0.0, 0.0
        for bi in range(n_batches):
            idx = np.sort(order[bi * bs : (bi + 1) * bs])
            loss, grads, stats = _batch_loss(params, pairs, idx, config, need_grad=True)
            if not np.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at epoch {epoch}, batch {bi}: lower the lr")
            opt.step(params, grads)
            total += loss
            acc_sum += stats["accuracy"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{total / (bi + 1):.4f}", refresh=False)
        epochs_run = epoch
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": total / max(n_batches, 1),
            "train_batch_accuracy": acc_sum / max(n_batches, 1),
        }
        if validate is not None:
            current = snapshot()
            metric = float(validate(current))
            row["val_metric"] = metric
            if np.isfinite(metric) and metric > best_metric + config.min_delta:
                best_metric, best_epoch, best_adapter = metric, epoch, current
                stale = 0
            else:
                stale += 1
        row["seconds"] = time.perf_counter() - t0
        curve.append(row)
        if bar is not None and "val_metric" in row:
            bar.write(f"epoch {epoch}: train loss {row['train_loss']:.4f}, validation {row['val_metric']:.4f}")
        if validate is not None and stale >= config.patience:
            stopped_early = True
            break
    if bar is not None:
        bar.close()
    if validate is None:
        best_adapter, best_epoch = snapshot(), epochs_run

    elapsed = time.perf_counter() - t0
    best_adapter.meta.update({"best_epoch": best_epoch, "val_metric": metric_name})
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "method": "adapter",
        "config": config.to_dict(),
        "data": {
            "train_pairs": n,
            "val_pairs": None if val_pairs is None else len(val_pairs),
            "dim": pairs.dim,
            "train_users": None if pairs.user_ids is None else int(np.unique(pairs.user_ids).size),
            "train_items": None if pairs.item_ids is None else int(np.unique(pairs.item_ids).size),
            "hard_negatives_per_pair": None if pairs.hard_negatives is None else int(pairs.hard_negatives.shape[1]),
            "batches_per_epoch": n_batches,
        },
        "validation_metric": metric_name,
        "curve": curve,
        "best_epoch": best_epoch,
        "best_val_metric": None if validate is None else best_metric,
        "epochs_run": epochs_run,
        "stopped_early": stopped_early,
        "seconds": elapsed,
    }
    if extra_report:
        report.update(dict(extra_report))
    result = TrainResult(best_adapter, report)
    if report_path is not None:
        result.write_report(report_path)
    return result
