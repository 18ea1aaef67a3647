#!/usr/bin/env python3
"""Train the lung nodule model's demo weights on synthetic chest CT phantoms, on the CPU.

    .venv/bin/python models/lung_nodule/train.py [--phantoms 24] [--steps 900] [--quick]
                                                 [--init WEIGHTS --lr 1e-3] [--validate 8]

1. Phantoms (``dicomnode.phantoms.chest.chest_ct``, seeds 1000 + n): chest CTs with 4 to 10
   solid or ground-glass nodules of 3 to 30 mm at random places in the lungs, each with its own
   random acquisition (domain randomisation, ``random_chest_settings``): head-first axial,
   feet-first, oblique or coronal; pixels 0.6-1.2 mm, slices 0.8-4 mm apart; noise 5-35 HU; a
   soft or sharp reconstruction kernel or none; a HU calibration off by up to 3 % and 15 HU; now
   and then lossy JPEG 2000. Each preprocessed exactly as at inference.
2. The detector (MONAI RetinaNet, ATSS matcher, hard negative sampler, as the zoo trains it) on
   random patches, most of them holding a nodule, with random flips.
3. The false-positive classifier on 32 mm cubes: the nodules (jittered), the detector's false
   positives on the training phantoms, and vessel points.
4. ``weights/demo.pt`` (the state dict of ``DemoNetworks``) and its sha256 in model.toml.
5. ``--validate N``: sensitivity and FP/scan of the reported findings on N held-out phantoms
   with random acquisitions (seeds 1900 + n); ``--validate-only WEIGHTS`` scores a weights file
   (the before/after comparison of a retraining).

Deterministic for a given torch build and thread count (seeds fixed; ``--threads``, 2 unless
told). From scratch (the defaults): about 12-15 minutes on 2 idle CPU cores. The shipped weights
(issue 19) keep the first demo weights' detector and retrain the classifier on the randomised
phantoms: ``git show 0d9ba4e:models/lung_nodule/weights/demo.pt > FILE``, then ``--init FILE
--phantoms 20 --steps 0 --classifier-steps 200 --lr 1e-3 --threads 1 --validate 8``: 9 minutes
to the weights (plus 3 for the validation) on a CPU shared with other work (load 5-7 on 2 cores).
Seeds 1000-1999 are training's; tests and benchmarks use others.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TRAIN_SEED = 1000
PATCH = (96, 96, 64)  # x, y, z voxels of the model grid


def package() -> tuple[Any, Any, Any]:
    """This package's ``model``, ``preprocess`` and ``network`` modules, imported as the
    registry does."""
    from dicomnode.inference.registry import import_package

    name = import_package(HERE, "lung_nodule").__name__
    model, preprocess, network = (
        importlib.import_module(f"{name}.{m}") for m in ("model", "preprocess", "network")
    )
    return model, preprocess, network


def random_phantom(seed: int, *, nodules: tuple[int, int] = (4, 10), full: bool = False) -> Any:
    """A random chest phantom for training or evaluation (``full``: 512x512x300, 0.7x0.7x1 mm)."""
    from dicomnode.phantoms.chest import chest_ct_with_room

    rng = np.random.default_rng(seed)
    orientation = str(rng.choice(["axial", "axial", "feet_first", "oblique"]))
    if full:
        shape, spacing = (300, 512, 512), (0.7, 0.7, 1.0)
    else:
        pixel = float(rng.uniform(0.6, 0.95))
        side = min(512, int(rng.uniform(280, 380) / pixel))
        step = float(rng.choice([0.8, 1.0, 1.25, 1.5, 2.0, 2.5]))
        slices = int(rng.uniform(150, 260) / step)
        shape, spacing = (slices, side, side), (pixel, pixel, step)
    count = int(rng.integers(nodules[0], nodules[1] + 1))
    return chest_ct_with_room(shape, spacing, orientation, count, seed, ground_glass_fraction=0.3)


#: the second word of the generator drawing a training phantom's acquisition settings
SETTINGS_STREAM = 7
#: coronal slices: columns to the patient's left, rows down the body, slices to the back
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, -1.0, 0.0))
#: per-phantom choices of the domain randomisation (``random_chest_settings``)
ORIENTATIONS = ("axial", "axial", "feet_first", "oblique", "coronal")
SLICE_STEPS_MM = (0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)


def random_chest_settings(rng: np.random.Generator) -> dict[str, Any]:
    """One acquisition for a training phantom (domain randomisation): orientation (coronal too),
    pixel 0.6-1.2 mm, slices 0.8-4 mm apart, noise 5-35 HU, a soft (Gaussian 0.3-0.9 mm) or sharp
    (unsharp mask 0.3-1.0) kernel or none, a HU calibration off by up to 3 % and 15 HU, and now
    and then lossy JPEG 2000 (8:1 to 16:1)."""
    kernel = rng.random()
    return {
        "orientation": str(rng.choice(ORIENTATIONS)),
        "pixel": float(rng.uniform(0.6, 1.2)),
        "step": float(rng.choice(SLICE_STEPS_MM)),
        "noise_hu": float(rng.uniform(5.0, 35.0)),
        "sigma_mm": float(rng.uniform(0.3, 0.9)) if kernel < 0.5 else 0.0,
        "sharpen": float(rng.uniform(0.3, 1.0)) if kernel < 0.2 else 0.0,
        "scale": float(rng.uniform(0.97, 1.03)),
        "offset_hu": float(rng.uniform(-15.0, 15.0)),
        "j2k_ratio": float(rng.uniform(8.0, 16.0)) if rng.random() < 0.15 else 0.0,
    }


def training_phantom(seed: int) -> Any:
    """A chest phantom of ``seed`` drawn with its own random acquisition
    (``random_chest_settings``): what the detector and the classifier train on. The nodules
    and anatomy come from ``seed`` as in ``random_phantom``."""
    import dataclasses

    from dicomnode.phantoms.acquisition import j2k_round_trip, reconstruction_kernel
    from dicomnode.phantoms.chest import chest_ct_with_room

    rng = np.random.default_rng(seed)
    settings = random_chest_settings(np.random.default_rng([seed, SETTINGS_STREAM]))
    pixel, step = settings["pixel"], settings["step"]
    side = min(512, int(rng.uniform(280, 380) / pixel))
    orientation: Any = settings["orientation"]
    if orientation == "coronal":  # slices front to back, rows down the body
        shape = (int(rng.uniform(200, 260) / step), int(rng.uniform(200, 240) / pixel), side)
        orientation = np.array(CORONAL)
    else:
        shape = (int(rng.uniform(150, 260) / step), side, side)
    count = int(rng.integers(4, 11))
    phantom = chest_ct_with_room(
        shape, (pixel, pixel, step), orientation, count, seed,
        ground_glass_fraction=0.3, noise_hu=settings["noise_hu"],
    )  # fmt: skip
    array = reconstruction_kernel(
        phantom.array, phantom.geometry.spacing, settings["sigma_mm"], settings["sharpen"]
    )
    array = array * np.float32(settings["scale"]) + np.float32(settings["offset_hu"])
    np.clip(array, -1024, 3071, out=array)
    if settings["j2k_ratio"]:
        array = j2k_round_trip(array, settings["j2k_ratio"]).astype(np.float32)
    return dataclasses.replace(phantom, array=np.ascontiguousarray(array, dtype=np.float32))


def boxes_in_model_space(image: Any, truth: Any, spacing: Any) -> np.ndarray:
    """Truth nodules as ``xyzxyz`` boxes on the model grid (voxel centres on integers)."""
    boxes = []
    for nodule in truth.nodules:
        centre = image.to_voxel(np.array(nodule.center_mm))
        half = nodule.diameter_mm / 2 / np.asarray(spacing, float)
        boxes.append(np.concatenate([centre - half, centre + half]))
    return np.array(boxes, dtype=np.float32).reshape(-1, 6)


def sample_patch(
    rng: np.random.Generator, image: np.ndarray, boxes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A training patch (most often around a nodule), its boxes, random flips."""
    size = np.array(PATCH)
    shape = np.array(image.shape)
    if len(boxes) and rng.random() < 0.85:
        box = boxes[rng.integers(len(boxes))]
        centre = (box[:3] + box[3:]) / 2
        slack = np.maximum(size / 2 - (box[3:] - box[:3]) / 2 - 2, 0)
        centre = centre + rng.uniform(-slack, slack)
    else:
        centre = rng.uniform(0, shape)
    lo = np.rint(centre - size / 2).astype(int)
    patch = np.zeros(PATCH, dtype=np.float32)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(lo + size, shape)
    if np.all(src_hi > src_lo):
        dst = tuple(slice(a - b, c - b) for a, b, c in zip(src_lo, lo, src_hi, strict=True))
        src = tuple(slice(a, c) for a, c in zip(src_lo, src_hi, strict=True))
        patch[dst] = image[src]
    local = boxes.copy()
    local[:, :3] -= lo
    local[:, 3:] -= lo
    centres = (local[:, :3] + local[:, 3:]) / 2
    keep = np.all((centres >= 0) & (centres <= size - 1), axis=1)
    local = local[keep]
    local[:, :3] = np.maximum(local[:, :3], -0.5)
    local[:, 3:] = np.minimum(local[:, 3:], size - 0.5)
    for axis in range(3):
        if rng.random() < 0.5:
            patch = np.flip(patch, axis)
            lo_edge = size[axis] - 1 - local[:, 3 + axis]
            hi_edge = size[axis] - 1 - local[:, axis]
            local[:, axis], local[:, 3 + axis] = lo_edge, hi_edge
    return np.ascontiguousarray(patch), local


