"""dicomnode: a DICOM node that runs AI models on the studies sent to it."""

import logging

__version__ = "0.1.0"

# A library logs to a NullHandler; entry points configure real handlers (see dicomnode.log).
logging.getLogger(__name__).addHandler(logging.NullHandler())
