"""One exception tree for dicomnode.

Each class's docstring is its default message, and each carries the DICOM status (for C-STORE
responses) or HTTP code it maps to, so every layer reports a failure the same way.
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """dicomnode failed."""

    #: DICOM status sent back when this error refuses an instance.
    dicom_status: int = 0xC000
    #: HTTP status for the API.
    http_status: int = 500
    #: the same input would fail the same way again: a job failing with it is not retried
    permanent: bool = False

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(DicomNodeError):
    """The configuration is not valid."""


class DatabaseError(DicomNodeError):
    """The database could not be reached or is not at the expected schema."""


class StoreRefused(DicomNodeError):
    """The instance was refused."""


class OutOfResources(StoreRefused):
    """Free disk space is below the configured floor; the instance was not stored."""

    dicom_status = 0xA700
    http_status = 507  # Insufficient Storage: a STOW-RS request refused before its parts


class DatasetRejected(StoreRefused):
    """The dataset cannot be understood."""

    dicom_status = 0xC000


class MalformedDataset(DatasetRejected):
    """The dataset is truncated or malformed and could not be parsed."""

    dicom_status = 0xC001


class MissingIdentifier(DatasetRejected):
    """The dataset lacks a Study, Series or SOP Instance UID."""

    dicom_status = 0xC002


class InvalidIdentifier(DatasetRejected):
    """A UID in the dataset is not a valid DICOM UID."""

    dicom_status = 0xC003


class EmptyPixelData(DatasetRejected):
    """The dataset's Pixel Data is empty."""

    dicom_status = 0xC004


class PixelDataSizeMismatch(DatasetRejected):
    """The dataset's Pixel Data is shorter than its image attributes require."""

    dicom_status = 0xC005


class PixelDescriptionInvalid(DatasetRejected):
    """The dataset's image attributes describe no valid image: a zero dimension or frame
    count, or an impossible Bits Allocated or Samples per Pixel."""

    dicom_status = 0xC006


class DatasetTooLarge(DatasetRejected):
    """The dataset asks for more than the node's limits: it inflates, or its pixel data
    decodes, past the configured maximum."""

    dicom_status = 0xC007


class SOPClassMismatch(DatasetRejected):
    """The dataset's SOP Class UID differs from the one negotiated for it."""

    dicom_status = 0xA900


class SOPInstanceMismatch(DatasetRejected):
    """The dataset's SOP Instance UID differs from the one in the C-STORE request."""

    dicom_status = 0xA900


class StudyMismatch(DatasetRejected):
    """The dataset's Study Instance UID differs from the study the STOW-RS request names."""

    #: PS3.18 Table I.2-2 has no code for it (it allows others); 0xC409 is dcm4chee-arc's
    dicom_status = 0xC409


class InvalidRequestUID(StoreRefused):
    """The request's Affected SOP Instance UID is missing or not a valid UID (digits and dots,
    at most 64 characters)."""

    dicom_status = 0x0117  # Invalid SOP Instance (PS3.7 Annex C)


class InvalidRequestSOPClass(StoreRefused):
    """The request's Affected SOP Class UID is missing or not a valid UID (digits and dots, at
    most 64 characters)."""

    dicom_status = 0x0122  # Refused: SOP Class Not Supported (PS3.7 Annex C)


class SOPClassNotSupported(StoreRefused):
    """The instance's SOP Class is not a storage class the node accepts."""

    dicom_status = 0x0122  # Referenced SOP Class not supported (PS3.18 Table I.2-2)


class TransferSyntaxNotSupported(StoreRefused):
    """The instance's transfer syntax is not one the node accepts."""

    dicom_status = 0xC122  # Referenced Transfer Syntax not supported (PS3.18 Table I.2-2)


class StoreFailed(StoreRefused):
    """The instance could not be written to the spool or the index."""

    dicom_status = 0xA701


class PeerClosed(DicomNodeError):
    """The peer closed the connection."""


class ProtocolError(DicomNodeError):
    """The peer broke the Upper Layer protocol; the association is aborted."""

    #: the A-ABORT reason (PS3.8 9.3.8): 6, invalid PDU parameter value, unless given
    def __init__(self, message: str | None = None, reason: int = 6) -> None:
        super().__init__(message)
        self.reason = reason


class SendError(DicomNodeError):
    """Sending to a destination failed."""


class AssociationFailed(SendError):
    """The destination could not be reached or refused the association."""


class NoResults(SendError):
    """The job has no result objects to send."""

    http_status = 409


class SeriesNotVolume(DicomNodeError):
    """The series cannot form one volume."""

    http_status = 422


class MixedSeries(SeriesNotVolume):
    """The files belong to more than one series or frame of reference."""


class NoImagePosition(SeriesNotVolume):
    """A frame has no Image Position (Patient) or Image Orientation (Patient)."""


class MismatchedFrames(SeriesNotVolume):
    """The frames differ in rows, columns or pixel spacing."""


