"""Synthetic three-party data: OEM leads, media-platform users, dealer customers.

:func:`generate` writes one dataset directory::

    DIR/oem/{leads,crm,labels,stores}
    DIR/media/{users,behaviour,locations}
    DIR/dealer/{activity,inventory}
    DIR/ground_truth/{eval_labels,lead_features,nearest_stores,identity_map,store_choice}
    DIR/ground_truth/model.json, DIR/summary.json

as Parquet (default) or CSV; the columns are declared in :mod:`parties.schemas`. Only
``ground_truth/`` holds the answers (evaluation labels, the true model, true nearest
stores, the identity map, the chosen stores); no party folder contains any of them.

How the world is drawn (all from one seeded ``numpy`` generator, so a seed fixes it):

- **People** live in real Chinese cities (``CITIES``): home is the city centre plus a
  normal offset (sd 0.45 x the city's radius, a quarter of people 1.0 x radius); work is
  for 70% on the way to the centre (centre + 0.35 x (home - centre) + sd 0.25 x radius),
  for 20% near home (sd 2 km), for 10% anywhere in the city. Each person has a phone,
  an email, a device id and, for a quarter, a second device. A latent intent drives
  their behaviour at every party.
- **Leads** (OEM): ``leads`` rows, 0.3% of them a second lead of an existing lead's
  person. ``media_overlap`` of the lead persons have a media account and
  ``dealer_overlap`` are dealer customers (independently). Leads always give a phone,
  55% an email and 65% a device id (the second device when they have one, 40% of
  the time).
- **Media platform**: one account per media person, plus 0.2% duplicate accounts of the
  same person (holding only a phone or only an email). Accounts hold all three keys
  (50%), phone + device (20%), phone + email (5%), only an email (10%) or only a
  device id (15%); ``device_id_2`` carries the second device when the account holds
  devices. Accounts that are not leads make up the rest of ``media_users``.
- **Dealer**: one activity row per customer, keyed by phone; 2% of customers with two
  or more visits have their activity split over two rows (different formats of the
  same phone). 15% x ``leads`` customers are not leads (half of them media users).
- **Formats**: every identifier is written in its party's own style mix
  (:mod:`cleanroom.synth.formats`), and 0.4% of identifier cells are spoiled with
  invalid values.
- **Conversion**: each lead person converts with probability from the true logistic
  model (:mod:`cleanroom.synth.model`); a second lead of a person shares the label.
  Leads are ordered by ``created_at``; the earliest ``train_fraction`` are the
  training split (labels in ``oem/labels``), the rest the evaluation split (labels in
  ``ground_truth/eval_labels``).
- **Stores**: ``max(20, round(leads / 1500))`` stores, spread over the cities in
  proportion to the leads' cities (largest remainder), grouped three to a dealer.
  Inventory: each store stocks each series with probability 0.7 (1 + Poisson(4) units).
- **Store choice** (``ground_truth/store_choice``), for every converting lead: the
  candidates are the five stores nearest its person's home and the five nearest work;
  among candidates that stock the intended series, the one with the smallest distance
  (home km for home candidates, work km for work ones) with probability 0.85, otherwise
  a uniformly drawn stocking candidate; if no candidate stocks the series, the nearest
  store to home ("fallback").

Writing is atomic: everything goes into a hidden sibling directory that is renamed to
``DIR`` at the end; on any error it is removed and ``DIR`` is left as it was.
This module makes synthetic data only; it never reads real party data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cleanroom.errors import InputError
from cleanroom.synth import formats
from cleanroom.synth.model import (
    PARTIES,
    PRIOR_BRANDS,
    SERIES,
    SOURCE_CHANNELS,
    auc,
    fit_features,
    fit_logistic,
    model_document,
    predict_logit,
    sigmoid,
    true_logit,
)
from parties.geo import StoreIndex

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# name, centre lat, centre lon, radius km (spread of where people live), share of people
CITIES: tuple[tuple[str, float, float, float, float], ...] = (
    ("Beijing", 39.9042, 116.4074, 25.0, 0.12),
    ("Shanghai", 31.2304, 121.4737, 25.0, 0.13),
    ("Guangzhou", 23.1291, 113.2644, 20.0, 0.08),
    ("Shenzhen", 22.5431, 114.0579, 18.0, 0.08),
    ("Chengdu", 30.5728, 104.0668, 18.0, 0.07),
    ("Hangzhou", 30.2741, 120.1551, 16.0, 0.06),
    ("Wuhan", 30.5928, 114.3055, 16.0, 0.05),
    ("Xi'an", 34.3416, 108.9398, 14.0, 0.04),
    ("Chongqing", 29.5630, 106.5516, 18.0, 0.06),
    ("Nanjing", 32.0603, 118.7969, 14.0, 0.04),
    ("Tianjin", 39.3434, 117.3616, 16.0, 0.04),
    ("Suzhou", 31.2990, 120.5853, 14.0, 0.04),
    ("Zhengzhou", 34.7466, 113.6254, 14.0, 0.03),
    ("Changsha", 28.2282, 112.9388, 12.0, 0.03),
    ("Qingdao", 36.0671, 120.3826, 12.0, 0.03),
    ("Shenyang", 41.8057, 123.4315, 12.0, 0.03),
    ("Dongguan", 23.0207, 113.7518, 12.0, 0.03),
)
SURNAMES = ("wang", "li", "zhang", "liu", "chen", "yang", "huang", "zhao", "wu", "zhou",
            "xu", "sun", "ma", "zhu", "hu", "guo", "he", "lin", "gao", "luo")
GIVEN = ("wei", "fang", "na", "min", "jing", "lei", "yang", "jun", "yong", "yan", "jie",
         "tao", "ming", "chao", "xiu", "hua", "ping", "gang", "hui", "xin")
EMAIL_DOMAINS = ("163.com", "126.com", "sina.com", "foxmail.com", "gmail.com", "outlook.com",
                 "yeah.net", "139.com", "sohu.com")

PERIOD_START = np.datetime64("2024-01-01T00:00:00", "s")
PERIOD_END = np.datetime64("2025-06-30T23:59:59", "s")
DAY = 86_400

STORES_PER_LEAD = 1 / 1500
MIN_STORES = 20
K_NEAREST = 5
DUP_LEAD_RATE = 0.003
DUP_ACCOUNT_RATE = 0.002
SPLIT_CUSTOMER_RATE = 0.02
DEALER_ONLY_PER_LEAD = 0.15
SPOIL_RATE = 0.004
STORE_CHOICE_NOISE = 0.15
FIT_ROWS = 200_000


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. ``media_users`` defaults to three times ``leads``."""

    leads: int
    media_users: int | None = None
    seed: int = 0
    csv: bool = False
    media_overlap: float = 0.6
    dealer_overlap: float = 0.3
    train_fraction: float = 0.7

    @property
    def n_media_users(self) -> int:
        return 3 * self.leads if self.media_users is None else self.media_users

    def validate(self) -> None:
        """Raise :class:`InputError` naming the bad setting."""
        if isinstance(self.leads, bool) or not isinstance(self.leads, int) or self.leads < 1:
            raise InputError(f"--leads must be a whole number >= 1, got {self.leads!r}")
        if self.leads > 50_000_000:
            raise InputError(f"--leads must be at most 50,000,000, got {self.leads}")
        m = self.n_media_users
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise InputError(f"--media-users must be a whole number >= 0, got {m!r}")
        for name, value in (("--media-overlap", self.media_overlap),
                            ("--dealer-overlap", self.dealer_overlap)):
            if not (isinstance(value, int | float) and 0.0 <= float(value) <= 1.0):
                raise InputError(f"{name} must be a fraction between 0 and 1, got {value!r}")
        if not (0.0 < float(self.train_fraction) < 1.0):
            raise InputError(
                f"train_fraction must be strictly between 0 and 1, got {self.train_fraction!r}"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise InputError(f"--seed must be a whole number >= 0, got {self.seed!r}")
        counts = _Counts.of(self)
        if counts.media_leads > counts.media_persons:
            need = counts.media_leads + round(DUP_ACCOUNT_RATE * counts.media_leads) + 1
            raise InputError(
                f"--media-users {m} is too small for --media-overlap {self.media_overlap:g} "
                f"of {self.leads} leads: at least about {need} media users are needed"
            )


@dataclass(frozen=True)
class _Counts:
    leads: int
    dup_leads: int
    lead_persons: int
    media_users: int
    dup_accounts: int
    media_persons: int
    media_leads: int
    media_only: int
    dealer_leads: int
    dealer_only_media: int
    dealer_only_new: int
    persons: int
    stores: int

    @staticmethod
    def of(config: SynthConfig) -> _Counts:
        n = config.leads
        dup_leads = round(DUP_LEAD_RATE * n)
        lead_persons = n - dup_leads
        m = config.n_media_users
        dup_accounts = round(DUP_ACCOUNT_RATE * m)
        media_persons = m - dup_accounts
        media_leads = round(config.media_overlap * lead_persons)
        media_only = max(media_persons - media_leads, 0)
        dealer_leads = round(config.dealer_overlap * lead_persons)
        dealer_only = round(DEALER_ONLY_PER_LEAD * n)
        dealer_only_media = min(dealer_only // 2, media_only)
        dealer_only_new = dealer_only - dealer_only_media
        return _Counts(
            leads=n, dup_leads=dup_leads, lead_persons=lead_persons, media_users=m,
            dup_accounts=dup_accounts, media_persons=media_persons, media_leads=media_leads,
            media_only=media_only, dealer_leads=dealer_leads,
            dealer_only_media=dealer_only_media, dealer_only_new=dealer_only_new,
            persons=lead_persons + media_only + dealer_only_new,
            stores=max(MIN_STORES, round(n * STORES_PER_LEAD)),
        )


@dataclass
class SynthSummary:
    """What was generated: counts, overlaps, conversion and how well each party predicts it."""

    out: str
    config: dict[str, object]
    rows: dict[str, int]
    overlaps: dict[str, float]
    conversion_rate: dict[str, float | None]
    auc: dict[str, float | None]
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def format(self) -> str:
        lines = [f"synthetic clean-room data in {self.out}"]
        cfg = self.config
        lines.append(
            f"  seed {cfg['seed']}, {cfg['leads']} leads, {cfg['media_users']} media users, "
            f"format {'csv' if cfg['csv'] else 'parquet'}"
        )
        lines.append("  rows:")
        width = max(len(k) for k in self.rows)
        for name, count in self.rows.items():
            lines.append(f"    {name:<{width}}  {count:>12,}")
        lines.append("  overlaps (share of OEM leads):")
        for name, value in self.overlaps.items():
            lines.append(f"    {name:<32} {value:7.1%}")
        lines.append("  conversion rate:")
        for name, rate in self.conversion_rate.items():
            shown = "n/a" if rate is None else f"{rate:.2%}"
            lines.append(f"    {name:<32} {shown:>7}")
        lines.append("  AUC on the evaluation split (logistic regression fitted on training):")
        for name, score in self.auc.items():
            shown = "n/a" if score is None else f"{score:.4f}"
            lines.append(f"    {name:<32} {shown:>7}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        lines.append(f"  generated in {self.elapsed_s:.1f} s")
        return "\n".join(lines)


# --- small vectorised helpers -------------------------------------------------------------


def _strings(values: list[str] | tuple[str, ...]) -> pa.Array:
    return pa.array(list(values), type=pa.string())


def _pick(choices: tuple[str, ...], idx: npt.ArrayLike) -> pa.Array:
    return _strings(choices).take(pa.array(np.asarray(idx, dtype=np.int64)))


def _ids(prefix: str, numbers: IntArray, width: int) -> pa.Array:
    digits = pc.utf8_lpad(pa.array(np.asarray(numbers, dtype=np.int64)).cast(pa.string()),
                          width, "0")
    return pc.binary_join_element_wise(pa.scalar(prefix), digits, pa.scalar(""))


def _hex_ids(rng: np.random.Generator, n: int) -> pa.Array:
    """``n`` random 128-bit ids as 32 lower-case hex characters."""
    data = rng.integers(0, 256, size=(n, 16), dtype=np.uint8).tobytes().hex().encode("ascii")
    offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets),
                                                  pa.py_buffer(data)])


