"""DICOM series -> oriented volumes, and results back to patient coordinates and source frames.

``load_series`` sorts frames by position along the slice normal (never by Instance Number), takes
spacing from the positions and orientation from Image Orientation (Patient), applies Rescale
Slope/Intercept, reads single-frame and enhanced multi-frame objects in any transfer syntax
pydicom can decode, and refuses a series that cannot form one volume with a SeriesNotVolume
subclass that says why. Geometry maps voxel indices to patient LPS mm and back; Volume.frames
maps each slice to its source frame. ``load_planar`` keeps ophthalmic frames (OCT B-scans, colour
fundus photographs) as a Volume even without patient positions (a nominal geometry then).
"""

from dicomnode.imaging.geometry import Geometry
from dicomnode.imaging.grid import on_grid, patient_grid, resample_array
from dicomnode.imaging.load import load_series, load_series_split
from dicomnode.imaging.planar import is_planar, load_planar
from dicomnode.imaging.resample import resample, respaced
from dicomnode.imaging.stack import StackRules
from dicomnode.imaging.volume import FrameRef, Volume

__all__ = [
    "FrameRef",
    "Geometry",
    "StackRules",
    "Volume",
    "is_planar",
    "load_planar",
    "load_series",
    "load_series_split",
    "on_grid",
    "patient_grid",
    "resample",
    "resample_array",
    "respaced",
]
