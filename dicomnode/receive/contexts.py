"""Transfer syntaxes the receiver accepts for every storage SOP class (stored as received)."""

from pydicom.uid import (
    JPEG2000,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

#: In order of preference: when a sender offers several in one context, the first listed wins,
#: so a sender offering compressed and uncompressed keeps its compression.
TRANSFER_SYNTAXES = [
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    JPEGLSNearLossless,
    JPEG2000,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
]
# Then every other standard one (HTJ2K, JPEG XL, video, ...), after the common ones.
TRANSFER_SYNTAXES += [uid for uid in AllTransferSyntaxes if uid not in TRANSFER_SYNTAXES]
