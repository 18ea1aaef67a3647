"""The model runtime: the model protocol, the registry of model packages and MONAI bundles,
device placement, sliding-window inference. It knows nothing of the queue, the database or the
result objects: ``dicomnode.pipeline`` runs a model for a job.

Importing this package imports neither torch nor MONAI: they load when a model is loaded.

- :class:`Model` / :class:`InferenceModel`: what a package in ``models/<name>/`` implements
  (``protocol`` describes ``model.toml``); ``predict(inputs) -> Findings``.
- :class:`ModelRegistry`: finds the packages in ``[models] dirs``, checks weights' sha256, puts
  the networks of ``[models] bundles`` (Model Zoo layout) in place of a package's own, and
  creates and loads a model (:meth:`ModelRegistry.load`).
- :func:`predict`: a loaded model's ``predict``, seeded and cancellable.
- :func:`resolve_device`, :func:`configure_torch`: "cpu" / "cuda" / "cuda:N", determinism.
- :func:`sliding_window`: MONAI's sliding window, float16 autocast on a GPU, cancellable.
- :func:`load_bundle`: a bundle directory's network with its weights.
"""

import os

# torch's OpenMP threads spin after each parallel region by default; on a CPU worker that spin
# takes a core from the loading, preprocessing and writing around the network (measured: series
# load 0.76 -> 0.55 s, mask writing 0.21 -> 0.12 s for a 512x512x300 CT on 2 cores). It only
# takes effect before torch is first imported, which this package never does itself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dicomnode.inference.bundle import Bundle, bundle_layout, load_bundle
from dicomnode.inference.device import (
    CPU,
    Device,
    configure_torch,
    parse_device,
    resolve_device,
    seed_everything,
)
from dicomnode.inference.findings import findings_from_json, findings_to_json
from dicomnode.inference.protocol import (
    InferenceModel,
    LabelSpec,
    Model,
    ModelInfo,
    ModelSpec,
    Prior,
    read_model_toml,
)
from dicomnode.inference.registry import ModelRegistry
from dicomnode.inference.run import predict
from dicomnode.inference.sliding import cancellable, check_cancelled, sliding_window

__all__ = [
    "CPU",
    "Bundle",
    "Device",
    "InferenceModel",
    "LabelSpec",
    "Model",
    "ModelInfo",
    "ModelRegistry",
    "ModelSpec",
    "Prior",
    "bundle_layout",
    "cancellable",
    "check_cancelled",
    "configure_torch",
    "findings_from_json",
    "findings_to_json",
    "load_bundle",
    "parse_device",
    "predict",
    "read_model_toml",
    "resolve_device",
    "seed_everything",
    "sliding_window",
]