def _unique_ints(rng: np.random.Generator, n: int, modulus: int) -> IntArray:
    """``n`` distinct pseudo-random integers in ``[0, modulus)`` (an affine bijection)."""
    if n > modulus:
        raise ValueError("more values than the range holds")
    while True:
        a = int(rng.integers(modulus // 7, modulus - 1))
        if np.gcd(a, modulus) == 1:
            break
    b = int(rng.integers(0, modulus))
    i = np.arange(n, dtype=np.int64)
    return np.asarray((a * i + b) % modulus, dtype=np.int64)


def _with_nulls(values: pa.Array, keep: BoolArray) -> pa.Array:
    """``values`` with nulls where ``keep`` is false."""
    return pc.if_else(pa.array(keep), values, pa.nulls(len(values), pa.string()))


def _km_to_deg(lat: FloatArray, dn_km: FloatArray, de_km: FloatArray) -> tuple[FloatArray,
                                                                                  FloatArray]:
    dlat = dn_km / 111.195
    dlon = de_km / (111.195 * np.cos(np.radians(lat)))
    return dlat, dlon


def _largest_remainder(weights: FloatArray, total: int) -> IntArray:
    share = weights / weights.sum() * total
    base = np.floor(share).astype(np.int64)
    rest = total - int(base.sum())
    if rest > 0:
        base[np.argsort(-(share - base), kind="stable")[:rest]] += 1
    return base


# --- the world ----------------------------------------------------------------------------


@dataclass
class _Persons:
    city: IntArray
    home_lat: FloatArray
    home_lon: FloatArray
    work_lat: FloatArray
    work_lon: FloatArray
    intent: FloatArray
    phone_national: pa.Array
    email: pa.Array
    device: pa.Array
    device2: pa.Array  # null where the person has one device
    favourite: IntArray


def _draw_persons(rng: np.random.Generator, n: int) -> _Persons:
    centre_lat = np.array([c[1] for c in CITIES])
    centre_lon = np.array([c[2] for c in CITIES])
    radius = np.array([c[3] for c in CITIES])
    weight = np.array([c[4] for c in CITIES])
    city = rng.choice(len(CITIES), size=n, p=weight / weight.sum())
    clat, clon, rad = centre_lat[city], centre_lon[city], radius[city]
    spread = np.where(rng.random(n) < 0.75, 0.45, 1.0) * rad
    hn, he = rng.normal(0, 1, n) * spread, rng.normal(0, 1, n) * spread
    kind = rng.random(n)
    commute = kind < 0.7
    near = (kind >= 0.7) & (kind < 0.9)
    wn = np.where(commute, 0.35 * hn + rng.normal(0, 1, n) * 0.25 * rad,
                  np.where(near, hn + rng.normal(0, 2.0, n), rng.normal(0, 1, n) * 0.6 * rad))
    we = np.where(commute, 0.35 * he + rng.normal(0, 1, n) * 0.25 * rad,
                  np.where(near, he + rng.normal(0, 2.0, n), rng.normal(0, 1, n) * 0.6 * rad))
    dlat, dlon = _km_to_deg(clat, hn, he)
    wlat, wlon = _km_to_deg(clat, wn, we)
    phone = 13_000_000_000 + _unique_ints(rng, n, 7_000_000_000)
    phone_national = pa.array(phone).cast(pa.string())
    # emails: a name and a per-person unique number, or a numeric QQ address
    number = _unique_ints(rng, n, 100_000_000)
    numtxt = pa.array(number).cast(pa.string())
    qq = pc.binary_join_element_wise(pa.array(number + 10_000).cast(pa.string()),
                                     pa.scalar("@qq.com"), pa.scalar(""))
    sur = _pick(SURNAMES, rng.integers(0, len(SURNAMES), n))
    giv = _pick(GIVEN, rng.integers(0, len(GIVEN), n))
    dom = _pick(EMAIL_DOMAINS, rng.integers(0, len(EMAIL_DOMAINS), n))
    dot_style = pa.array(rng.random(n) < 0.5)
    local = pc.if_else(
        dot_style,
        pc.binary_join_element_wise(sur, pa.scalar("."), giv, numtxt, pa.scalar("")),
        pc.binary_join_element_wise(giv, sur, numtxt, pa.scalar("")),
    )
    named = pc.binary_join_element_wise(local, pa.scalar("@"), dom, pa.scalar(""))
    email = pc.if_else(pa.array(rng.random(n) < 0.3), qq, named)
    device = _hex_ids(rng, n)
    device2 = _with_nulls(_hex_ids(rng, n), rng.random(n) < 0.25)
    return _Persons(
        city=city,
        home_lat=np.round(clat + dlat, 5), home_lon=np.round(clon + dlon, 5),
        work_lat=np.round(clat + wlat, 5), work_lon=np.round(clon + wlon, 5),
        intent=rng.normal(0, 1, n),
        phone_national=phone_national, email=email, device=device, device2=device2,
        favourite=rng.choice(len(SERIES), size=n, p=[0.3, 0.25, 0.15, 0.2, 0.1]),
    )


def _e164(national: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(pa.scalar("+86"), national, pa.scalar(""))


def _behaviour(rng: np.random.Generator, intent: FloatArray, favourite: IntArray,
               is_lead: BoolArray, stale: BoolArray) -> dict[str, IntArray]:
    n = intent.size
    rate = np.exp(1.0 + 0.6 * intent + 0.6 * is_lead) * rng.gamma(1.5, 1 / 1.5, n)
    rate = np.where(stale, 0.5, rate)
    total = rng.poisson(rate)
    fav = rng.binomial(total, 0.6)
    views = rng.multinomial(total - fav, np.full(len(SERIES), 1 / len(SERIES)))
    views[np.arange(n), favourite] += fav
    out = {f"views_{s.lower()}": views[:, i].astype(np.int64) for i, s in enumerate(SERIES)}
    out["comparisons"] = rng.poisson(0.3 * np.power(total, 0.7)).astype(np.int64)
    out["price_checks"] = rng.poisson(np.where(stale, 0.05, np.exp(-0.6 + 0.6 * intent
                                                                   + 0.4 * is_lead)))
    out["forum_posts"] = rng.poisson(np.where(stale, 0.02, 0.4 * rng.gamma(0.5, 2.0, n)))
    out["testdrive_form_opens"] = rng.poisson(
        np.where(stale, 0.0, np.exp(-2.0 + 0.7 * intent + 0.5 * is_lead)))
    days = rng.exponential(np.exp(2.3 - 0.5 * intent - 0.3 * is_lead))
    days = np.where(stale, rng.integers(60, 366, n), days)
    out["days_since_active"] = np.clip(np.floor(days), 0, 365).astype(np.int64)
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


class _World:
    """Everything drawn for one dataset: the tables and the numbers for the summary."""

    def __init__(self, config: SynthConfig) -> None:
        self.config = config
        self.counts = _Counts.of(config)
        self.rng = np.random.default_rng(config.seed)
        self.tables: dict[str, pa.Table] = {}
        self.model_json: dict[str, object] = {}
        self.summary_parts: dict[str, dict[str, float]] = {}

    def build(self) -> None:
        c, rng = self.counts, self.rng
        persons = _draw_persons(rng, c.persons)
        self.persons = persons
        self._leads(persons)
        self._stores()
        self._media(persons)
        self._dealer(persons)
        self._conversion()
        self._nearest_and_choice(persons)
        self._identity_map()

    # -- OEM --------------------------------------------------------------------------

    def _leads(self, p: _Persons) -> None:
        c, rng = self.counts, self.rng
        lp = c.lead_persons
        span = int((PERIOD_END - PERIOD_START).astype(np.int64))
        orig_t = rng.integers(0, span - 40 * DAY, lp) if span > 40 * DAY else np.zeros(lp)
        dup_of = rng.integers(0, lp, c.dup_leads) if lp else np.zeros(0, dtype=np.int64)
        dup_t = orig_t[dup_of] + rng.integers(DAY, 30 * DAY, c.dup_leads)
        row_person = np.concatenate([np.arange(lp), dup_of]).astype(np.int64)
        row_t = np.concatenate([orig_t, dup_t]).astype(np.int64)
        is_dup = np.concatenate([np.zeros(lp, bool), np.ones(c.dup_leads, bool)])
        order = np.lexsort((is_dup, row_t))
        row_person, row_t, is_dup = row_person[order], row_t[order], is_dup[order]
        n = c.leads
        self.lead_person, self.lead_is_dup = row_person, is_dup
        self.lead_ids = _ids("L", np.arange(1, n + 1), max(8, len(str(n))))
        first_row = np.full(lp, -1, dtype=np.int64)
        originals = np.flatnonzero(~is_dup)
        first_row[row_person[originals]] = originals
        self.first_lead_row = first_row  # person -> its original lead row
        n_train = round(self.config.train_fraction * n)
        self.train = np.arange(n) < n_train

        # per lead person: channel, series, CRM
        channel = rng.choice(len(SOURCE_CHANNELS), size=lp, p=[0.3, 0.2, 0.2, 0.1, 0.1, 0.1])
        series = np.where(rng.random(lp) < 0.7, p.favourite[:lp],
                          rng.integers(0, len(SERIES), lp))
        u = p.intent[:lp]
        prev = rng.random(lp) < sigmoid(-1.3 + 0.3 * u)
        service = np.where(prev, rng.poisson(np.exp(0.8 + 0.3 * u)), rng.poisson(0.1, lp))
        service = np.minimum(service, 30)
        brand = rng.choice(len(PRIOR_BRANDS), size=lp, p=[0.25, 0.25, 0.2, 0.15, 0.08, 0.07])
        cars = rng.poisson(0.8, lp)
        self.lead_channel, self.lead_series = channel, series
        self.crm_prev, self.crm_service, self.crm_brand, self.crm_cars = prev, service, brand, cars

        rp = row_person
        city = np.where(rng.random(n) < 0.93, p.city[rp], rng.integers(0, len(CITIES), n))
        self.lead_city = city
        # identifiers the OEM holds, in its own formats
        phone = formats.apply_styles(p.phone_national.take(pa.array(rp)),
                                     formats.PHONE_STYLES, formats.PARTY_PHONE_MIX["oem"], rng)
        email_held = rng.random(n) < 0.55
        email = formats.apply_styles(_with_nulls(p.email.take(pa.array(rp)), email_held),
                                     formats.EMAIL_STYLES, formats.PARTY_EMAIL_MIX["oem"], rng)
        dev_held = rng.random(n) < 0.65
        d2 = p.device2.take(pa.array(rp))
        use2 = ~np.asarray(d2.is_null().to_numpy(zero_copy_only=False), bool) & (
            rng.random(n) < 0.4)
        clean_dev = _with_nulls(pc.if_else(pa.array(use2), d2, p.device.take(pa.array(rp))),
                                dev_held)
        device = formats.apply_styles(clean_dev, formats.DEVICE_STYLES,
                                      formats.PARTY_DEVICE_MIX["oem"], rng)
        phone, bad_phone = formats.spoil(phone, SPOIL_RATE, formats.INVALID_PHONES, rng)
        email, bad_email = formats.spoil(email, SPOIL_RATE, formats.INVALID_EMAILS, rng)
        device, bad_dev = formats.spoil(device, SPOIL_RATE, formats.INVALID_DEVICE_IDS, rng)
        self.oem_truth = {
            "phone": _with_nulls(_e164(p.phone_national.take(pa.array(rp))), ~bad_phone),
            "email": _with_nulls(_with_nulls(p.email.take(pa.array(rp)), email_held),
                                 ~bad_email),
            "device_id": _with_nulls(clean_dev, ~bad_dev),
        }
        created = PERIOD_START + row_t.astype("timedelta64[s]")
        self.lead_created = created
        self.tables["oem/leads"] = pa.table({
            "lead_id": self.lead_ids,
            "phone": phone, "email": email, "device_id": device,
            "city": _pick(tuple(c[0] for c in CITIES), city),
            "source_channel": _pick(SOURCE_CHANNELS, channel[rp]),
            "intended_series": _pick(SERIES, series[rp]),
            "created_at": pa.array(created, type=pa.timestamp("s")),
        })
        self.tables["oem/crm"] = pa.table({
            "lead_id": self.lead_ids,
            "previous_owner": pa.array(prev[rp]),
            "service_visits": pa.array(service[rp].astype(np.int64)),
            "prior_brand": _pick(PRIOR_BRANDS, brand[rp]),
            "household_cars": pa.array(cars[rp].astype(np.int64)),
        })

    def _stores(self) -> None:
        c, rng = self.counts, self.rng
        lead_city_counts = np.bincount(self.lead_city, minlength=len(CITIES)).astype(float)
        per_city = _largest_remainder(lead_city_counts, c.stores)
        store_city = np.repeat(np.arange(len(CITIES)), per_city)
        k = store_city.size
        centre_lat = np.array([x[1] for x in CITIES])[store_city]
        centre_lon = np.array([x[2] for x in CITIES])[store_city]
        rad = np.array([x[3] for x in CITIES])[store_city]
        dlat, dlon = _km_to_deg(centre_lat, rng.normal(0, 1, k) * 0.5 * rad,
                                rng.normal(0, 1, k) * 0.5 * rad)
        lat, lon = np.round(centre_lat + dlat, 5), np.round(centre_lon + dlon, 5)
        # number stores within their city; three stores to a dealer group
        within = np.arange(k) - np.searchsorted(store_city, store_city)
        new_group = (within % 3 == 0).astype(np.int64)
        dealer_no = np.cumsum(new_group)
        width = max(4, len(str(k)))
        self.store_ids = _ids("S", np.arange(1, k + 1), width)
        self.store_lat, self.store_lon = lat, lon
        city_names = _pick(tuple(x[0] for x in CITIES), store_city)
        names = pc.binary_join_element_wise(
            city_names, pa.scalar(" 4S Store "), pc.utf8_lpad(pa.array(within + 1).cast(
                pa.string()), 2, "0"), pa.scalar(""))
        self.tables["oem/stores"] = pa.table({
            "store_id": self.store_ids,
            "dealer_id": _ids("D", dealer_no, 3),
            "name": names, "city": city_names,
            "lat": pa.array(lat), "lon": pa.array(lon),
        })
        stocked = rng.random((k, len(SERIES))) < 0.7
        units = np.where(stocked, 1 + rng.poisson(4.0, (k, len(SERIES))), 0)
        self.inventory = units
        self.tables["dealer/inventory"] = pa.table({
            "store_id": self.store_ids.take(pa.array(np.repeat(np.arange(k), len(SERIES)))),
            "series": _pick(SERIES, np.tile(np.arange(len(SERIES)), k)),
            "units": pa.array(units.reshape(-1).astype(np.int64)),
        })

    # -- media platform ---------------------------------------------------------------

    def _media(self, p: _Persons) -> None:
        c, rng = self.counts, self.rng
        lp = c.lead_persons
        media_leads = np.sort(rng.choice(lp, size=c.media_leads, replace=False))
        media_persons = np.concatenate([media_leads, lp + np.arange(c.media_only)])
        self.person_in_media = np.zeros(c.persons, dtype=bool)
        self.person_in_media[media_persons] = True
        dup_persons = rng.choice(media_persons, size=c.dup_accounts, replace=False) \
            if c.dup_accounts <= media_persons.size else media_persons[:0]
        acc_person = np.concatenate([media_persons, dup_persons]).astype(np.int64)
        acc_dup = np.concatenate([np.zeros(media_persons.size, bool),
                                  np.ones(dup_persons.size, bool)])
        shuffle = rng.permutation(acc_person.size)
        acc_person, acc_dup = acc_person[shuffle], acc_dup[shuffle]
        m = acc_person.size
        self.acc_person, self.acc_dup = acc_person, acc_dup
        self.user_ids = _ids("U", 100_000_000 + _unique_ints(rng, m, 900_000_000), 9)
        pattern = rng.choice(5, size=m, p=[0.5, 0.2, 0.05, 0.1, 0.15])
        # all, phone+device, phone+email, email only, device only
        has_phone = np.isin(pattern, (0, 1, 2))
        has_email = np.isin(pattern, (0, 2, 3))
        has_dev = np.isin(pattern, (0, 1, 4))
        dup_phone = rng.random(m) < 0.5
        has_phone = np.where(acc_dup, dup_phone, has_phone)
        has_email = np.where(acc_dup, ~dup_phone, has_email)
        has_dev = np.where(acc_dup, False, has_dev)
        ap = pa.array(acc_person)
        nat = _with_nulls(p.phone_national.take(ap), has_phone)
        clean_email = _with_nulls(p.email.take(ap), has_email)
        clean_dev = _with_nulls(p.device.take(ap), has_dev)
        clean_dev2 = _with_nulls(p.device2.take(ap), has_dev)
        phone = formats.apply_styles(nat, formats.PHONE_STYLES,
                                     formats.PARTY_PHONE_MIX["media"], rng)
        email = formats.apply_styles(clean_email, formats.EMAIL_STYLES,
                                     formats.PARTY_EMAIL_MIX["media"], rng)
        mix = formats.PARTY_DEVICE_MIX["media"]
        dev = formats.apply_styles(clean_dev, formats.DEVICE_STYLES, mix, rng)
        dev2 = formats.apply_styles(clean_dev2, formats.DEVICE_STYLES, mix, rng)
        phone, bad_phone = formats.spoil(phone, SPOIL_RATE, formats.INVALID_PHONES, rng)
        email, bad_email = formats.spoil(email, SPOIL_RATE, formats.INVALID_EMAILS, rng)
        dev, bad_dev = formats.spoil(dev, SPOIL_RATE, formats.INVALID_DEVICE_IDS, rng)
        dev2, bad_dev2 = formats.spoil(dev2, SPOIL_RATE, formats.INVALID_DEVICE_IDS, rng)
        self.media_truth = {
            "phone": _with_nulls(_e164(nat), ~bad_phone),
            "email": _with_nulls(clean_email, ~bad_email),
            "device_id": _with_nulls(clean_dev, ~bad_dev),
            "device_id_2": _with_nulls(clean_dev2, ~bad_dev2),
        }
        self.tables["media/users"] = pa.table({
            "user_id": self.user_ids, "phone": phone, "email": email,
            "device_id": dev, "device_id_2": dev2,
        })
        is_lead = acc_person < lp
        beh = _behaviour(rng, p.intent[acc_person], p.favourite[acc_person], is_lead, acc_dup)
        # a lead's views lean to the series it asks about
        lead_acc = np.flatnonzero(is_lead & ~acc_dup)
        series = self.lead_series[acc_person[lead_acc]]
        extra = rng.poisson(np.exp(0.5 + 0.5 * p.intent[acc_person[lead_acc]]))
        for i, s in enumerate(SERIES):
            col = beh[f"views_{s.lower()}"]
            sel = series == i
            col[lead_acc[sel]] += extra[sel]
        self.behaviour, self.acc_is_lead = beh, is_lead
        self.tables["media/behaviour"] = pa.table(
            {"user_id": self.user_ids, **{k: pa.array(v) for k, v in beh.items()}})
        self.tables["media/locations"] = pa.table({
            "user_id": self.user_ids,
            "home_lat": pa.array(p.home_lat[acc_person]),
            "home_lon": pa.array(p.home_lon[acc_person]),
            "work_lat": pa.array(p.work_lat[acc_person]),
            "work_lon": pa.array(p.work_lon[acc_person]),
        })

    # -- dealer -----------------------------------------------------------------------

    def _dealer(self, p: _Persons) -> None:
        c, rng = self.counts, self.rng
        lp = c.lead_persons
        dealer_leads = rng.choice(lp, size=c.dealer_leads, replace=False)
        dealer_media = lp + rng.choice(c.media_only, size=c.dealer_only_media, replace=False)
        dealer_new = lp + c.media_only + np.arange(c.dealer_only_new)
        cust = np.concatenate([dealer_leads, dealer_media, dealer_new]).astype(np.int64)
        self.person_dealer = np.zeros(c.persons, dtype=bool)
        self.person_dealer[cust] = True
        u = p.intent[cust]
        is_lead = cust < lp
        visits = 1 + rng.poisson(np.exp(0.1 + 0.3 * u + 0.2 * is_lead))
        drives = np.minimum(visits, rng.poisson(np.exp(-0.9 + 0.5 * u + 0.2 * is_lead)))
        orders = rng.poisson(0.12, cust.size)
        self.cust_visits = np.zeros(c.persons, np.int64)
        self.cust_drives = np.zeros(c.persons, np.int64)
        self.cust_orders = np.zeros(c.persons, np.int64)
        self.cust_visits[cust], self.cust_drives[cust], self.cust_orders[cust] = (
            visits, drives, orders)
        split = (visits >= 2) & (rng.random(cust.size) < SPLIT_CUSTOMER_RATE)
        s_idx = np.flatnonzero(split)
        v2 = 1 + rng.binomial(visits[s_idx] - 2, 0.4)
        d2 = np.minimum(rng.binomial(drives[s_idx], 0.4), v2)
        o2 = rng.binomial(orders[s_idx], 0.5)
        visits, drives, orders = visits.copy(), drives.copy(), orders.copy()
        visits[s_idx] -= v2
        drives[s_idx] -= d2
        orders[s_idx] -= o2
        row_person = np.concatenate([cust, cust[s_idx]])
        row_dup = np.concatenate([np.zeros(cust.size, bool), np.ones(s_idx.size, bool)])
        r_visits = np.concatenate([visits, v2])
        r_drives = np.concatenate([drives, d2])
        r_orders = np.concatenate([orders, o2])
        shuffle = rng.permutation(row_person.size)
        row_person, row_dup = row_person[shuffle], row_dup[shuffle]
        r_visits, r_drives, r_orders = r_visits[shuffle], r_drives[shuffle], r_orders[shuffle]
        n = row_person.size
        self.dealer_person, self.dealer_dup = row_person, row_dup
        self.record_ids = _ids("R", np.arange(1, n + 1), max(8, len(str(n))))
        # the store of the visit: one of the three stores nearest home
        index = StoreIndex(self.store_lat, self.store_lon)
        k3 = min(3, index.size)
        near, _ = index.query(p.home_lat[row_person], p.home_lon[row_person], k=k3)
        store = near[np.arange(n), rng.integers(0, k3, n)]
        # activity predates the lead (or the period end for customers that are not leads)
        ref = np.full(n, PERIOD_END, dtype="datetime64[s]")
        lead_rows = row_person < lp
        ref[lead_rows] = self.lead_created[self.first_lead_row[row_person[lead_rows]]]
        last = ref - rng.integers(DAY, 365 * DAY, n).astype("timedelta64[s]")
        nat = p.phone_national.take(pa.array(row_person))
        phone = formats.apply_styles(nat, formats.PHONE_STYLES,
                                     formats.PARTY_PHONE_MIX["dealer"], rng)
        phone, bad_phone = formats.spoil(phone, SPOIL_RATE, formats.INVALID_PHONES, rng)
        self.dealer_truth = {"phone": _with_nulls(_e164(nat), ~bad_phone)}
        self.tables["dealer/activity"] = pa.table({
            "record_id": self.record_ids, "phone": phone,
            "store_id": self.store_ids.take(pa.array(store)),
            "visits": pa.array(r_visits.astype(np.int64)),
            "test_drives": pa.array(r_drives.astype(np.int64)),
            "prior_orders": pa.array(r_orders.astype(np.int64)),
            "last_visit_at": pa.array(last, type=pa.timestamp("s")),
        })

    # -- conversion -------------------------------------------------------------------

    def _features(self) -> dict[str, FloatArray]:
        """Every model feature for every lead row (see cleanroom.synth.model)."""
        c = self.counts
        rp = self.lead_person
        f: dict[str, FloatArray] = {}
        f["previous_owner"] = self.crm_prev[rp].astype(float)
        f["service_visits"] = np.minimum(self.crm_service[rp], 10).astype(float)
        ch = self.lead_channel[rp]
        for i, name in enumerate(SOURCE_CHANNELS):
            if name != "website":
                f[f"channel_{name}"] = (ch == i).astype(float)
        f["household_cars"] = self.crm_cars[rp].astype(float)
        br = self.crm_brand[rp]
        for i, name in enumerate(PRIOR_BRANDS[1:], start=1):
            f[f"prior_brand_{name}"] = (br == i).astype(float)
        se = self.lead_series[rp]
        for i, name in enumerate(SERIES[1:], start=1):
            f[f"series_{name.lower()}"] = (se == i).astype(float)
        # media: the person's primary account
        primary = np.full(c.persons, -1, dtype=np.int64)
        prim_rows = np.flatnonzero(~self.acc_dup)
        primary[self.acc_person[prim_rows]] = prim_rows
        acc = primary[rp]
        has = acc >= 0
        beh = self.behaviour

        def media(values: npt.ArrayLike) -> FloatArray:
            """Per-account values looked up for each lead; 0 where it has no account."""
            padded = np.append(np.asarray(values, dtype=np.float64), 0.0)
            return np.asarray(padded[np.where(has, acc, padded.size - 1)])

        views = np.sum([beh[f"views_{s.lower()}"] for s in SERIES], axis=0)
        f["in_media"] = has.astype(float)
        f["media_views_log"] = media(np.log1p(views))
        f["media_price_checks_log"] = media(np.log1p(beh["price_checks"]))
        f["media_testdrive_opens"] = media(np.minimum(beh["testdrive_form_opens"], 3))
        f["media_recency"] = media(np.exp(-beh["days_since_active"] / 14.0))
        f["media_comparisons_log"] = media(np.log1p(beh["comparisons"]))
        f["media_forum_posts_log"] = media(np.log1p(beh["forum_posts"]))
        dealer = self.person_dealer[rp]
        f["is_dealer_customer"] = dealer.astype(float)
        f["dealer_visits_log"] = np.log1p(self.cust_visits[rp]).astype(float)
        f["dealer_test_drives"] = np.minimum(self.cust_drives[rp], 3).astype(float)
        f["dealer_prior_order"] = (self.cust_orders[rp] > 0).astype(float)
        return {k: np.asarray(v, dtype=np.float64) for k, v in f.items()}

    def _conversion(self) -> None:
        c, rng = self.counts, self.rng
        feats = self._features()
        logit = true_logit(feats)
        # one draw per person, shared by a person's leads
        person_draw = rng.random(c.lead_persons)
        converted = person_draw[self.lead_person] < sigmoid(logit)
        self.features, self.logit, self.converted = feats, logit, converted
        train = self.train
        self.tables["oem/labels"] = pa.table({
            "lead_id": self.lead_ids.filter(pa.array(train)),
            "converted": pa.array(converted[train]),
        })
        self.tables["ground_truth/eval_labels"] = pa.table({
            "lead_id": self.lead_ids.filter(pa.array(~train)),
            "converted": pa.array(converted[~train]),
        })
        split = pc.if_else(pa.array(train), pa.scalar("train"), pa.scalar("eval"))
        cols: dict[str, pa.Array] = {
            "lead_id": self.lead_ids, "split": split, "converted": pa.array(converted),
            "true_logit": pa.array(logit),
        }
        for name in fit_features("joint"):
            cols[name] = pa.array(feats[name])
        self.tables["ground_truth/lead_features"] = pa.table(cols)
        self.model_json = model_document()

        # how well each party predicts, fitted on train, scored on eval
        y_ev = converted[~train]
        scores: dict[str, float] = {"true_model": auc(y_ev, logit[~train])}
        notes: list[str] = []
        # the fits see at most FIT_ROWS training leads: plenty for a few dozen coefficients
        fit_rows = np.flatnonzero(train)
        if fit_rows.size > FIT_ROWS:
            fit_rows = np.sort(rng.choice(fit_rows, size=FIT_ROWS, replace=False))
            notes.append(f"party models fitted on {FIT_ROWS:,} sampled training leads")
        y_fit = converted[fit_rows]
        for party in (*PARTIES, "joint"):
            names = fit_features(party)
            if not (0 < y_fit.sum() < y_fit.size) or y_ev.all() or not y_ev.any():
                scores[party] = float("nan")
                continue
            x_fit = np.column_stack([feats[n][fit_rows] for n in names])
            beta = fit_logistic(x_fit, y_fit)
            x_ev = np.column_stack([feats[n][~train] for n in names])
            scores[party] = auc(y_ev, predict_logit(beta, x_ev))
        if any(np.isnan(v) for v in scores.values()):
            notes.append("too few leads or conversions in a split to score every model")
        self.auc: dict[str, float | None] = {
            k: round(v, 4) if np.isfinite(v) else None for k, v in scores.items()}
        self.notes = notes

    # -- stores: nearest and chosen ----------------------------------------------------

    def _nearest_and_choice(self, p: _Persons) -> None:
        c, rng = self.counts, self.rng
        index = StoreIndex(self.store_lat, self.store_lon)
        k = min(K_NEAREST, index.size)
        # people we need: media persons and converting leads' persons
        conv_rows = np.flatnonzero(self.converted)
        need = np.unique(np.concatenate([self.acc_person, self.lead_person[conv_rows]]))
        slot = np.full(c.persons, -1, dtype=np.int64)
        slot[need] = np.arange(need.size)
        h_idx, h_km = index.query(p.home_lat[need], p.home_lon[need], k=k)
        w_idx, w_km = index.query(p.work_lat[need], p.work_lon[need], k=k)

        acc_slot = slot[self.acc_person]
        lead_of_acc = np.full(self.acc_person.size, -1, dtype=np.int64)
        is_lead = self.acc_person < c.lead_persons
        lead_of_acc[is_lead] = self.first_lead_row[self.acc_person[is_lead]]
        lead_col = _with_nulls(self.lead_ids.take(pa.array(np.maximum(lead_of_acc, 0))),
                               lead_of_acc >= 0)
        cols: dict[str, pa.Array] = {"user_id": self.user_ids, "lead_id": lead_col}
        for prefix, idx, km in (("home", h_idx, h_km), ("work", w_idx, w_km)):
            for j in range(k):
                cols[f"{prefix}_store_{j + 1}"] = self.store_ids.take(
                    pa.array(idx[acc_slot, j]))
            for j in range(k):
                cols[f"{prefix}_km_{j + 1}"] = pa.array(np.round(km[acc_slot, j], 4))
        self.tables["ground_truth/nearest_stores"] = pa.table(cols)

        # the store each converting lead bought at
        s = slot[self.lead_person[conv_rows]]
        cand = np.concatenate([h_idx[s], w_idx[s]], axis=1)
        dist = np.concatenate([h_km[s], w_km[s]], axis=1)
        series = self.lead_series[self.lead_person[conv_rows]]
        stocks = self.inventory[cand, series[:, None]] > 0
        masked = np.where(stocks, dist, np.inf)
        best = np.argmin(masked, axis=1)
        any_stock = stocks.any(axis=1)
        noisy = any_stock & (rng.random(conv_rows.size) < STORE_CHOICE_NOISE)
        # a uniformly drawn stocking candidate: the argmax of random keys over stockers
        keys = np.where(stocks, rng.random(stocks.shape), -1.0)
        best = np.where(noisy, np.argmax(keys, axis=1), best)
        rows = np.arange(conv_rows.size)
        chosen = np.where(any_stock, cand[rows, best], h_idx[s, 0])
        chosen_km = np.where(any_stock, dist[rows, best], h_km[s, 0])
        origin = np.where(~any_stock, 2, np.where(best < k, 0, 1))
        split = np.where(self.train[conv_rows], 0, 1)
        self.tables["ground_truth/store_choice"] = pa.table({
            "lead_id": self.lead_ids.take(pa.array(conv_rows)),
            "split": _pick(("train", "eval"), split),
            "store_id": self.store_ids.take(pa.array(chosen)),
            "chosen_from": _pick(("home", "work", "fallback"), origin),
            "km": pa.array(np.round(chosen_km, 4)),
        })

    def _identity_map(self) -> None:
        null = pa.nulls
        parts = []
        for party, ids, person, dup, truth in (
            ("oem", self.lead_ids, self.lead_person, self.lead_is_dup, self.oem_truth),
            ("media", self.user_ids, self.acc_person, self.acc_dup, self.media_truth),
            ("dealer", self.record_ids, self.dealer_person, self.dealer_dup, self.dealer_truth),
        ):
            n = len(ids)
            parts.append(pa.table({
                "person_id": pa.array(person.astype(np.int64)),
                "party": pa.array(np.full(n, party, dtype=object), type=pa.string()),
                "record_id": ids,
                "is_duplicate": pa.array(dup),
                **{col: truth.get(col, null(n, pa.string()))
                   for col in ("phone", "email", "device_id", "device_id_2")},
            }))
        self.tables["ground_truth/identity_map"] = pa.concat_tables(parts)

    # -- summary ----------------------------------------------------------------------

    def overlaps(self) -> dict[str, float]:
        n = max(self.counts.leads, 1)
        rp = self.lead_person
        media = self.person_in_media[rp]
        dealer = self.person_dealer[rp]
        return {
            "leads that are media users": round(float(media.sum()) / n, 4),
            "leads that are dealer customers": round(float(dealer.sum()) / n, 4),
            "leads at all three parties": round(float((media & dealer).sum()) / n, 4),
        }

    def conversion(self) -> dict[str, float | None]:
        y = self.converted
        train = self.train

        def rate(mask: BoolArray) -> float | None:
            return round(float(y[mask].mean()), 4) if mask.any() else None

        return {"all leads": rate(np.ones_like(train)), "training split": rate(train),
                "evaluation split": rate(~train)}


# --- writing --------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError("--out exists and is not a directory", file=str(out))
    if out.is_dir() and any(out.iterdir()):
        raise InputError("--out directory exists and is not empty; choose a new or empty "
                         "directory", file=str(out))


def _write_table(table: pa.Table, path: Path, csv: bool, name: str) -> None:
    # imported here: parties.schemas imports this package's model vocabulary
    from parties.schemas import SCHEMAS

    table = table.cast(SCHEMAS[name].arrow_schema())
    path.parent.mkdir(parents=True, exist_ok=True)
    if csv:
        pacsv.write_csv(table, path.with_suffix(".csv"))
    else:
        pq.write_table(table, path.with_suffix(".parquet"))


def generate(out: Path, config: SynthConfig) -> SynthSummary:
    """Generate a dataset into ``out`` (a new or empty directory) and return its summary.

    Raises :class:`InputError` for bad settings or an unusable ``out``; on any error
    nothing is left behind and an existing empty ``out`` stays as it was.
    """
    started = time.perf_counter()
    config.validate()
    out = Path(out)
    _check_out(out)
    world = _World(config)
    world.build()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the parent directory: {exc.strerror}",
                         file=str(out.parent)) from None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise InputError(f"cannot write next to the output directory: {exc.strerror}",
                         file=str(out.parent)) from None
    try:
        for name, table in world.tables.items():
            _write_table(table, tmp / name, config.csv, name)
        (tmp / "ground_truth" / "model.json").write_text(
            json.dumps(world.model_json, indent=2) + "\n")
        order = ("oem", "media", "dealer", "ground_truth")
        rows = {name: world.tables[name].num_rows for name in sorted(
            world.tables, key=lambda t: (order.index(t.split("/")[0]), t))}
        summary = SynthSummary(
            out=str(out),
            config={**asdict(config), "media_users": config.n_media_users},
            rows=rows,
            overlaps=world.overlaps(),
            conversion_rate=world.conversion(),
            auc=world.auc,
            notes=world.notes,
        )
        summary.elapsed_s = round(time.perf_counter() - started, 2)
        (tmp / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
        os.chmod(tmp, 0o755)
        _check_out(out)  # still new or empty?
        os.replace(tmp, out)  # atomic; replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
