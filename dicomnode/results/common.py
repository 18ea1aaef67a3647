"""What every result object shares: who made it (the model, as a device of this node), when,
and how its series is described."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from dicomnode.envelope import UNVALIDATED_PREFIX

if TYPE_CHECKING:
    from dicomnode.results.uids import ResultUIDs

#: Said wherever a result made with demo weights is shown (series, SR device, SEG content).
DEMO_NOTE = "demo weights: not for clinical use"
#: A long string (LO) holds at most 64 characters.
LO_MAX = 64


@dataclass(frozen=True)
class Producer:
    """The model that produced the findings and the node that wrote them down."""

    model: str
    version: str
    demo: bool
    manufacturer: str = "dicomnode"
    institution_name: str = ""
    device_serial_number: str = "1"
    #: why the input is outside the model's validated acquisition envelope (a route that
    #: flags it): said in the SR, and every series description starts with UNVALIDATED INPUT
    caveat: str = ""

    @property
    def software_versions(self) -> str:
        from dicomnode import __version__

        return f"dicomnode {__version__}"

    @property
    def model_name(self) -> str:
        """The model as a device: ``name version``, with the demo note when it applies."""
        name = f"{self.model} {self.version}"
        return f"{name} ({DEMO_NOTE})" if self.demo else name

    def describe(self, template: str) -> str:
        """A series description from ``template`` ({model}, {version}); "(demo)" appended for
        demo weights, "UNVALIDATED INPUT: " before it for an input outside the envelope; cut to
        the 64 characters of a long string."""
        text = template.format(model=self.model, version=self.version)
        if self.demo:
            text = f"{text} (demo)"
        if self.caveat:
            text = UNVALIDATED_PREFIX + text
        return text[:LO_MAX]


def lo(text: str) -> str:
    """``text`` cut to a long string's 64 characters."""
    return text[:LO_MAX]


def stamp(ds: Dataset, when: datetime) -> None:
    """Set every date and time of ``ds`` that says when it was made to ``when`` (in the node's
    local time, as DICOM dates are), so the same job writes the same object: highdicom stamps
    the wall clock otherwise."""
    when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = date, time
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    if "DateOfSecondaryCapture" in ds:
        ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, time
    for item in ds.get("ContributingEquipmentSequence") or ():
        if "ContributionDateTime" in item:  # highdicom's own entry, stamped with the clock
            item.ContributionDateTime = date + time


def observer_device(producer: Producer, uids: ResultUIDs) -> Any:
    """The model as the observing device of an SR or a KOS (highdicom's ObserverContext), with
    a UID derived from its name and version."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device_uid(producer.model, producer.version),
            name=producer.model,
            manufacturer_name=producer.manufacturer,
            model_name=producer.model_name,
        ),
    )
