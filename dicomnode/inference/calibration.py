"""Calibrated classification: probabilities from logits with the temperature model.toml's
``[calibration]`` holds, and the indeterminate band, so that a result the model cannot decide is
reported as indeterminate rather than guessed (above all, never as absent).

``[calibration]`` in model.toml::

    temperature = 1.4            # probabilities = softmax(logits / temperature), fitted by train.py
    indeterminate = [0.0, 0.45]  # a finding whose probability is in [low, high] is indeterminate
    absent_confidence = 0.9      # "absent" (grade 0, no finding) needs at least this probability

No torch here: the softmax is numpy's, so the writers and tests use it without a network.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.domain import INDETERMINATE, Finding
from dicomnode.errors import ModelError


def calibrated_softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` over the last axis, float64."""
    values = np.asarray(logits, dtype=np.float64) / float(temperature)
    values = values - values.max(axis=-1, keepdims=True)
    exp = np.exp(values)
    return np.asarray(exp / exp.sum(axis=-1, keepdims=True))


def in_band(probability: float, band: tuple[float, float] | None) -> bool:
    """``probability`` lies in the indeterminate ``band`` (inclusive); never without a band."""
    return band is not None and band[0] <= float(probability) <= band[1]


def mark_indeterminate(finding: Finding, reason: str) -> Finding:
    """``finding`` marked indeterminate (``attributes["indeterminate"] = True``), with why."""
    attributes = {**(finding.attributes or {}), INDETERMINATE: True, "indeterminate_reason": reason}
    return dataclasses.replace(finding, attributes=attributes)


def apply_band(finding: Finding, band: tuple[float, float] | None) -> Finding:
    """``finding`` marked indeterminate when its probability is in ``band``, else unchanged."""
    if finding.indeterminate or not in_band(finding.probability, band):
        return finding
    assert band is not None
    return mark_indeterminate(
        finding, f"probability {finding.probability:.2f} in the indeterminate band "
        f"[{band[0]:.2f}, {band[1]:.2f}]"
    )  # fmt: skip


def fit_temperature(
    nll: Callable[[float], float], temperatures: Iterable[float] | None = None
) -> float:
    """The temperature of least ``nll`` (the held-out negative log-likelihood it gives), over a
    log-spaced grid from 0.1 to 5 unless ``temperatures`` is given."""
    grid = list(temperatures) if temperatures is not None else list(np.geomspace(0.1, 5.0, 57))
    scores = [(float(nll(t)), float(t)) for t in grid]
    best = min(scores)
    if not math.isfinite(best[0]):
        raise ModelError(f"no finite negative log-likelihood over temperatures {grid}")
    return round(best[1], 4)


def write_calibration(model_toml: Path, *, table: str = "calibration", **values: float) -> None:
    """Set numbers in model.toml's ``[calibration]`` table, or another (``table``, e.g. the
    fitted ``[thresholds]``); each key must be there already, as ``[weights] sha256`` must be
    for :func:`~dicomnode.inference.weights.save_weights`, so that train.py stores what it
    fitted beside the weights it fitted it for."""
    text = model_toml.read_text(encoding="utf-8")
    for key, value in values.items():
        text, replaced = re.subn(
            rf"(\[{re.escape(table)}\][^\[]*?^{re.escape(key)} = )[-+0-9.eE]+",
            rf"\g<1>{float(value)!r}", text, count=1, flags=re.S | re.M,
        )  # fmt: skip
        if not replaced:
            raise ModelError(f"{model_toml} has no [{table}] {key} = <number> to update")
    model_toml.write_text(text, encoding="utf-8")
