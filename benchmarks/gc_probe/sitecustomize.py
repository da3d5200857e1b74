"""Garbage-collector time of `spfpolicy serve` processes, per generation.

    PYTHONPATH=benchmarks/gc_probe spfpolicy bench -w zipf -c 1000 -n 30000 -d 45
    cat "${GC_PROBE_DIR:-/tmp}"/gc-probe.*

Python imports this module at start (``sitecustomize``) in every process
whose PYTHONPATH holds this directory; the bench starts its servers with the
same environment. In a ``serve`` process it times each collection through
``gc.callbacks`` and, when the process ends (the bench stops it with
SIGTERM, which the server answers with its drain and a normal exit),
writes one line to ``$GC_PROBE_DIR/gc-probe.PID``: per generation, the
seconds spent, the collections and the objects they freed, and the
thresholds. Other processes are left alone. A measuring aid only: nothing
in spfpolicy imports it.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time
from typing import Any

_STARTED: list[float] = [0.0]
# Per generation: seconds, collections, objects collected.
_TOTALS: dict[int, list[float]] = {generation: [0.0, 0, 0] for generation in range(3)}


def _timed(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _STARTED[0] = time.perf_counter()
        return
    totals = _TOTALS[info.get("generation", 0)]
    totals[0] += time.perf_counter() - _STARTED[0]
    totals[1] += 1
    totals[2] += info.get("collected", 0)


def _write() -> None:
    directory = os.environ.get("GC_PROBE_DIR", "/tmp")
    parts = [
        f"gen{generation}: {seconds:.3f} s in {int(count)} collections, {int(freed)} freed"
        for generation, (seconds, count, freed) in _TOTALS.items()
    ]
    line = "; ".join(parts) + f"; thresholds {gc.get_threshold()}\n"
    with open(os.path.join(directory, f"gc-probe.{os.getpid()}"), "w") as out:
        out.write(line)


if "serve" in sys.argv[1:2]:
    gc.callbacks.append(_timed)
    atexit.register(_write)  # the server ends by itself on SIGTERM (its drain)