def train_detector(network_module: Any, data: list[dict[str, Any]], spec: Any, steps: int,
                   seed: int, lr: float = 2e-3, init: dict[str, Any] | None = None
                   ) -> Any:  # fmt: skip
    import torch

    from dicomnode.inference.compat import ensure_detection_without_torchvision

    ensure_detection_without_torchvision()  # building and training the detector
    params = spec.info.params
    torch.manual_seed(seed)
    network = network_module.build_retinanet(params["network"])
    if init is not None:
        network.load_state_dict(init)
    detector = network_module.build_detector(network, params["anchors"], params["box_selector"])
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    detector.set_hard_negative_sampler(
        batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16
    )
    detector.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)) + 0.02),
    )
    rng = np.random.default_rng(seed)
    start = time.monotonic()
    running = 0.0
    for step in range(steps):
        images, targets = [], []
        for _ in range(2):
            item = data[rng.integers(len(data))]
            patch, boxes = sample_patch(rng, item["image"], item["boxes"])
            images.append(torch.from_numpy(patch)[None])
            targets.append({"box": torch.from_numpy(boxes.astype(np.float32)),
                            "label": torch.zeros(len(boxes), dtype=torch.long)})  # fmt: skip
        losses = detector(torch.stack(images), targets)
        loss = losses["classification"] + losses["box_regression"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 10.0)
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * float(loss.detach()) if step else float(loss.detach())
        if step % 100 == 0 or step == steps - 1:
            print(f"  detector step {step:4d}  loss {running:.3f}  "
                  f"{time.monotonic() - start:.0f} s", flush=True)  # fmt: skip
    return network.eval()


