"""What decoding needs besides the weights: :class:`DecodingState`.

An adapter carries data for decoding (the datastore of its training
responses, the policy's prior acceptance); the per-step policy needs this
machine's calibrated costs, and learns step times that carry over from one
generation to the next. They live here, not on the model:
:func:`mlx_mtp.loading.load` returns them with the model
(``load(..., return_state=True)``), and the API, the server and the benchmark
pass them on to :func:`mlx_mtp.api.make_decoder` and the decoder.

Code that keeps ``model, tokenizer = load()`` and calls the API without a
state gets the one the loader kept for that model (:func:`state_for`): the
single place where a state is found by its model, so that such code decodes
as before (with the adapter's datastore and priors, and step times that carry
over between calls).
"""

import weakref
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np

from .datastore import Datastore
from .policy import Costs, Priors, StepTimes

__all__ = ["DecodingState", "keep_state", "state_for"]


@dataclass
class DecodingState:
    """The decoding state of one model on this machine."""

    datastore: Optional[Datastore] = None  # the adapter's responses, for drafts where the text has none
    priors: Optional[Priors] = None  # the policy's prior acceptance (the adapter's recipe)
    costs: Optional[Costs] = None  # calibrated seconds per forward (mlx_mtp.calibration), once measured
    times: StepTimes = field(default_factory=StepTimes)  # what the policy's steps measured, across generations

    @classmethod
    def from_adapter(cls, datastore: Optional[np.ndarray], policy_priors: Optional[dict]) -> "DecodingState":
        """From an adapter's raw decoding data (:class:`mlx_mtp.adapter.AdapterData`);
        ValueError for priors that are not well formed."""
        return cls(
            datastore=None if datastore is None else Datastore(datastore),
            priors=Priors.from_dict(policy_priors),
        )


# id(model) -> its state; an entry goes with its model (weakref.finalize)
_KEPT: Dict[int, DecodingState] = {}


def keep_state(model, state: DecodingState) -> DecodingState:
    """Keep ``state`` as the one of ``model`` (the loader's), for :func:`state_for`."""
    key = id(model)
    if key not in _KEPT:
        weakref.finalize(model, _KEPT.pop, key, None)
    _KEPT[key] = state
    return state


def state_for(model, state: Optional[DecodingState] = None) -> DecodingState:
    """``state`` if given, else the one kept for ``model`` (a fresh one, kept,
    for a model the loader did not return)."""
    if state is not None:
        return state
    kept = _KEPT.get(id(model))
    return kept if kept is not None else keep_state(model, DecodingState())
