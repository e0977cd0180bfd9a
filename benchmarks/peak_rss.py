"""Peak resident memory of this process while a block runs, above the level before it."""

from __future__ import annotations

import threading
import time


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.delta_bytes``; sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.delta_bytes = 0

    def __enter__(self) -> PeakRSS:
        _return_free_memory()
        self.base = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.delta_bytes = self.peak - self.base


def _return_free_memory() -> None:
    """Hand freed heap pages back to the OS first, so the baseline is not inflated by earlier work (glibc only)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
