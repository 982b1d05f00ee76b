"""The model side of vertical LR: configuration, the update rule, metrics and calibration.

* :class:`TrainingConfig`: hyper-parameters every party must agree on (their digest is
  checked in the first message).
* :func:`apply_update`: the local update of one party's weight slice from its gradient
  (L2 penalty except on the intercept, heavy-ball momentum, decaying learning rate). It is
  separable across parties, so every party runs it on its own slice.
* :func:`train_plaintext`: the same Taylor-approximated full-batch training on a joined
  plaintext matrix (the reference the encrypted run must reproduce, and the plaintext
  baseline of the benchmark).
* :func:`auc`, :func:`lift_by_decile`, :func:`fit_platt`: validation metrics and the Platt
  calibration the OEM fits on validation scores.

Gradient (Taylor expansion of the logistic loss at u = 0, as in FATE's hetero LR):
``d = 0.25 u + 0.5 - y``, ``g = X^T d / N``. Arithmetic only: no I/O, no keys.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from protocols.errors import LocalProtocolError

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class TrainingConfig:
    """Agreed hyper-parameters. ``eval_every`` epochs the guest scores the validation rows
    (at most ``max_checks`` times: each check reveals one vector of summed host scores);
    training stops early after ``patience`` checks without AUC improvement."""

    max_epochs: int = 60
    learning_rate: float = 1.0
    lr_decay: float = 0.02
    momentum: float = 0.9
    l2: float = 0.1  # ridge on the Taylor (least-squares) objective; see lead-scoring.md
    eval_every: int = 10
    max_checks: int = 6
    patience: int = 2
    key_bits: int = 2048

    def validate(self) -> None:
        checks = [
            (self.max_epochs >= 1, "max_epochs must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.lr_decay >= 0, "lr_decay must be >= 0"),
            (0 <= self.momentum < 1, "momentum must lie in [0, 1)"),
            (self.l2 >= 0, "l2 must be >= 0"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.max_checks >= 1, "max_checks must be >= 1"),
            (self.patience >= 1, "patience must be >= 1"),
            (self.key_bits >= 2048, "key_bits must be >= 2048"),
        ]
        for ok, why in checks:
            if not ok:
                raise LocalProtocolError(f"training config: {why}", status_hint=400)

    def digest(self, extra: dict[str, object]) -> bytes:
        doc = {"config": asdict(self), **extra}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).digest()

    def is_check_epoch(self, epoch: int) -> bool:
        """Validation checks after epochs eval_every-1, 2*eval_every-1, ... and the last."""
        if self.check_index(epoch) >= self.max_checks:
            return False
        return (epoch + 1) % self.eval_every == 0 or epoch == self.max_epochs - 1

    def check_index(self, epoch: int) -> int:
        return epoch // self.eval_every


def learning_rate(config: TrainingConfig, epoch: int) -> float:
    return config.learning_rate / (1.0 + config.lr_decay * epoch)


def apply_update(w: FloatArray, velocity: FloatArray, grad: FloatArray, epoch: int,
                 config: TrainingConfig, intercept: int | None) -> tuple[FloatArray, FloatArray]:
    """One local step on a weight slice; ``intercept`` is the unpenalised column, if any."""
    reg = config.l2 * w
    if intercept is not None:
        reg[intercept] = 0.0
    v = config.momentum * velocity + grad + reg
    return w - learning_rate(config, epoch) * v, v


def taylor_gradient(x: FloatArray, u: FloatArray, y: FloatArray) -> FloatArray:
    return np.asarray(x.T @ (0.25 * u + 0.5 - y) / x.shape[0])


def train_plaintext(blocks: list[FloatArray], y: FloatArray, config: TrainingConfig,
                    epochs: int, intercept: int | None = 0) -> list[FloatArray]:
    """Reference: the protocol's algorithm on plaintext blocks (party 0 holds the intercept
    column at index ``intercept``) for exactly ``epochs`` epochs, no early stopping."""
    ws = [np.zeros(b.shape[1]) for b in blocks]
    vs = [np.zeros(b.shape[1]) for b in blocks]
    for t in range(epochs):
        u = sum(b @ w for b, w in zip(blocks, ws, strict=True))
        grads = [taylor_gradient(b, np.asarray(u), y) for b in blocks]
        for p in range(len(blocks)):
            ws[p], vs[p] = apply_update(ws[p], vs[p], grads[p], t, config,
                                        intercept if p == 0 else None)
    return ws


# -- metrics ------------------------------------------------------------------------------
def sigmoid(z: FloatArray) -> FloatArray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64))))


def auc(y: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """Rank AUC (Mann-Whitney U, ties share their average rank)."""
    labels = np.asarray(y).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    lengths = np.diff(np.r_[starts, s.size])
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(starts + (lengths + 1) / 2.0, lengths)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def lift_by_decile(y: npt.ArrayLike, score: npt.ArrayLike) -> list[dict[str, float]]:
    """Deciles by descending score: rows, conversions, conversion rate and lift over the
    average (decile 1 holds the highest scores)."""
    labels = np.asarray(y, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    if labels.size == 0:
        return []
    base = float(labels.mean())
    order = np.argsort(-s, kind="mergesort")
    out = []
    for k, idx in enumerate(np.array_split(order, 10), start=1):
        rate = float(labels[idx].mean()) if idx.size else 0.0
        out.append({"decile": float(k), "rows": float(idx.size),
                    "conversions": float(labels[idx].sum()), "rate": rate,
                    "lift": rate / base if base > 0 else float("nan")})
    return out


def fit_platt(score: FloatArray, y: FloatArray, iters: int = 50) -> tuple[float, float]:
    """Platt scaling ``P(y=1) = sigmoid(a * score + b)`` by Newton's method (tiny ridge)."""
    s = np.asarray(score, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    rate = float(np.clip(t.mean(), 1e-6, 1 - 1e-6)) if t.size else 0.5
    beta = np.array([0.0, np.log(rate / (1 - rate))])
    z = np.column_stack([s, np.ones_like(s)])
    for _ in range(iters):
        p = sigmoid(z @ beta)
        grad = z.T @ (t - p) - 1e-6 * beta
        hess = (z * (p * (1 - p))[:, None]).T @ z + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        beta += step
        if float(np.max(np.abs(step))) < 1e-10:
            break
    return float(beta[0]), float(beta[1])
