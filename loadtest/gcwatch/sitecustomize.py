"""Log the cyclic collector's slow passes in every Python process started with this directory on
``PYTHONPATH`` and ``GCWATCH_LOG`` set (a file to append to): a tool to see collector pauses in a
benchmark's server processes without changing them (issue 18, part 4).

    GCWATCH_LOG=/tmp/gc.log PYTHONPATH=$PWD:$PWD/loadtest/gcwatch python -m loadtest.scenarios.peers ...

One line per full (second-generation) collection and per collection of any generation that took
more than 5 ms: the time, the PID, the end of its command line (which server), the generation, the pause,
what it collected. Python imports ``sitecustomize`` at start-up, before ``-m`` runs; this one does
nothing unless ``GCWATCH_LOG`` is set.
"""

import gc
import os
import sys
import time

_LOG = os.environ.get("GCWATCH_LOG")

if _LOG:
    _started = [0.0]

    def _watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - _started[0]) * 1000
        generation = info["generation"]
        if generation == 2 or ms > 5:
            with open(_LOG, "a") as log:  # type: ignore[arg-type]
                who = " ".join(sys.argv[-3:])[-60:]
                log.write(f"{time.time():.3f} {os.getpid()} {who!r} gen{generation} {ms:.1f} ms "
                          f"collected={info['collected']}\n")

    gc.callbacks.append(_watch)
