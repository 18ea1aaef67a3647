"""Sliding-window inference (MONAI's), with mixed precision on a GPU, and cancellation.

A job's cancellation (its ``cancelled`` event) is checked before every window, so a long
prediction stops within one window of being cancelled: the worker sets the event for the thread
that runs the model with :func:`cancellable`; a model's own loops can call
:func:`check_cancelled`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from dicomnode.errors import InferenceCancelled
from dicomnode.inference.device import CPU, Device

_cancel: ContextVar[threading.Event | None] = ContextVar("dicomnode_inference_cancel", default=None)


@contextmanager
def cancellable(event: threading.Event | None) -> Iterator[None]:
    """Within this block, :func:`check_cancelled` raises once ``event`` is set."""
    token = _cancel.set(event)
    try:
        yield
    finally:
        _cancel.reset(token)


def check_cancelled() -> None:
    """Raise InferenceCancelled when the run in this thread was cancelled."""
    event = _cancel.get()
    if event is not None and event.is_set():
        raise InferenceCancelled()


def sliding_window(
    network: Callable[..., Any],
    image: Any,
    *,
    roi_size: Sequence[int] | None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    padding_mode: str = "constant",
    cval: float = 0.0,
    device: Device = CPU,
    amp: bool = True,
    output_device: Device | None = None,
    spatial_dims: int = 3,
) -> Any:
    """Run ``network`` over ``image`` window by window and stitch the outputs.

    ``image`` is a numpy array or tensor, ``(N, C, *spatial)``, ``(C, *spatial)`` (a batch of one)
    or ``(*spatial)`` (one channel) with as many spatial axes as ``roi_size`` has; the windows move
    over the spatial axes in that order (a size of 0 or less takes the whole axis). Windows
    overlap by ``overlap`` and are blended with ``mode`` ("gaussian" or "constant"); an image
    smaller than a window is padded. With ``roi_size`` None the whole image is one window
    (``spatial_dims`` tells its spatial axes).
    Runs without autograd on ``device``, in float16 autocast on a GPU when ``amp``; returns what
    the network returns (a tensor, or a tuple/dict of tensors) as float32 on ``output_device``
    (default: ``device``), with the batch axis.
    """
    import torch

    check_cancelled()
    spatial = len(roi_size) if roi_size is not None else spatial_dims
    tensor = torch.as_tensor(image)
    if not tensor.is_floating_point():
        tensor = tensor.float()
    if tensor.ndim == spatial:
        tensor = tensor[None, None]
    elif tensor.ndim == spatial + 1:
        tensor = tensor[None]
    elif tensor.ndim != spatial + 2:
        raise ValueError(
            f"image has {tensor.ndim} axes; {spatial}D windows need {spatial}, {spatial + 1} "
            f"or {spatial + 2}"
        )
    tensor = tensor.to(device.torch)
    out_device = (output_device or device).torch

    def predictor(window: Any) -> Any:
        check_cancelled()
        return network(window)

    with torch.no_grad(), device.autocast(amp):
        if roi_size is None:
            output = predictor(tensor)
        else:
            from monai.inferers import sliding_window_inference

            output = sliding_window_inference(
                tensor,
                roi_size=tuple(int(n) for n in roi_size),
                sw_batch_size=sw_batch_size,
                predictor=predictor,
                overlap=overlap,
                mode=mode,
                padding_mode=padding_mode,
                cval=cval,
                sw_device=device.torch,
                device=out_device,
            )
    return _float32(output, out_device)


def _float32(value: Any, device: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        out = value.to(device)
        if out.is_floating_point() and out.dtype != torch.float32:
            out = out.float()
        # MONAI may hand back a MetaTensor; models get plain tensors.
        return out.as_tensor() if hasattr(out, "as_tensor") else out
    if isinstance(value, tuple | list):
        return type(value)(_float32(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _float32(v, device) for k, v in value.items()}
    return value
