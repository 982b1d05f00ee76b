"""Private set intersection: bucketed ECDH PSI over X25519 (sans-I/O role objects and
worker-friendly crypto), multi-key and three-party composition, and an openmined-psi
compatible server adapter. See docs/protocols/psi.md. Nothing here does I/O.
"""

from protocols.psi.messages import Mode
from protocols.psi.roles import (
    PsiRequester,
    PsiResponder,
    RequesterResult,
    ResponderResult,
    Step,
)

__all__ = [
    "Mode",
    "PsiRequester",
    "PsiResponder",
    "RequesterResult",
    "ResponderResult",
    "Step",
]
