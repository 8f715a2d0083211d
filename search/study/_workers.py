"""Many processes on one study: which trials count towards ``--trials``, crashed trials retried once,
the loop every worker runs, and local worker processes.

Optuna does the distribution (RDB storage, heartbeats, ``RetryHeartbeatStaleTrialCallback``); what
it leaves open is an exact trial count when several processes share a study (``MaxTrialsCallback``
may overshoot by the number of workers) and a quick recovery of a trial whose process is known to be
dead (the heartbeat waits out its grace period). Both are here.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from search._record import Key

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)  # count towards --trials
IDENTITY = (Key.RECIPE, Key.CONTINUE_FROM, Key.RUNG)  # what a retry keeps of the failed trial's attrs
POLL_S = 1.0


class RetryOnce(RetryHeartbeatStaleTrialCallback):
    """Queue a crashed or interrupted trial's plan again, once, as a fresh WAITING trial.

    The retry starts with none of the failed trial's record (stage, reason, half-finished
    figures), which stays with the failed trial; only what the trial *is* goes along: a recipe, or a
    promotion and the trial it continues (:data:`IDENTITY`).
    """

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(max_retry=1)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        clean = copy.copy(trial)
        clean.user_attrs = {key: value for key, value in trial.user_attrs.items() if key in IDENTITY}
        super().__call__(study, clean)


def retried(trials: Sequence[FrozenTrial]) -> dict[int, int]:
    """Failed trial number -> the number of the trial that retried it."""
    retries = {}
    for trial in trials:
        for number in trial.system_attrs.get("retry_history", ()):
            retries.setdefault(number, trial.number)
    return retries


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count towards ``--trials``: all but a failed trial that was retried (its retry
    counts instead) and a surplus trial (see :func:`claim_slot`)."""
    again = retried(trials)
    return [t for t in trials if t.number not in again and not t.user_attrs.get(Key.SURPLUS)]


def finished_count(study: optuna.Study) -> int:
    return sum(t.state in FINISHED for t in counted(study.get_trials(deepcopy=False)))


class Surplus(Exception):
    """The study already held its trials when this one was created; it fails without running."""


def claim_slot(study: optuna.Study, trial: optuna.Trial, trials: int) -> None:
    """Raise :class:`Surplus` unless ``trial`` is among the first ``trials`` counted trials.

    Trial numbers are handed out atomically by the storage, so every worker agrees on the order:
    when two workers ask for the last slot at once, the later number gives way.
    """
    ahead = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]
    if len(ahead) >= trials:
        trial.set_user_attr(Key.SURPLUS, True)
        trial.set_user_attr(
            Key.FAIL_REASON, f"not run: the study already held its {trials} trials when this one was created"
        )
        raise Surplus(trial.number)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def this_worker() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}


def _is_dead(worker: dict) -> bool:
    """True only when the process is known to be gone: on this host, with /proc to look at."""
    if worker.get("host") != socket.gethostname() or not Path("/proc/self/stat").exists():
        return False
    started = _start_time(int(worker["pid"]))
    return started is None or started != worker.get("started")


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Fail, and retry once, the RUNNING trials whose worker process on this host has died.

    A SIGKILLed ``search run`` leaves its trial RUNNING; heartbeats would fail it only after their
    grace period, so a resumed run on the same machine checks the process itself.
    """
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(Key.WORKER)
        if not worker or not _is_dead(worker):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker got there first
        failed.append(trial.number)
        RetryOnce()(study, study.get_trials(deepcopy=False)[trial.number])
    return failed


def retry_interrupted(study: optuna.Study, number: int | None) -> None:
    """Queue trial ``number`` again if it failed because it was interrupted (Ctrl-C)."""
    if number is None:
        return
    trials = study.get_trials(deepcopy=False)
    trial = trials[number]
    if trial.state == TrialState.FAIL and trial.user_attrs.get(Key.INTERRUPTED) and number not in retried(trials):
        RetryOnce()(study, trial)


def work_loop(
    study: optuna.Study,
    run_one: Callable[[], None],
    trials: Callable[[], int],
    deadline: float | None = None,
) -> None:
    """Run trials until the study holds ``trials()`` finished counted trials, or ``deadline``
    (``time.monotonic()``) passes.

    When every remaining slot is held by another worker's running trial, wait: that worker may
    die, and its retried trial must still be run by someone.
    """
    while deadline is None or time.monotonic() < deadline:
        fail_dead_trials(study)
        optuna.storages.fail_stale_trials(study)
        occupied = counted(study.get_trials(deepcopy=False))
        target = trials()
        if sum(t.state in FINISHED for t in occupied) >= target:
            return
        waiting = any(t.state == TrialState.WAITING for t in occupied)
        if len(occupied) >= target and not waiting:
            time.sleep(POLL_S)
            continue
        run_one()


@contextlib.contextmanager
def measuring_alone(target: str) -> Iterator[None]:
    """Hold this machine's measurement lock for ``target``: local workers never time models at once."""
    path = Path(tempfile.gettempdir()) / f"compression-search-measure-{target}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def threads_per_worker(workers: int) -> int:
    """Torch threads for each of ``workers`` processes on this machine: its cores shared out, at least
    one each (two workers with two threads each on two cores only take turns, and slower)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)


def spawn_workers(
    count: int, storage: str, study_name: str, results_dir: Path, seed: int, service: str | None, env: dict,
    timeout: float | None = None,
) -> list[subprocess.Popen]:
    """``count`` ``search worker`` processes on this machine, each logging to
    ``<results>/<study>/workers/<n>.log`` and measuring through the profiler ``service`` if given,
    with ``env`` added to this process's environment; ``timeout``: the seconds the run has left,
    each worker's own (it stops its fine-tune where the run does)."""
    logs = results_dir / study_name / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for index in range(1, count + 1):
        command = [
            sys.executable, "-m", "search", "worker", storage, "--study-name", study_name,
            "--results-dir", str(results_dir), "--seed", str(seed + index),
            *(["--profiler", service] if service else []),
            *(["--timeout", f"{max(timeout, 0.001):.3f}"] if timeout is not None else []),
        ]  # fmt: skip
        with open(logs / f"{index}.log", "ab") as log:
            processes.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
            )
    return processes


def stop_workers(processes: list, interrupt: bool) -> list[int]:
    """Wait for the worker processes (after a SIGINT each when ``interrupt``); their exit codes."""
    if interrupt:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(2)
    return [process.wait() for process in processes]
