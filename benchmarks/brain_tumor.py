#!/usr/bin/env python3
"""Brain tumor model benchmark: Dice on phantom studies that training never saw, time per study.

    .venv/bin/python benchmarks/brain_tumor.py [--studies 6] [--device cpu] [--bundle DIR]

Each study is a random brain phantom (seeds 9100 + n; training uses 2000-2999) with a tumor of
random place and size, written as four DICOM MR series: the routine protocol (sagittal T1 SE,
axial T2 TSE, tilted axial FLAIR, 3D T1 post-contrast) for even n, a random one (each series
axial, sagittal or coronal, tilted, thin or thick, its own field of view) for odd n. The model
runs as the worker runs it, timed by stage:

- load: the four series from their files (``load_series``);
- resample: one grid in patient space, crop to the head, normalisation (``preprocess``);
- predict: the network (``segment``);
- post: probabilities back onto the FLAIR grid, sub-regions, findings.

Dice of whole tumor (WT: labels 1-3), tumor core (TC: 1, 3) and enhancing tumor (ET: 3) against
the phantom's truth sampled on the FLAIR grid; and the relative error of the whole tumor's volume.
Prints a markdown report.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL_DIR = REPO / "models" / "brain_tumor"
EVAL_SEED = 9100
STAGES = ("load", "resample", "predict", "post")


def load_model(device: str, bundle: Path | None) -> Any:
    """The model as a worker loads it (torch settings, then the process settled)."""
    from dicomnode.inference import ModelRegistry

    bundles = {MODEL_DIR.name: bundle} if bundle else {}
    return ModelRegistry([MODEL_DIR.parent], bundles).load(MODEL_DIR.name, device)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def run_study(
    model: Any, seed: int, folder: Path, *, phantom: Any = None, plans: Any = None,
    written: Callable[[Any], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One study run and scored; ``phantom`` and ``plans`` replace the seed's own (the routine
    protocol for even seeds, a random one for odd), ``written`` may change the files written
    (e.g. compress them) before they are loaded."""
    from dicomnode.imaging import load_series
    from dicomnode.phantoms.brain import STUDY, brain_phantom, random_plans

    phantom = brain_phantom(seed) if phantom is None else phantom
    if plans is None:
        plans = STUDY if seed % 2 == 0 else random_plans(np.random.default_rng(seed))
    study = phantom.write(folder / str(seed), plans)
    if written is not None:
        written(study)
    times: dict[str, float] = {}
    started = time.perf_counter()
    volumes = {contrast: load_series(paths) for contrast, paths in study.paths.items()}
    times["load"] = time.perf_counter() - started
    started = time.perf_counter()
    image = model.preprocess(volumes)
    times["resample"] = time.perf_counter() - started
    started = time.perf_counter()
    probabilities = model.segment(image)
    times["predict"] = time.perf_counter() - started
    started = time.perf_counter()
    reference = volumes["FLAIR"]
    labels, on_reference = model.sub_regions(probabilities, image.grid, reference.geometry)
    findings = model.to_findings(labels, on_reference, reference, "FLAIR", image)
    times["post"] = time.perf_counter() - started
    truth = phantom.truth_on(reference.geometry)
    true_wt = sum(study.truth.volumes_mm3.values())
    return {
        "seed": seed,
        "protocol": "routine" if seed % 2 == 0 else "random",
        "grid": "x".join(str(n) for n in image.grid.shape[::-1]),
        "WT": dice(labels > 0, truth > 0),
        "TC": dice(np.isin(labels, (1, 3)), np.isin(truth, (1, 3))),
        "ET": dice(labels == 3, truth == 3),
        "wt_volume_error": findings.summary["whole_tumor_mm3"] / true_wt - 1.0,
        "et_volume_error": findings.summary["enhancing_tumor_mm3"]
        / max(study.truth.volumes_mm3["enhancing_tumor"], 1e-6)
        - 1.0,
        "true_wt_ml": true_wt / 1000,
        "times": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bundle", type=Path, default=None, help="a brats_mri_segmentation bundle")
    args = parser.parse_args()

    import torch

    from dicomnode.inference import configure_torch, resolve_device

    device = resolve_device(args.device)
    configure_torch(device, seed=0, deterministic=True, threads=0)
    started = time.perf_counter()
    model = load_model(args.device, args.bundle)
    load_s = time.perf_counter() - started
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.studies):
            rows.append(run_study(model, EVAL_SEED + n, Path(tmp)))

    print(f"# Brain tumor model: {args.studies} unseen phantom studies\n")
    print(f"- machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {device}; model {model.name} {model.version} (demo={model.demo}), "
          f"loaded in {load_s:.2f} s")  # fmt: skip
    print(f"- working grid {model.spacing:g} mm; Dice on the FLAIR grid against the truth\n")
    print("| seed | protocol | grid (x y z) | WT ml | Dice WT | Dice TC | Dice ET | WT vol. err |"
          " load s | resample s | predict s | post s | total s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["times"]
        stages = " | ".join(f"{t[s]:.2f}" for s in STAGES)
        print(f"| {r['seed']} | {r['protocol']} | {r['grid']} | {r['true_wt_ml']:.1f} | "
              f"{r['WT']:.3f} | {r['TC']:.3f} | {r['ET']:.3f} | {r['wt_volume_error']:+.1%} | "
              f"{stages} | {sum(t.values()):.2f} |")  # fmt: skip
    mean = {k: statistics.mean(r[k] for r in rows) for k in ("WT", "TC", "ET")}
    median = {s: statistics.median(r["times"][s] for r in rows) for s in STAGES}
    total = statistics.median(sum(r["times"].values()) for r in rows)
    print(f"| **mean / median** | | | | **{mean['WT']:.3f}** | **{mean['TC']:.3f}** | "
          f"**{mean['ET']:.3f}** | "
          f"{statistics.mean(abs(r['wt_volume_error']) for r in rows):.1%} (abs) | "
          + " | ".join(f"{median[s]:.2f}" for s in STAGES) + f" | **{total:.2f}** |")  # fmt: skip
    verdict = "meets" if mean["WT"] >= 0.85 else "misses"
    print(f"\nWhole tumor Dice {mean['WT']:.3f} {verdict} the target (>= 0.85).")


if __name__ == "__main__":
    main()
