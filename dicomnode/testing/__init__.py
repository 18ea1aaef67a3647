"""Helpers for tests, benchmarks and demos: generated series, raw senders, dcmtk peers."""
