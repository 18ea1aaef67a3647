"""Findings as standard DICOM objects a PACS shows: a Segmentation (SEG), a Comprehensive 3D SR
following TID 1500, and Secondary Capture images of a classification's attention map.

Built with highdicom (imported when a job's results are built, never at start); every UID is
derived from the job and its input, so the same job writes the same objects.
"""

from dicomnode.results.build import (
    build_not_analysed,
    build_objects,
    build_results,
    reference_volume,
    write_objects,
)
from dicomnode.results.sr import FindingClass

__all__ = [
    "FindingClass",
    "build_not_analysed",
    "build_objects",
    "build_results",
    "reference_volume",
    "write_objects",
]
