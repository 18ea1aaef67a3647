"""Sending DICOM objects to destinations."""
