"""A Key Object Selection document (TID 2010) that flags a job's key images: the summary
Secondary Captures and the source slices they were made from (with their frame numbers in a
multi-frame source), titled "Of Interest", described by the findings' numbers (and the demo
warning), selected by the model as a device."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydicom.dataset import Dataset

from dicomnode.errors import ResultsError
from dicomnode.results.common import Producer, observer_device, stamp
from dicomnode.results.source import SourceImages
from dicomnode.results.uids import ResultUIDs

KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"
#: Key Object Selection Document Title (CID 7010)
OF_INTEREST = ("113000", "DCM", "Of Interest")


def key_sources(images: Sequence[Dataset], source: SourceImages) -> list[tuple[Dataset, list[int]]]:
    """The source instances ``images`` were made from (their Source Image Sequence), each with
    the frame numbers referenced (none: a single-frame image), in first-reference order."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source.datasets}
    frames: dict[str, list[int]] = {}
    for image in images:
        for item in image.get("SourceImageSequence") or ():
            uid = str(item.ReferencedSOPInstanceUID)
            if uid not in by_uid:
                raise ResultsError(f"key image {image.SOPInstanceUID} refers to {uid}, no source")
            listed = frames.setdefault(uid, [])
            if "ReferencedFrameNumber" in item:
                number = int(item.ReferencedFrameNumber)
                if number not in listed:
                    listed.append(number)
    return [(by_uid[uid], sorted(numbers)) for uid, numbers in frames.items()]


def build_kos(
    images: Sequence[Dataset],
    source: SourceImages,
    producer: Producer,
    uids: ResultUIDs,
    when: datetime,
    *,
    description: str,
    series_number: int,
    series_description: str,
) -> Dataset:
    """The KOS of the key ``images`` (summary Secondary Captures) and their source slices."""
    import highdicom as hd

    if not images:
        raise ResultsError("a key object selection needs at least one key image")
    sources = key_sources(images, source)
    device = observer_device(producer, uids)
    referenced = [*images, *(ds for ds, _ in sources)]
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=hd.sr.CodedConcept(*OF_INTEREST),
            referenced_objects=referenced,
            observer_device_context=device,
            description=description,
        )
        _add_frames(content, {str(ds.SOPInstanceUID): numbers for ds, numbers in sources})
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=[*(ds for ds, _ in sources), *images],
            content=content,
            series_instance_uid=uids.series("kos"),
            series_number=series_number,
            sop_instance_uid=uids.instance("kos"),
            instance_number=1,
            manufacturer=producer.manufacturer,
            institution_name=producer.institution_name or None,
            series_description=series_description,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultsError(
            f"KOS of series {source.series_instance_uid} could not be built: {exc}"
        ) from exc
    stamp(kos, when)
    return kos


def _add_frames(content: Sequence[Dataset], frames: dict[str, list[int]]) -> None:
    """The frame numbers of the multi-frame source images referenced (highdicom's selection
    refers to whole instances)."""
    for item in content[0].ContentSequence:
        if item.ValueType != "IMAGE":
            continue
        reference = item.ReferencedSOPSequence[0]
        numbers = frames.get(str(reference.ReferencedSOPInstanceUID))
        if numbers:
            reference.ReferencedFrameNumber = numbers if len(numbers) > 1 else numbers[0]
