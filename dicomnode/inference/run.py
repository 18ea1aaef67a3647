"""One call of a loaded model, as every caller makes it: seeded, and stoppable."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from dicomnode.errors import ModelError

if TYPE_CHECKING:
    from dicomnode.domain import Findings
    from dicomnode.imaging import Volume
    from dicomnode.inference.protocol import InferenceModel, Prior


def predict(
    model: InferenceModel,
    inputs: Volume | Mapping[str, Volume],
    *,
    seed: int = 0,
    cancelled: threading.Event | None = None,
    priors: Sequence[Prior] = (),
) -> Findings:
    """``model.predict(inputs)`` with every generator seeded with ``seed`` (a rerun gives the
    same findings), stopped at its next sliding window once ``cancelled`` is set; ModelError
    when the model returns something other than Findings. With ``priors``, a model that takes
    them (``predict_with_priors``) gets them; any other model runs as without."""
    from dicomnode.domain import Findings
    from dicomnode.inference.device import seed_everything
    from dicomnode.inference.sliding import cancellable

    seed_everything(seed)
    with cancellable(cancelled):
        with_priors = getattr(model, "predict_with_priors", None)
        if priors and with_priors is not None:
            findings = with_priors(inputs, priors)
        else:
            findings = model.predict(inputs)
    if not isinstance(findings, Findings):
        raise ModelError(
            f"model {model.spec.name!r}: predict returned a {type(findings).__name__}, not Findings"
        )
    return findings