def classifier_examples(model: Any, preprocess: Any, seeds: list[int], rng: np.random.Generator
                        ) -> tuple[Any, Any]:  # fmt: skip
    """Crops and labels: nodules (jittered), the detector's false positives, vessel points."""
    import torch

    crops, labels = [], []
    for seed in seeds:
        phantom = training_phantom(seed)
        volume = _volume(phantom)
        image = model.preprocess(volume)
        found = model.detect(image)
        truths = [(np.array(n.center_mm), n.diameter_mm / 2) for n in phantom.truth.nodules]
        points, kinds = [], []
        for candidate in found:
            hit = any(np.linalg.norm(candidate.centre_mm - c) <= max(r, 4.0) for c, r in truths)
            points.append(candidate.centre_mm)
            kinds.append(1.0 if hit else 0.0)
        for centre, radius in truths:
            for _ in range(3):
                jitter = rng.uniform(-1, 1, 3) * min(2.0, radius * 0.4)
                points.append(centre + jitter)
                kinds.append(1.0)
        # vessels and lung: points of the lung above -600 HU away from every nodule
        k, j, i = np.nonzero(phantom.lung_mask & (phantom.array > -600))
        if len(k):
            pick = rng.choice(len(k), size=min(20, len(k)), replace=False)
            for index in pick:
                p = volume.geometry.voxel_to_patient([i[index], j[index], k[index]])
                if all(np.linalg.norm(p - c) > r + 6 for c, r in truths):
                    points.append(p)
                    kinds.append(0.0)
        crops.append(preprocess.crop_cubes(phantom.array, phantom.geometry.affine,
                                           np.array(points)))  # fmt: skip
        labels.extend(kinds)
        hits = sum(1 for c in found if any(
            np.linalg.norm(c.centre_mm - t) <= max(r, 4.0) for t, r in truths))  # fmt: skip
        print(f"  phantom {seed}: {len(truths)} nodules, {len(found)} candidates, {hits} on "
              "nodules", flush=True)  # fmt: skip
    return torch.cat(crops), torch.tensor(labels)


