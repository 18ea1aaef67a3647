#!/usr/bin/env python3
"""Lung nodule model benchmark: FROC on phantoms that training never saw, and time per scan.

    .venv/bin/python benchmarks/lung_nodule.py [--scans 12] [--device cpu] [--bundle DIR]
                                               [--skip-froc] [--skip-timing]

1. FROC: ``--scans`` random chest phantoms (seeds 9000 + n; training uses 1000-1999), each with 4
   to 10 solid or ground-glass nodules of 3 to 30 mm, random spacing and orientation. Every
   candidate the model scores (before its probability threshold) counts; a candidate hits a
   nodule when its centre lies within the nodule's radius (at least 3 mm) of the true centre,
   further hits on a nodule are ignored (as LUNA16), anything else is a false positive.
   Sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 false positives per scan, their mean (the CPM), and
   false positives per scan at 90% sensitivity; for the final probability and for the detector's
   score alone (without false-positive reduction). Diameter error of the nodules found at the
   model's threshold.
2. Time: a 512x512x300 chest phantom (0.7x0.7x1.0 mm) written as a DICOM series; the whole job
   (load the series from the files, preprocess, detect, false-positive reduction, measure and
   mask, write the mask file and the findings as the worker does) and the networks' own forward
   time in it, over 3 runs (median), and their ratio.

Prints a markdown report.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL_DIR = REPO / "models" / "lung_nodule"
EVAL_SEED = 9000
FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def _train_module() -> Any:
    spec = importlib.util.spec_from_file_location("lung_nodule_train", MODEL_DIR / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_model(device: str, bundle: Path | None) -> Any:
    """The model as a worker loads it (torch settings, then the process settled)."""
    from dicomnode.inference import ModelRegistry

    bundles = {MODEL_DIR.name: bundle} if bundle else {}
    return ModelRegistry([MODEL_DIR.parent], bundles).load(MODEL_DIR.name, device)


def froc(scans: list[tuple[list[tuple[float, bool, int]], int]], key: int = 0) -> dict[str, Any]:
    """``scans``: per scan, its candidates (score, _, hit nodule index or -1) and nodule count."""
    events = []  # (score, scan, nodule or -1)
    total = 0
    for scan, (candidates, count) in enumerate(scans):
        total += count
        for candidate in candidates:
            events.append((candidate[key], scan, candidate[2]))
    events.sort(key=lambda e: -e[0])
    found: set[tuple[int, int]] = set()
    fps = 0
    curve = [(0.0, 0.0)]  # (fp per scan, sensitivity) after each threshold
    n = len(scans)
    i = 0
    while i < len(events):
        score = events[i][0]
        while i < len(events) and events[i][0] == score:
            _, scan, nodule = events[i]
            if nodule < 0:
                fps += 1
            else:
                found.add((scan, nodule))
            i += 1
        curve.append((fps / n, len(found) / max(total, 1)))
    at = {}
    for rate in FP_RATES:
        at[rate] = max((s for f, s in curve if f <= rate), default=0.0)
    reached = [f for f, s in curve if s >= 0.9]
    return {
        "sensitivity": at,
        "cpm": float(np.mean(list(at.values()))),
        "fp_at_90": min(reached) if reached else None,
        "max_sensitivity": curve[-1][1],
        "nodules": total,
    }


def nodule_hit(centre_mm: Any, truths: Any) -> int:
    """The index of the first true nodule whose radius (at least 3 mm) holds ``centre_mm``, or
    -1 (a false positive)."""
    for index, truth in enumerate(truths):
        distance = np.linalg.norm(np.asarray(centre_mm) - np.array(truth.center_mm))
        if distance <= max(truth.diameter_mm / 2, 3.0):
            return index
    return -1


def run_froc(model: Any, scans: int) -> dict[str, Any]:
    train = _train_module()
    from dicomnode.imaging import FrameRef, Volume

    final: list[tuple[list[tuple[float, bool, int]], int]] = []
    detector_only: list[tuple[list[tuple[float, bool, int]], int]] = []
    size_errors: list[float] = []
    threshold = model.threshold("probability", 0.5)
    seconds = []
    for n in range(scans):
        phantom = train.random_phantom(EVAL_SEED + n)
        frames = tuple(FrameRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2", None, "")
                       for k in range(phantom.array.shape[0]))  # fmt: skip
        volume = Volume(phantom.array, phantom.geometry, frames, "CT", "1.2.3")
        started = time.perf_counter()
        candidates = model.candidates(volume)
        seconds.append(time.perf_counter() - started)
        truths = phantom.truth.nodules
        rows_final, rows_det = [], []
        taken: set[int] = set()
        for candidate in candidates:
            hit = nodule_hit(candidate.centre_mm, truths)
            rows_final.append((candidate.probability, True, hit))
            rows_det.append((candidate.detector_score, True, hit))
            if hit >= 0 and hit not in taken and candidate.probability >= threshold:
                taken.add(hit)
                measured = model.to_findings(volume, [candidate]).findings[0]
                if measured.diameter_mm:
                    true_d = truths[hit].diameter_mm
                    size_errors.append(abs(measured.diameter_mm - true_d) / true_d)
        final.append((rows_final, len(truths)))
        detector_only.append((rows_det, len(truths)))
        print(f"  scan {n}: {len(truths)} nodules, {len(candidates)} candidates, "
              f"{len({r[2] for r in rows_final if r[2] >= 0})} found, "
              f"{seconds[-1]:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
    return {
        "final": froc(final),
        "detector": froc(detector_only),
        "size_error_median": float(np.median(size_errors)) if size_errors else None,
        "size_error_max": float(np.max(size_errors)) if size_errors else None,
        "sized": len(size_errors),
        "seconds": seconds,
    }


def run_timing(model: Any, runs: int) -> dict[str, Any]:
    import torch

    from dicomnode.imaging import load_series
    from dicomnode.inference.findings import findings_to_json, write_masks

    train = _train_module()
    phantom = train.random_phantom(EVAL_SEED + 500, full=True)
    forward = {"t": 0.0}
    network = model.detector.network

    def before(*_: Any) -> None:
        forward["start"] = time.perf_counter()

    def after(*_: Any) -> None:
        forward["t"] += time.perf_counter() - forward["start"]

    # the model's own forward: its networks, the detector and the false-positive classifier
    networks = [network] + ([model.classifier] if model.classifier is not None else [])
    hooks = [hook for net in networks for hook in (net.register_forward_pre_hook(before),
                                                   net.register_forward_hook(after))]  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as folder:
        paths = phantom.write(folder)
        for _ in range(runs):
            forward["t"] = 0.0
            t0 = time.perf_counter()
            volume = load_series(paths)
            t1 = time.perf_counter()
            findings = model.predict(volume)
            t2 = time.perf_counter()
            findings_to_json(findings, write_masks(findings, Path(folder), f"run{len(results)}"))
            t3 = time.perf_counter()
            results.append({
                "load": t1 - t0, "predict": t2 - t1, "write": t3 - t2, "job": t3 - t0,
                "forward": forward["t"], "findings": len(findings.findings),
            })  # fmt: skip
        # where predict's time goes, once more step by step
        for run in range(runs):
            t0 = time.perf_counter()
            image = model.preprocess(volume)
            t1 = time.perf_counter()
            model.detect(image)
            t2 = time.perf_counter()
            results[run].update({"preprocess": t1 - t0, "detect": t2 - t1,
                                 "post": results[run]["predict"] - (t2 - t0)})  # fmt: skip
    for hook in hooks:
        hook.remove()
    median = {k: statistics.median(r[k] for r in results) for k in results[0]}
    median["threads"] = torch.get_num_threads()
    median["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    median["nodules"] = len(phantom.truth.nodules)
    median["shape"] = phantom.array.shape
    return median


def report(args: argparse.Namespace, model: Any, froc_result: Any, timing: Any) -> str:
    lines = ["# Lung nodule model", ""]
    kind = "demo weights" if model.demo else "weights"
    where = f", bundle {args.bundle}" if args.bundle else ""
    threads = timing.get("threads", "?") if timing else "?"
    cpu = platform.processor() or platform.machine()
    lines.append(f"Model {model.name} {model.version} ({kind}{where}), device {args.device}, "
                 f"{cpu}, {threads} threads.")  # fmt: skip
    lines.append("")
    if froc_result:
        f, d = froc_result["final"], froc_result["detector"]
        lines.append(f"## FROC: {args.scans} phantom scans, {f['nodules']} nodules (seeds "
                     f"{EVAL_SEED}+; training never saw them)")  # fmt: skip
        lines.append("")
        rates = " | ".join(f"{r:g}" for r in FP_RATES)
        header = f"| FP/scan | {rates} | CPM | FP/scan at 90% |"
        lines += [header, "|" + "---|" * (len(FP_RATES) + 3)]
        for name, r in (("with FP reduction", f), ("detector alone", d)):
            fp90 = f"{r['fp_at_90']:.2f}" if r["fp_at_90"] is not None else "not reached"
            cells = " | ".join(f"{r['sensitivity'][x]:.3f}" for x in FP_RATES)
            lines.append(f"| {name} | {cells} | **{r['cpm']:.3f}** | {fp90} |")
        lines.append("")
        if froc_result["size_error_median"] is not None:
            lines.append(f"Diameter error of the {froc_result['sized']} nodules found at the "
                         f"threshold: median {froc_result['size_error_median']:.1%}, max "
                         f"{froc_result['size_error_max']:.1%}. Time per FROC scan (in memory): "
                         f"median {statistics.median(froc_result['seconds']):.1f} s.")  # fmt: skip
            lines.append("")
    if timing:
        shape = "x".join(str(s) for s in timing["shape"][::-1])
        lines.append(f"## Time per scan: {shape} CT series (0.7x0.7x1.0 mm), median of "
                     f"{args.runs}")  # fmt: skip
        lines.append("")
        lines += ["| step | seconds |", "|---|---|"]
        for key, name in (("load", "load series from DICOM files"),
                          ("predict", "predict (all below)"), ("preprocess", "- preprocess"),
                          ("detect", "- detect (network + boxes + NMS)"),
                          ("post", "- FP reduction, measure, mask"),
                          ("write", "write the mask and the findings"), ("job", "**whole job**"),
                          ("forward", "networks' forward (detector, classifier)")):  # fmt: skip
            lines.append(f"| {name} | {timing[key]:.2f} |")
        lines.append("")
        lines.append(
            f"Whole job / forward: **{timing['job'] / timing['forward']:.2f}** (target < 1.3). "
            f"Peak resident memory of the process: {timing['peak_rss_mb']:.0f} MB."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=12)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--skip-froc", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args(argv)

    model = load_model(args.device, args.bundle)
    froc_result = None if args.skip_froc else run_froc(model, args.scans)
    timing = None if args.skip_timing else run_timing(model, args.runs)
    print(report(args, model, froc_result, timing))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
