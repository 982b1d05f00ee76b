"""Synthetic three-party data for demos, tests and benchmarks (``cleanroom synth``).

Public API: :class:`SynthConfig`, :class:`SynthSummary` and :func:`generate`. The data is
made up from a seed; nothing here reads real party data.
"""

from cleanroom.synth.generator import CITIES, SynthConfig, SynthSummary, generate

__all__ = ["CITIES", "SynthConfig", "SynthSummary", "generate"]