def train_classifier(network_module: Any, spec: Any, crops: Any, labels: Any, steps: int,
                     seed: int, lr: float = 2e-3, init: dict[str, Any] | None = None
                     ) -> Any:  # fmt: skip
    import torch

    torch.manual_seed(seed)
    classifier = network_module.PatchClassifier(
        tuple(spec.info.params.get("classifier", {}).get("channels", (8, 16, 32)))
    )
    if init is not None:
        classifier.load_state_dict(init)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    rng = np.random.default_rng(seed)
    positives = np.flatnonzero(labels.numpy() > 0.5)
    negatives = np.flatnonzero(labels.numpy() <= 0.5)
    print(f"  classifier: {len(positives)} positive, {len(negatives)} negative crops")
    loss_fn = torch.nn.BCEWithLogitsLoss()
    classifier.train()
    running = 0.0
    for step in range(steps):
        index = np.concatenate([rng.choice(positives, 16), rng.choice(negatives, 16)])
        batch = crops[torch.from_numpy(index)]
        for axis in (2, 3, 4):
            if rng.random() < 0.5:
                batch = batch.flip(axis)
        if rng.random() < 0.5:
            batch = batch.transpose(3, 4)
        loss = loss_fn(classifier(batch), labels[torch.from_numpy(index)].float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        running = 0.95 * running + 0.05 * float(loss.detach()) if step else float(loss.detach())
        if step % 100 == 0 or step == steps - 1:
            print(f"  classifier step {step:4d}  loss {running:.3f}", flush=True)
    return classifier.eval()


def _volume(phantom: Any) -> Any:
    from dicomnode.imaging import FrameRef, Volume

    frames = tuple(FrameRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2", None, "")
                   for k in range(phantom.array.shape[0]))  # fmt: skip
    return Volume(phantom.array, phantom.geometry, frames, "CT", "1.2.3")


VAL_SEED = 1900  # held-out validation phantoms (random acquisitions), inside training's range


def demo_model(spec: Any, networks: Any) -> Any:
    """The package's model around ``networks`` (a ``DemoNetworks``), on the CPU, set up as the
    registry sets it up."""
    from dicomnode.inference.device import resolve_device

    model_module, _, _ = package()
    model = model_module.LungNoduleModel(spec)
    model.device = resolve_device("cpu")
    model.network = networks.eval()
    model.setup()
    return model


def validate(model: Any, count: int) -> dict[str, float]:
    """Sensitivity and false positives per scan of the reported findings on ``count`` held-out
    phantoms with random acquisitions (seeds ``VAL_SEED + n``), a hit as the benchmarks score
    it (within the nodule's radius, at least 3 mm)."""
    nodules = found = false = 0
    for n in range(count):
        phantom = training_phantom(VAL_SEED + n)
        truths = [(np.array(t.center_mm), max(t.diameter_mm / 2, 3.0))
                  for t in phantom.truth.nodules]  # fmt: skip
        hits: set[int] = set()
        for finding in model.predict(_volume(phantom)).findings:
            near = [k for k, (c, r) in enumerate(truths)
                    if np.linalg.norm(np.asarray(finding.centre_mm) - c) <= r]  # fmt: skip
            hits.update(near[:1])
            false += not near
        nodules, found = nodules + len(truths), found + len(hits)
        print(f"  validation phantom {VAL_SEED + n}: {len(hits)}/{len(truths)} nodules, "
              f"{false} false positives so far", flush=True)  # fmt: skip
    result = {"sensitivity": found / max(nodules, 1), "fp_per_scan": false / max(count, 1)}
    print(
        f"validation ({count} phantoms, {nodules} nodules): sensitivity "
        f"{result['sensitivity']:.3f}, {result['fp_per_scan']:.2f} FP/scan",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phantoms", type=int, default=20)
    parser.add_argument(
        "--steps", type=int, default=900, help="detector steps (batch of 2; 0 with --init: kept)"
    )
    parser.add_argument("--classifier-steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (both nets)")
    parser.add_argument(
        "--init", type=Path, default=None, help="start from these weights (fine-tuning)"
    )
    parser.add_argument(
        "--validate", type=int, default=0, help="held-out random-acquisition phantoms to score"
    )
    parser.add_argument(
        "--validate-only",
        type=Path,
        default=None,
        help="only score this weights file on --validate phantoms (e.g. to compare two)",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (the result depends on it)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: few phantoms/steps")
    parser.add_argument("--out", type=Path, default=HERE / "weights" / "demo.pt")
    parser.add_argument(
        "--detector-checkpoint",
        type=Path,
        default=None,
        help="reuse the detector saved here, or save it here after training",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.phantoms, args.steps, args.classifier_steps = 3, 20, 20

    import torch

    from dicomnode.inference import ModelSpec
    from dicomnode.inference.weights import load_state_dict

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    began = time.monotonic()
    model_module, preprocess, network_module = package()
    spec = ModelSpec.from_directory(HERE)

    def networks_of(path: Path) -> Any:
        networks = model_module.DemoNetworks(spec.info.params["network"],
                                             spec.info.params.get("classifier", {}))  # fmt: skip
        networks.load_state_dict(load_state_dict(path))
        return networks

    if args.validate_only is not None:
        validate(demo_model(spec, networks_of(args.validate_only)), args.validate or 8)
        return 0
    init = networks_of(args.init) if args.init is not None else None
    if init is not None:
        print(f"starting from {args.init}", flush=True)
    seeds = [TRAIN_SEED + n for n in range(args.phantoms)]
    checkpoint = args.detector_checkpoint
    if checkpoint is not None and checkpoint.is_file():
        print(f"detector: from {checkpoint}", flush=True)
        detector = network_module.build_retinanet(spec.info.params["network"])
        detector.load_state_dict(torch.load(checkpoint, weights_only=True))
        detector.eval()
    elif init is not None and args.steps == 0:
        print("detector: as --init has it (only the classifier trained)", flush=True)
        detector = init.detector.eval()
    else:
        data = []
        print(f"phantoms: {args.phantoms}", flush=True)
        spacing, hu_window = spec.info.params["spacing"], spec.info.params["hu_window"]
        for seed in seeds:
            phantom = training_phantom(seed)
            image = preprocess.to_model_space(
                phantom.array, phantom.geometry.affine, spacing, hu_window
            )
            boxes = boxes_in_model_space(image, phantom.truth, spacing)
            data.append({"image": image.array, "boxes": boxes})
        print(f"  {sum(len(d['boxes']) for d in data)} nodules, "
              f"{time.monotonic() - began:.0f} s", flush=True)  # fmt: skip
        print(f"detector: {args.steps} steps", flush=True)
        detector = train_detector(network_module, data, spec, args.steps, seed=1, lr=args.lr,
                                  init=init.detector.state_dict() if init else None)  # fmt: skip
        del data
        if checkpoint is not None:
            torch.save(detector.state_dict(), checkpoint)

    print("false-positive classifier", flush=True)
    networks = model_module.DemoNetworks(spec.info.params["network"],
                                         spec.info.params.get("classifier", {}))  # fmt: skip
    networks.detector.load_state_dict(detector.state_dict())
    model = demo_model(spec, networks)
    model.classifier = None
    rng = np.random.default_rng(2)
    crops, labels = classifier_examples(model, preprocess, seeds, rng)
    classifier = train_classifier(network_module, spec, crops, labels, args.classifier_steps,
                                  seed=3, lr=args.lr,
                                  init=init.classifier.state_dict() if init else None)  # fmt: skip
    networks.classifier.load_state_dict(classifier.state_dict())
    state = {k: v.detach().clone().contiguous() for k, v in networks.state_dict().items()}
    from dicomnode.inference.weights import save_weights, sha256_of

    if args.out.resolve() == (HERE / "weights" / "demo.pt").resolve():
        digest = save_weights(state, args.out, HERE / "model.toml")
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, args.out)
        digest = sha256_of(args.out)
    size = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size:.1f} MB, sha256 {digest}) in "
          f"{time.monotonic() - began:.0f} s", flush=True)  # fmt: skip
    if args.validate:
        validate(demo_model(spec, networks), args.validate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
