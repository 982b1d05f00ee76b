"""Vertical federated logistic regression and encrypted lead grading (issue 8, items 2-4).

Sans-I/O role objects the node drives by moving bytes:

* training (:mod:`protocols.vertical_lr.training`): :class:`TrainingGuest` (OEM: labels,
  CRM features) and :class:`TrainingHost` (media platform, dealer). Encrypted, masked Gram
  blocks are computed once; every epoch moves only a few dozen ciphertexts; each party keeps
  its own weight slice (:class:`ModelSlice`); the guest gets validation AUC, lift by decile
  and a Platt calibration (:class:`TrainingReport`).
* grading (:mod:`protocols.vertical_lr.scoring`): standard mode (hosts publish partial
  scores as label bytes; the OEM combines them into a calibrated probability and a grade)
  and strict mode (:class:`StrictGrader` / :class:`StrictKeyHolder`: the OEM learns only the
  grade through blinded comparisons decrypted by the media platform).

What it must not do: no sockets, files, database, logging or pickle. The leakage of each
protocol is stated in docs/protocols/lead-scoring.md.
"""

from protocols.vertical_lr.messages import Message, MsgType, Party
from protocols.vertical_lr.model import (
    TrainingConfig,
    auc,
    fit_platt,
    lift_by_decile,
    train_plaintext,
)
from protocols.vertical_lr.scoring import (
    GRADES,
    GradeSpec,
    StrictGrader,
    StrictKeyHolder,
    combine_standard,
    decode_partial_label,
    encode_partial_label,
    encrypt_partial_labels,
    load_partial_label,
)
from protocols.vertical_lr.states import State
from protocols.vertical_lr.training import (
    ModelSlice,
    TrainingGuest,
    TrainingHost,
    TrainingReport,
    session_shape,
)

__all__ = [
    "GRADES",
    "GradeSpec",
    "Message",
    "ModelSlice",
    "MsgType",
    "Party",
    "State",
    "StrictGrader",
    "StrictKeyHolder",
    "TrainingConfig",
    "TrainingGuest",
    "TrainingHost",
    "TrainingReport",
    "auc",
    "combine_standard",
    "decode_partial_label",
    "encode_partial_label",
    "encrypt_partial_labels",
    "fit_platt",
    "lift_by_decile",
    "load_partial_label",
    "session_shape",
    "train_plaintext",
]
