"""The true conversion model behind the synthetic data, and the small statistics to score it.

Conversion of a lead is drawn from ``sigmoid(TRUE_INTERCEPT + sum(coef * feature))``
over features owned by all three parties (``TRUE_FEATURES``). A feature whose owner does
not hold the lead (the lead is not a media user, or not a dealer customer) is zero, so
each party alone sees only part of the signal and a joint model clearly beats any one
party. ``FIT_FEATURES`` lists, per party, what a model trained on that party's own data
would use: the true features plus a presence flag and a few features that carry no
signal (real data has those too).

Also here: a Newton/IRLS logistic-regression fit and a rank-based AUC, both in numpy.
This module computes only: no I/O, no logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from parties.catalog import PRIOR_BRANDS, SERIES, SOURCE_CHANNELS

FloatArray = npt.NDArray[np.float64]

PARTIES: tuple[str, ...] = ("oem", "media", "dealer")


@dataclass(frozen=True)
class FeatureDef:
    """One model feature: its name, the party that owns the inputs, and how it is computed."""

    name: str
    party: str
    definition: str
    coefficient: float

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "party": self.party,
            "definition": self.definition,
            "coefficient": self.coefficient,
        }


TRUE_INTERCEPT = -4.6

TRUE_FEATURES: tuple[FeatureDef, ...] = (
    FeatureDef("previous_owner", "oem", "oem/crm.previous_owner as 0/1", 0.9),
    FeatureDef("service_visits", "oem", "oem/crm.service_visits, capped at 10", 0.15),
    FeatureDef("channel_referral", "oem", "oem/leads.source_channel == 'referral'", 1.0),
    FeatureDef("channel_dealer_event", "oem", "oem/leads.source_channel == 'dealer_event'", 0.7),
    FeatureDef("channel_call_center", "oem", "oem/leads.source_channel == 'call_center'", 0.25),
    FeatureDef("channel_media_ad", "oem", "oem/leads.source_channel == 'media_ad'", -0.3),
    FeatureDef(
        "media_views_log", "media",
        "log1p(sum of media/behaviour.views_<series> over all series) of the lead's "
        "primary media account; 0 if the lead is not a media user", 0.35,
    ),
    FeatureDef(
        "media_price_checks_log", "media", "log1p(media/behaviour.price_checks); 0 if absent",
        0.5,
    ),
    FeatureDef(
        "media_testdrive_opens", "media",
        "min(media/behaviour.testdrive_form_opens, 3); 0 if absent", 0.55,
    ),
    FeatureDef(
        "media_recency", "media", "exp(-media/behaviour.days_since_active / 14); 0 if absent",
        0.6,
    ),
    FeatureDef(
        "dealer_visits_log", "dealer",
        "log1p(sum of dealer/activity.visits over the customer's rows, matched by "
        "normalised phone); 0 if not a dealer customer", 0.6,
    ),
    FeatureDef(
        "dealer_test_drives", "dealer",
        "min(sum of dealer/activity.test_drives over the customer's rows, 3); 0 if absent",
        1.0,
    ),
    FeatureDef(
        "dealer_prior_order", "dealer",
        "1 if the sum of dealer/activity.prior_orders > 0, else 0", 0.6,
    ),
)

# Extra columns a party-local model would use besides the true features.
EXTRA_FIT_FEATURES: dict[str, tuple[str, ...]] = {
    "oem": (
        "channel_app",
        "household_cars",
        *(f"prior_brand_{b}" for b in PRIOR_BRANDS[1:]),
        *(f"series_{s.lower()}" for s in SERIES[1:]),
    ),
    "media": ("in_media", "media_comparisons_log", "media_forum_posts_log"),
    "dealer": ("is_dealer_customer",),
}


def fit_features(party: str) -> tuple[str, ...]:
    """Feature columns for a model trained on ``party``'s data alone, or ``"joint"``."""
    if party == "joint":
        return tuple(n for p in PARTIES for n in fit_features(p))
    if party not in PARTIES:
        raise ValueError(f"unknown party {party!r}")
    own = tuple(f.name for f in TRUE_FEATURES if f.party == party)
    return own + EXTRA_FIT_FEATURES[party]


def true_logit(features: dict[str, FloatArray]) -> FloatArray:
    """The true model's log-odds for each lead."""
    n = len(next(iter(features.values())))
    out = np.full(n, TRUE_INTERCEPT, dtype=np.float64)
    for f in TRUE_FEATURES:
        out += f.coefficient * features[f.name]
    return out


def sigmoid(z: FloatArray) -> FloatArray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)))


def model_document() -> dict[str, object]:
    """The true model as written to ``ground_truth/model.json``."""
    return {
        "form": "P(converted) = sigmoid(intercept + sum(coefficient * feature))",
        "intercept": TRUE_INTERCEPT,
        "features": [f.as_dict() for f in TRUE_FEATURES],
        "fit_features": {p: list(fit_features(p)) for p in (*PARTIES, "joint")},
        "series": list(SERIES),
        "source_channels": list(SOURCE_CHANNELS),
        "prior_brands": list(PRIOR_BRANDS),
    }


def fit_logistic(
    x: FloatArray, y: npt.NDArray[np.bool_] | FloatArray, *, ridge: float = 1e-4,
    max_iter: int = 50, tol: float = 1e-7,
) -> FloatArray:
    """Logistic regression by Newton's method (IRLS) with a small ridge penalty.

    ``x`` has no intercept column; the result is ``[intercept, coef...]``. Columns are
    standardised internally for a well-conditioned Hessian.
    """
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    n, d = x.shape
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std == 0] = 1.0
    # rows of zt are the (standardised) columns; contiguous so the products stay fast
    zt = np.empty((d + 1, n), dtype=np.float64)
    zt[0] = 1.0
    zt[1:] = ((x - mean) / std).T
    beta = np.zeros(d + 1, dtype=np.float64)
    rate = float(np.clip(t.mean(), 1e-6, 1 - 1e-6))
    beta[0] = np.log(rate / (1 - rate))
    penalty = np.full(d + 1, ridge * n)
    penalty[0] = 0.0
    for _ in range(max_iter):
        p = sigmoid(beta @ zt)
        w = p * (1.0 - p)
        grad = zt @ (t - p) - penalty * beta
        hess = (zt * w) @ zt.T + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        beta += step
        if float(np.max(np.abs(step))) < tol:
            break
    coef = beta[1:] / std
    intercept = beta[0] - float(coef @ mean)
    return np.concatenate([[intercept], coef])


def predict_logit(beta: FloatArray, x: FloatArray) -> FloatArray:
    return np.asarray(beta[0] + np.asarray(x, dtype=np.float64) @ beta[1:])


def auc(y: npt.NDArray[np.bool_] | FloatArray, score: FloatArray) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U), ties get their average rank."""
    labels = np.asarray(y, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # first position of each run of equal scores, and run lengths
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    lengths = np.diff(np.r_[starts, s.size])
    avg_rank = starts + (lengths + 1) / 2.0  # 1-based average rank of each run
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(avg_rank, lengths)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
