#!/usr/bin/env python3
"""Train the brain tumor model's demo weights on synthetic brain MRI phantoms, on the CPU.

    .venv/bin/python models/brain_tumor/train.py [--phantoms 32] [--steps 350] [--quick]

1. Phantoms (``dicomnode.phantoms.brain.brain_phantom``, seeds 2000 + n): heads with a tumor
   (necrotic core in most, enhancing rim, edema) at a random place and size, in the four
   contrasts, each series on its own random grid (axial, sagittal or coronal, tilted, thin or
   thick slices, its own field of view; ``random_plans``), preprocessed exactly as at inference
   (one 2 mm grid in patient space, cropped to the head, non-zero normalisation).
2. The targets: tumor core, whole tumor and enhancing tumor sampled on that grid.
3. SegResNet (the zoo's blocks, 8 filters) on random 64-voxel cubes (most of a brain, as the
   zoo trains on nearly whole images: the network must see much normal brain round the tumor
   to learn where edema stops, and GroupNorm sees the statistics of a head), most holding the
   tumor, with random flips, per-channel intensity scale and shift, and now and then one
   sequence left out (a route may run without it); Dice + BCE loss on the sigmoid outputs,
   as the zoo's DiceLoss(sigmoid=True), Adam with a cosine schedule.
4. ``weights/demo.pt`` (the network's state dict) and its sha256 in model.toml.

Deterministic for a given torch build and thread count (seeds fixed; 2 threads). About 25
minutes on 2 CPU cores shared with other work (under 10 idle). Seeds 2000-2999 are training's;
tests and benchmarks use others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TRAIN_SEED = 2000
PATCH = 64  # voxels per side of a training cube (128 mm at 2 mm: most of a brain)


def package() -> Any:
    """This package's ``model`` module, imported as the registry does."""
    from dicomnode.inference.registry import import_package

    return importlib.import_module(f"{import_package(HERE, 'brain_tumor').__name__}.model")


def make_model() -> Any:
    from dicomnode.inference import ModelSpec

    return package().BrainTumorModel(ModelSpec.from_directory(HERE))


def targets(labels: np.ndarray) -> np.ndarray:
    """BraTS sub-region labels ``[k, j, i]`` (1 necrotic, 2 edema, 3 enhancing) as the network's
    three nested channels ``[3, x, y, z]``: tumor core, whole tumor, enhancing tumor."""
    tc = (labels == 1) | (labels == 3)
    wt = labels > 0
    et = labels == 3
    return np.ascontiguousarray(np.stack([tc, wt, et]).astype(np.float32).transpose(0, 3, 2, 1))


def sample(seed: int, model: Any, coarsen: tuple[float, float] = (1.4, 2.0)) -> tuple[Any, Any]:
    """One phantom, preprocessed as at inference: the input ``[4, x, y, z]`` and the targets."""
    from dicomnode.phantoms.brain import brain_phantom, random_plans

    phantom = brain_phantom(seed)
    plans = random_plans(np.random.default_rng(seed + 7), coarsen)
    image = model.preprocess(phantom.volumes(plans))
    return image.array, targets(phantom.truth_on(image.grid))


def crop(
    rng: np.random.Generator, image: np.ndarray, target: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A random cube (most often round the tumor), flipped, intensities jittered, sometimes one
    sequence dropped."""
    shape = np.array(image.shape[1:])
    size = np.minimum(PATCH, shape)
    tumor = np.argwhere(target[1] > 0)
    if len(tumor) and rng.random() < 0.7:
        centre = tumor[rng.integers(len(tumor))] + rng.integers(-12, 13, 3)
    else:
        centre = rng.integers(0, shape)
    lo = np.clip(centre - size // 2, 0, shape - size)
    box = tuple(slice(int(a), int(a + s)) for a, s in zip(lo, size, strict=True))
    x = image[(slice(None), *box)].copy()
    y = target[(slice(None), *box)].copy()
    for axis in (1, 2, 3):
        if rng.random() < 0.5:
            x, y = np.flip(x, axis), np.flip(y, axis)
    nonzero = x != 0
    x = x * rng.uniform(0.9, 1.1, (4, 1, 1, 1)).astype(np.float32) + (
        rng.uniform(-0.1, 0.1, (4, 1, 1, 1)).astype(np.float32) * nonzero
    )
    if rng.random() < 0.1:
        x[rng.integers(4)] = 0.0
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    both = float(prediction.sum() + truth.sum())
    return 1.0 if both == 0 else 2.0 * float((prediction & truth).sum()) / both


def train(args: argparse.Namespace) -> None:
    import torch
    from monai.losses import DiceLoss

    torch.set_num_threads(2)
    torch.manual_seed(TRAIN_SEED)
    rng = np.random.default_rng(TRAIN_SEED)
    model = make_model()
    started = time.perf_counter()
    data = [sample(TRAIN_SEED + n, model) for n in range(args.phantoms)]
    print(f"{len(data)} phantoms in {time.perf_counter() - started:.0f} s", flush=True)

    network = model.create_network()
    network.train()
    optimiser = torch.optim.Adam(network.parameters(), lr=args.lr, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=args.steps)
    dice_loss = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True)
    bce = torch.nn.BCEWithLogitsLoss()
    running = 0.0
    for step in range(1, args.steps + 1):
        batch = [crop(rng, *data[rng.integers(len(data))]) for _ in range(args.batch)]
        x = torch.from_numpy(np.stack([b[0] for b in batch]))
        y = torch.from_numpy(np.stack([b[1] for b in batch]))
        logits = network(x)
        loss = dice_loss(logits, y) + bce(logits, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        value = float(loss.detach())
        running = 0.95 * running + 0.05 * value if step > 1 else value
        if step % 25 == 0 or step == args.steps:
            elapsed = time.perf_counter() - started
            print(f"step {step}: loss {running:.3f} ({elapsed:.0f} s)", flush=True)

    network.eval()
    out = HERE / "weights" / "demo.pt"
    state = {k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}
    from dicomnode.inference.weights import save_weights

    digest = save_weights(state, out, HERE / "model.toml")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB), sha256 {digest}", flush=True)

    # a quick check on phantoms training never saw (benchmarks/brain_tumor.py does it properly)
    for seed in range(9000, 9000 + args.check):
        image, target = sample(seed, model, (1.0, 1.0))
        with torch.no_grad():
            probabilities = torch.sigmoid(network(torch.from_numpy(image[None])))[0].numpy()
        scores = [dice(probabilities[c] >= 0.5, target[c] > 0) for c in range(3)]
        print(f"held-out phantom {seed}: Dice TC {scores[0]:.3f} WT {scores[1]:.3f} "
              f"ET {scores[2]:.3f} (working grid)", flush=True)  # fmt: skip
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=32)
    parser.add_argument("--steps", type=int, default=350)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--check", type=int, default=3, help="held-out phantoms to score")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 phantoms, 4 steps")
    args = parser.parse_args()
    if args.quick:
        args.phantoms, args.steps, args.check = 2, 4, 1
    train(args)


if __name__ == "__main__":
    main()
