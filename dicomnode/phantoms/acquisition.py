"""Acquisition effects put on a drawn phantom: a reconstruction kernel, an intensity calibration,
lossy JPEG 2000 as an archive stores it.

The demo models' ``train.py`` draw them at random (domain randomisation) and
``benchmarks/robustness.py`` applies them to its unseen cells, so both use the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def reconstruction_kernel(
    array: np.ndarray, spacing: Sequence[float], sigma_mm: float, sharpen: float = 0.0
) -> np.ndarray:
    """``array`` (``[k, j, i]``, ``spacing`` (column, row, slice) mm) through an in-plane kernel:
    a Gaussian of ``sigma_mm`` (a soft kernel), then, with ``sharpen`` > 0, an unsharp mask of
    that amount (a sharp kernel: edges and noise boosted). float32, the input left as it is."""
    from scipy.ndimage import gaussian_filter

    if sigma_mm <= 0:
        return np.array(array, dtype=np.float32)
    sigma = (0.0, sigma_mm / float(spacing[1]), sigma_mm / float(spacing[0]))
    smooth = gaussian_filter(np.asarray(array, np.float32), sigma)
    if sharpen <= 0:
        return smooth
    return np.asarray(array, np.float32) + np.float32(sharpen) * (array - smooth)


def j2k_round_trip(array: np.ndarray, ratio: float = 12.0) -> np.ndarray:
    """``array`` (frames of one series) encoded as lossy JPEG 2000 at ``ratio``:1 with pydicom's
    encoder (pylibjpeg-openjpeg) and decoded, as a PACS that compresses for storage would return
    it; the values' offset and dtype kept."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import JPEG2000, ExplicitVRLittleEndian

    offset = float(np.floor(array.min()))
    stored = np.clip(np.rint(array - offset), 0, 65535).astype(np.uint16)
    bits = max(int(stored.max()).bit_length(), 8)
    if bits <= 8:
        stored = stored.astype(np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.NumberOfFrames = stored.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = 8 if stored.dtype == np.uint8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.PixelData = stored.tobytes()
    ds.compress(JPEG2000, stored, j2k_cr=[ratio])
    decoded = ds.pixel_array.reshape(stored.shape).astype(np.float64) + offset
    return decoded.astype(array.dtype) if np.issubdtype(array.dtype, np.integer) else decoded
