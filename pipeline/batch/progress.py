"""The job's progress line: rows answered against the planned total, from the first second.

Ray Data's own "Total Progress" bar reads ``0/?`` until its write tasks have finished some blocks (it
estimates the total from the outputs so far), and its per-operator bars describe blocks, not inputs.
The job knows its total when it has planned, so it reports against that instead: the model actors
count the rows of every batch they return into a small counter actor, and a driver thread prints

    [meda] progress: 12/32 rows (38%), 1 error, 0.42 rows/s, ETA 0:00:48

at the start, every ``interval_s`` while the count moves, and once at the end. A batch that Ray
retries is counted when it finally returns (the total is clamped: a block re-run after it was counted
cannot push it past 100%).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO


class _Counter:
    """Rows returned by the model actors (ok, error). No CPU of its own."""

    def __init__(self):
        self.ok = 0
        self.errors = 0

    def add(self, ok: int, errors: int) -> None:
        self.ok += int(ok)
        self.errors += int(errors)

    def get(self) -> tuple[int, int]:
        return self.ok, self.errors


def format_eta(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(done: int, errors: int, total: int, elapsed_s: float) -> str:
    """``[meda] progress: done/total rows (pct), errors, rate, ETA`` (rate and ETA once rows exist)."""
    done = min(done, total)
    pct = 100.0 * done / total if total else 100.0
    parts = [f"[meda] progress: {done}/{total} rows ({pct:.0f}%)"]
    if errors:
        parts.append(f"{errors} error{'s' if errors != 1 else ''}")
    if done and elapsed_s > 0:
        rate = done / elapsed_s
        parts.append(f"{rate:.2f} rows/s")
        if done < total:
            parts.append(f"ETA {format_eta((total - done) / rate)}")
    return ", ".join(parts)


class Progress:
    """The driver's side: a counter actor the model actors report to, and a thread printing the line.

    ``Progress(total)`` starts both (``ray`` must be initialised); ``handle`` goes to the actors;
    ``close()`` prints the final line and stops the actor. ``total`` can be raised for a retry round
    (`add_total`) without restarting the count.
    """

    def __init__(self, total: int, *, interval_s: float = 10.0, stream: TextIO | None = None):
        import ray

        self.total = int(total)
        self.interval_s = float(interval_s)
        self.stream = stream or sys.stderr
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)  # the driver's node
        self.handle = ray.remote(num_cpus=0, max_restarts=0)(_Counter).options(scheduling_strategy=here).remote()
        self._t0 = time.monotonic()
        self._last: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._print(0, 0)
        self._thread = threading.Thread(target=self._run, name="meda-progress", daemon=True)
        self._thread.start()

    def counts(self) -> tuple[int, int]:
        import ray

        try:
            return tuple(ray.get(self.handle.get.remote(), timeout=30))  # type: ignore[return-value]
        except Exception:  # noqa: BLE001 - the line is informative only; never fail the job for it
            return self._last or (0, 0)

    def _print(self, ok: int, errors: int) -> None:
        self._last = (ok, errors)
        print(progress_line(ok + errors, errors, self.total, time.monotonic() - self._t0), file=self.stream,
              flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            ok, errors = self.counts()
            if (ok, errors) != self._last:
                self._print(ok, errors)

    def close(self) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
        self._print(*self.counts())
        try:
            ray.kill(self.handle)
        except Exception:  # noqa: BLE001
            pass


def report(handle: Any, statuses) -> None:
    """Called by a model actor with its returned batch's row statuses: fire and forget."""
    if handle is None:
        return
    statuses = list(statuses)
    errors = sum(1 for s in statuses if s == "error")
    try:
        handle.add.remote(len(statuses) - errors, errors)
    except Exception:  # noqa: BLE001 - progress must never fail a batch
        pass
