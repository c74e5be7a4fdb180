"""The process pool of `convert`: one task per shard, and workers that never outlive the converter.

The pool uses the spawn context (fork after torch/OpenMP start-up can deadlock workers). Spawned
workers would otherwise keep running, or block forever on the task queue, when the converter dies
(SIGKILL, OOM killer, a closed terminal), so each worker, in its initializer:

- asks Linux to send it SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), and exits at once
  if the parent is already gone;
- starts a watchdog thread that notices a changed parent pid (other platforms, or a death between
  spawn and prctl) within half a second;
- on SIGTERM, from either, removes the temporary files of the shard it is writing and exits;
- ignores SIGINT: on Ctrl-C the converter stops the pool (and its workers' temporary files go).

An error in a worker (an `OutputError` for a full disk, ...) travels to the converter as the
exception itself (one-line message, picklable); the converter then stops the other workers and
re-raises it, so the command ends in that one line. A worker that dies without a word (killed,
out of memory) becomes an `OutputError` too.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Sequence

from mopro_fast.safe_io import OutputError, discard, temp_name

PR_SET_PDEATHSIG = 1
_counter = None  # shared image counter, set in each pool worker by `init_worker`
_writing: list[Path] = []  # files the current task writes: their temporary names go on SIGTERM


def init_worker(counter, parent_pid: int) -> None:
    global _counter
    _counter = counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_now)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still covers it
    if os.getppid() != parent_pid:
        _exit_now()
    threading.Thread(target=_watchdog, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def _watchdog(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    _exit_now()


def _exit_now(*_signal) -> None:
    for path in list(_writing):
        discard(temp_name(path))
    os._exit(143)


def writing(paths: Sequence[Path]) -> None:
    """Record the files the current task writes (in a worker), so a kill leaves no temporary file."""
    _writing[:] = list(paths)


def tick() -> None:
    """One more image done (counted across workers, read by the converter for its progress)."""
    if _counter is not None:
        with _counter.get_lock():
            _counter.value += 1


def run_tasks(fn: Callable, tasks: Sequence, args: tuple, workers: int,
              report: Callable[[int], None], keep: Callable = lambda result: result) -> dict[str, object]:
    """{task.name: keep(fn(task, *args))} for every task, in `workers` processes (or in this one).

    `report(n)` gets the number of images done so far, at least every 0.25 s in a pool; in this
    process `fn` is called with `tick=` instead. `keep` makes each result what is held until the
    end (e.g. a compact form), as it arrives.
    """
    results: dict[str, object] = {}
    if workers <= 1 or len(tasks) <= 1:
        done = [0]

        def local_tick() -> None:
            done[0] += 1
            report(done[0])

        for task in tasks:
            results[task.name] = keep(fn(task, *args, tick=local_tick))
        return results
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx, initializer=init_worker,
                               initargs=(counter, os.getpid()))
    try:
        pending = {pool.submit(fn, task, *args): task for task in tasks}
        while pending:
            finished, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            report(counter.value)
            for future in finished:
                results[pending.pop(future).name] = keep(future.result())
    except BrokenProcessPool:
        stop(pool)
        raise OutputError("a conversion worker process died (killed, or out of memory?); "
                          "re-run the same command to resume, with fewer --workers if memory is short") from None
    except BaseException:
        stop(pool)
        raise
    pool.shutdown(wait=True)
    return results


def stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started, SIGTERM the workers (each removes its temporary files), wait for them."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)
