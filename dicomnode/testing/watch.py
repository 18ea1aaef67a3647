"""Watch a node while it is under attack: its peak memory, and a good sender that must succeed.

Used by the reliability tests and ``benchmarks/reliability.py``: while hostile input goes to
the node, a thread samples the node process' resident memory and another sends a valid
instance with dcmtk's storescu every ``interval_s``; each must succeed.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers


@dataclass
class Watch:
    """What was seen while watching."""

    peak_rss_mb: float = 0.0
    good_sent: int = 0
    good_failures: list[str] = field(default_factory=list)


@contextmanager
def watch(
    pid: int, port: int, *, interval_s: float = 0.5, calling_aet: str = "GOOD"
) -> Iterator[Watch]:
    """Sample ``pid``'s memory and keep a good sender going to ``port`` until the block ends."""
    import psutil

    seen = Watch()
    stop = threading.Event()
    process = psutil.Process(pid)

    def sample() -> None:
        while not stop.is_set():
            try:
                rss = process.memory_info().rss / 2**20
            except psutil.Error:
                return
            seen.peak_rss_mb = max(seen.peak_rss_mb, rss)
            stop.wait(0.05)

    def send_good(folder: Path) -> None:
        round_ = 0
        while not stop.is_set():
            spec = SeriesSpec(slices=1, rows=128, columns=128, seed=10_000 + round_)
            files = write_series(ct_slices(spec), folder / str(round_))
            result = peers.storescu(port, files, calling_aet=calling_aet, timeout=60)
            seen.good_sent += 1
            if result.returncode != 0:
                seen.good_failures.append(f"round {round_}: {result.stderr.strip()[-300:]}")
            round_ += 1
            stop.wait(interval_s)

    with tempfile.TemporaryDirectory() as folder:
        threads = [
            threading.Thread(target=sample, name="watch-rss", daemon=True),
            threading.Thread(
                target=send_good, args=(Path(folder),), name="watch-good-sender", daemon=True
            ),
        ]
        for thread in threads:
            thread.start()
        try:
            yield seen
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=90)