class UnsupportedPixels(SeriesNotVolume):
    """The pixel data cannot be read as one scalar value per voxel."""


class MixedOrientations(SeriesNotVolume):
    """The frames do not share one Image Orientation (Patient)."""


class LocalizerMixedIn(SeriesNotVolume):
    """Localizer images are mixed in with the slices of the series."""


class DuplicatePositions(SeriesNotVolume):
    """Several frames lie at the same position along the slice normal."""


class MissingSlices(SeriesNotVolume):
    """The stack has a gap where slices are missing."""


class UnevenSpacing(SeriesNotVolume):
    """The slice spacing varies beyond the tolerance."""


class ModelError(DicomNodeError):
    """A model package or MONAI bundle cannot be used."""


class UnknownModel(ModelError, ConfigError):
    """No model of that name is registered."""

    http_status = 404


class ModelPackageInvalid(ModelError):
    """A model package's model.toml or entry point is not valid."""


class WeightsMissing(ModelError):
    """A model's weights file does not exist."""


class WeightsMismatch(ModelError):
    """A model's weights file does not have the sha256 its model.toml names."""


class BundleInvalid(ModelError):
    """A MONAI bundle directory is not in the Model Zoo layout, or its network does not load."""


class InvalidDevice(ConfigError):
    """The device is not one of cpu, cuda or cuda:N."""


class DeviceUnavailable(ModelError):
    """The requested device is not available on this machine."""


class InputsRejected(DicomNodeError):
    """The job's input series do not fit the model."""

    http_status = 422
    permanent = True  # a series stored and complete does not change between attempts


class InputsRefused(InputsRejected):
    """The route refuses the job's input: the job is skipped, with a report saying why."""

    def __init__(self, message: str | None = None, result: dict[str, object] | None = None):
        super().__init__(message)
        #: the job's result all the same: why, and the report (an SR saying "not analysed")
        #: that tells the PACS the study was seen and not analysed, rather than nothing
        self.result: dict[str, object] = dict(result or {})


class InferenceCancelled(DicomNodeError):
    """The model run was cancelled."""


class DestinationUnavailable(SendError):
    """The destination could not be reached or refused the whole request; sends retry later."""


class ResultsError(DicomNodeError):
    """The job's findings could not be written as DICOM objects (SEG, SR, SC, KO)."""


class JobNotFound(DicomNodeError):
    """No job has this id."""

    http_status = 404


class PreviewNotFound(DicomNodeError):
    """The job has no such key image (none written yet, or its file is gone)."""

    http_status = 404


class JobStateError(DicomNodeError):
    """The job is not in a state that allows this."""

    http_status = 409


class DemoFailed(DicomNodeError):
    """The demo could not run to its end."""


class InvalidQuery(DicomNodeError):
    """A filter or parameter of a listing is not valid."""

    http_status = 400


class Unauthorized(DicomNodeError):
    """A valid bearer token is required."""

    http_status = 401


class Forbidden(DicomNodeError):
    """The bearer token lacks the scope this needs."""

    http_status = 403


class ValueOutOfRange(InvalidQuery):
    """A parameter is outside the range the node accepts."""

    http_status = 422


class HostNotAllowed(DicomNodeError):
    """The request's Host header names no host this API answers to."""

    http_status = 400


class BodyInvalid(DicomNodeError):
    """The request body is not a valid multipart/related body of DICOM files."""

    http_status = 400


class BodyTooLarge(DicomNodeError):
    """The request body is larger than the node accepts."""

    http_status = 413


class UnsupportedMediaType(DicomNodeError):
    """The request's (or a part's) Content-Type is not one the node stores."""

    http_status = 415


class RequestTimeout(DicomNodeError):
    """The request body stopped arriving, or took longer than the node allows."""

    http_status = 408


class ServiceBusy(DicomNodeError):
    """The node is at a limit on concurrent transfers; try again shortly."""

    http_status = 503


class CommandModelFailed(ModelError):
    """A command model failed: it exited with an error, ran past its timeout, or was killed."""


class CommandOutputInvalid(CommandModelFailed):
    """A command model's output breaks its contract: nothing, not DICOM, not a SEG or SR, or an
    object of another study or patient."""


class NotifyError(DicomNodeError):
    """A notification could not be delivered."""

    http_status = 502


class SourceError(DicomNodeError):
    """A source (``[[sources]]``) could not be queried or retrieved from."""

    http_status = 502


class NotificationRefused(NotifyError):
    """The peer answered, and refused the notification (an HL7 NAK, an HTTP error status)."""


class SourceUnavailable(SourceError):
    """The source could not be reached, refused the association or the request, or stopped
    answering; what is missing is asked for again later."""


class StudyNotFound(SourceError):
    """The source has no study that matches the request."""

    http_status = 404
    permanent = True


class RequestNotFound(DicomNodeError):
    """No request has this id."""

    http_status = 404


class RequestConflict(DicomNodeError):
    """The transaction id already names a request for another study, source or analysis."""

    http_status = 409
