#!/usr/bin/env python3
"""Retinal OCT / fundus grading benchmark: grade agreement, lesion detection and attention on
phantoms that training never saw, and the time per series.

    .venv/bin/python benchmarks/oct_grading.py [--count 50] [--device cpu] [--timing-runs 5]

1. Grading: ``--count`` OCT cubes (seeds 9000 + n, 25 B-scans of 128 x 128) and as many colour
   fundus photographs (seeds 9500 + n, 384 x 384), grades 0..4 in turn (training uses seeds
   1000-3999). The series grade as the model reports it (OCT: top quarter of B-scans; fundus: the
   image); quadratic weighted kappa (the DR grading standard), exact accuracy, and the confusion
   matrix, an indeterminate grade counted as its most likely one; and how many were
   indeterminate.
2. Lesion types: per series, each type's highest probability over the graded images against
   whether the phantom has it: ROC AUC, and F1 at the model's threshold.
3. Attention: on phantoms of grade 2 or more, the mean Grad-CAM value inside the lesion boxes
   over the mean outside them (OCT: over the B-scans holding a lesion).
4. Time: one OCT cube and one photograph written as DICOM (multi-frame OPT; RGB OP), loaded with
   ``load_planar`` and graded (Grad-CAM included), median of ``--timing-runs``.

Prints a markdown report.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL_DIR = REPO / "models" / "oct_grading"
OCT_SEED, FUNDUS_SEED = 9000, 9500


def load_model(device: str) -> Any:
    """The model as a worker loads it (torch settings, then the process settled)."""
    from dicomnode.inference import ModelRegistry

    return ModelRegistry([MODEL_DIR.parent]).load(MODEL_DIR.name, device)


def quadratic_kappa(truth: Any, predicted: Any, classes: int = 5) -> float:
    """Cohen's kappa with quadratic weights: the one train.py validates with."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("oct_grading_train", MODEL_DIR / "train.py")
    assert spec is not None and spec.loader is not None
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return float(train.quadratic_kappa(truth, predicted, classes))


def roc_auc(scores: Any, labels: Any) -> float | None:
    """Area under the ROC curve (Mann-Whitney), None without both classes."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    positive, negative = scores[labels], scores[~labels]
    if not len(positive) or not len(negative):
        return None
    greater = (positive[:, None] > negative[None, :]).sum()
    ties = (positive[:, None] == negative[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positive) * len(negative)))


def f1(predicted: Any, labels: Any) -> float:
    predicted, labels = np.asarray(predicted, bool), np.asarray(labels, bool)
    tp = int((predicted & labels).sum())
    fp, fn = int((predicted & ~labels).sum()), int((~predicted & labels).sum())
    return 2 * tp / max(2 * tp + fp + fn, 1)


def volume_of(phantom: Any) -> Any:
    from dicomnode.imaging import FrameRef, Geometry, Volume

    frames = tuple(FrameRef(f"1.2.3.{k}", "", None, "") for k in range(phantom.array.shape[0]))
    geometry = Geometry(np.eye(4), phantom.array.shape[:3])
    return Volume(phantom.array, geometry, frames, phantom.modality, "1.2.3")


def evaluate(model: Any, kind: str, count: int) -> dict[str, Any]:
    from dicomnode.phantoms.retina import fundus_photo, oct_volume

    names = model.fundus_lesions if kind == "fundus" else model.oct_lesions
    threshold = model.threshold("lesion", 0.5)
    truth, predicted, ratios, undecided = [], [], [], 0
    lesion_scores: dict[str, list[float]] = {n: [] for n in names}
    lesion_truth: dict[str, list[bool]] = {n: [] for n in names}
    for n in range(count):
        grade = n % 5
        if kind == "oct":
            phantom = oct_volume(grade, OCT_SEED + n)
        else:
            phantom = fundus_photo(grade, FUNDUS_SEED + n)
        findings = model.predict(volume_of(phantom))
        truth.append(grade)
        summary = findings.summary
        predicted.append(int(summary.get("most_likely_grade", summary["grade"])))
        undecided += bool(summary.get("indeterminate", False))
        for name in names:
            lesion_scores[name].append(float(findings.summary["lesion_probabilities"][name]))
            lesion_truth[name].append(name in phantom.truth.kinds)
        if grade >= 2:
            attention = findings.masks["attention"].astype(float)
            inside = phantom.truth.mask(phantom.array.shape)
            held = inside.any(axis=(1, 2))
            a, m = attention[held], inside[held]
            if m.any() and (~m).any() and a[~m].mean() > 0:
                ratios.append(float(a[m].mean() / a[~m].mean()))
    confusion = np.zeros((5, 5), int)
    np.add.at(confusion, (np.array(truth), np.array(predicted)), 1)
    lesions = {
        name: (
            roc_auc(lesion_scores[name], lesion_truth[name]),
            f1(np.array(lesion_scores[name]) >= threshold, lesion_truth[name]),
            int(np.sum(lesion_truth[name])),
        )
        for name in names
    }
    return {
        "kappa": quadratic_kappa(truth, predicted),
        "accuracy": float(np.mean(np.array(truth) == np.array(predicted))),
        "within_one": float(np.mean(np.abs(np.array(truth) - np.array(predicted)) <= 1)),
        "confusion": confusion,
        "lesions": lesions,
        "attention_ratio": float(np.median(ratios)) if ratios else float("nan"),
        "count": count,
        "indeterminate": undecided,
    }


def timing(model: Any, runs: int) -> dict[str, tuple[float, tuple[int, ...]]]:
    from dicomnode.imaging import load_planar
    from dicomnode.phantoms.retina import fundus_photo, oct_volume

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, phantom in (("oct", oct_volume(3, 8999)), ("fundus", fundus_photo(3, 9499))):
            paths = phantom.write(Path(tmp) / kind)
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                model.predict(load_planar(paths))
                times.append(time.perf_counter() - started)
            out[kind] = (statistics.median(times), phantom.array.shape)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50, help="phantoms of each kind")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timing-runs", type=int, default=5)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    model = load_model(args.device)
    print(f"# oct_grading benchmark ({platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device})\n")  # fmt: skip
    results = {kind: evaluate(model, kind, args.count) for kind in ("oct", "fundus")}
    print("| kind | series | quadratic kappa | accuracy | within one grade | attention in/out "
          "| indeterminate |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for kind, r in results.items():
        print(f"| {kind} | {r['count']} | {r['kappa']:.3f} | {r['accuracy']:.2f} | "
              f"{r['within_one']:.2f} | {r['attention_ratio']:.2f} | "
              f"{r['indeterminate']} |")  # fmt: skip
    for kind, r in results.items():
        print(f"\nConfusion ({kind}; rows truth 0..4, columns predicted 0..4):\n")
        for row in r["confusion"]:
            print("    " + " ".join(f"{v:3d}" for v in row))
    print("\n| kind | lesion type | positives | ROC AUC | F1 at threshold |")
    print("|---|---|---|---|---|")
    for kind, r in results.items():
        for name, (auc, score, positives) in r["lesions"].items():
            shown = "n/a" if auc is None else f"{auc:.3f}"
            print(f"| {kind} | {name} | {positives} | {shown} | {score:.3f} |")
    if args.timing_runs > 0:
        print("\n| input | shape | load + grade + Grad-CAM (median s) |")
        print("|---|---|---|")
        for kind, (seconds, shape) in timing(model, args.timing_runs).items():
            print(f"| {kind} | {'x'.join(map(str, shape))} | {seconds:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
