"""Shared vocabulary of the automotive domain: the OEM's series, lead channels, prior brands.

These values appear in several parties' tables (intended series at the OEM, views per
series at the media platform, inventory per series at the dealer), so they live here,
not in any one party's code or in the data generator.
"""

from __future__ import annotations

SERIES: tuple[str, ...] = ("AX3", "AX5", "AX7", "EV6", "EV9")
SOURCE_CHANNELS: tuple[str, ...] = (
    "website",
    "app",
    "media_ad",
    "call_center",
    "dealer_event",
    "referral",
)
PRIOR_BRANDS: tuple[str, ...] = ("none", "domestic", "japanese", "german", "american", "korean")
