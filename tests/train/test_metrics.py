"""Memory figures: a run's peak is its own, not the peak of the process that started it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from leantune.train.metrics import peak_memory_bytes, resident_bytes

CHILD = ("import resource; from leantune.train.metrics import peak_memory_bytes; "
         "print(peak_memory_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_is_not_inherited_from_the_parent():
    big = bytearray(1024**3)  # the parent's resident set now holds 1 GiB more
    for i in range(0, len(big), 4096):
        big[i] = 1
    assert resident_bytes() > 1024**3
    ours, maxrss = map(int, subprocess.run([sys.executable, "-c", CHILD], capture_output=True,
                                           text=True, check=True).stdout.split())
    del big
    assert maxrss > 1024**3  # what ru_maxrss says: the parent's peak, carried over
    assert ours < 0.8 * 1024**3  # what the child itself used (python + torch)
    assert peak_memory_bytes() >= resident_bytes()
