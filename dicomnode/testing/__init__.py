"""Helpers for tests and benchmarks: raw senders, dcmtk peers (phantoms: dicomnode.phantoms)."""
