"""Where a sweep's runs train: local worker processes, or Ray tasks. Either way a run is the same
subprocess of its dataset's training script, so the same seed gives the same numbers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError, first_line

POLL_SECONDS = 0.1


@dataclass
class Job:
    name: str
    argv: list[str]          # the training script and its flags
    stderr_path: Path


@dataclass
class Outcome:
    job: Job
    returncode: int | None   # None: no exit status came back (a Ray task cancelled or lost)
    seconds: float
    message: str = ""        # why no exit status came back


Done = Callable[[Outcome, bool], None]    # (outcome, whether the sweep is stopping)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                # not on Linux
        return os.cpu_count() or 1


def threads_per_run(workers: int, cores: int) -> int:
    """Each run's share of the cores; OMP_NUM_THREADS, when the sweep is given it, instead."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    return int(given) if given.isdigit() and int(given) > 0 else max(1, cores // workers)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


class StopSignals:
    """Within the block, SIGINT and SIGTERM do not end the sweep: the first is kept in `signum`
    for the backend to pass on to the runs, which save and stop; later ones are ignored."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"{signal.Signals(signum).name}: stopping the runs (each saves its last finished epoch)...",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def run_local(jobs: Sequence[Job], workers: int, threads: int, gpus: Sequence[str], done: Done,
              stop: StopSignals) -> None:
    """Run the jobs, `workers` at a time, each with `threads` threads (and on the GPU of its worker
    slot, when there are GPUs). A stop is passed on to the running jobs; no new one starts."""
    queue = deque(jobs)
    running: dict[int, tuple[Job, subprocess.Popen, float]] = {}
    told: set[int] = set()
    while queue or running:
        while queue and len(running) < workers and stop.signum is None:
            slot = min(set(range(workers)) - set(running))
            job = queue.popleft()
            env = {**os.environ, **thread_env(threads)}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
            with open(job.stderr_path, "w") as stderr:
                # A session of its own: Ctrl-C in a terminal reaches the sweep alone, which passes it on once.
                process = subprocess.Popen([sys.executable, "-u", *job.argv], stdout=subprocess.DEVNULL,
                                           stderr=stderr, env=env, start_new_session=True)
            running[slot] = (job, process, time.monotonic())
        if stop.signum is not None:
            for slot, (_, process, _) in running.items():
                if slot not in told:
                    process.send_signal(stop.signum)
                    told.add(slot)
        for slot, (job, process, started) in list(running.items()):
            if process.poll() is not None:
                del running[slot]
                told.discard(slot)
                done(Outcome(job, process.returncode, time.monotonic() - started), stop.signum is not None)
        time.sleep(POLL_SECONDS)


def run_command(argv: list[str], env: dict[str, str], stderr_path: str) -> int:
    """A Ray task's body: the training subprocess, stopped with SIGTERM when the task is cancelled
    (Ray's workers block SIGINT, and a child inherits that)."""
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-u", *argv], stdout=subprocess.DEVNULL, stderr=stderr,
                                   env={**os.environ, **env}, start_new_session=True)
        told = False
        while True:
            # Polled: ray.cancel interrupts the task between bytecodes, which a blocking wait never reaches.
            try:
                while process.poll() is None:
                    time.sleep(POLL_SECONDS)
                return process.returncode
            except KeyboardInterrupt:
                if not told:
                    process.send_signal(signal.SIGTERM)
                    told = True


def run_on_ray(jobs: Sequence[Job], workers: int | None, address: str | None, use_gpus: bool, done: Done,
               stop: StopSignals) -> None:
    """Run each job as a Ray task: one GPU each where the cluster has GPUs (and the runs may use
    them), else its share of the CPUs. At most `workers` tasks at a time (default: as the cluster's
    resources allow). The output folder must be on a file system all nodes share, at the same path."""
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install -r requirements-ray.txt") from None
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=usable_cores(), include_dashboard=False, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot start Ray{f' at --ray-address {address}' if address else ''}: "
                        f"{first_line(e)}") from None
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if use_gpus else 0
        cpus = max(1, int(resources.get("CPU", 1)))
        window = workers or (gpus or max(1, cpus // 2))
        threads = 1 if gpus else threads_per_run(window, cpus)
        # By value: a cluster's workers need not have this repository on their import path.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        task = ray.remote(num_cpus=threads, num_gpus=1 if gpus else 0, max_retries=0)(run_command)
        print(f"Ray backend: {plural(int(resources.get('CPU', 0)), 'CPU')}, {plural(int(resources.get('GPU', 0)), 'GPU')}; "
              f"up to {plural(window, 'run')} at a time, " + ("one GPU each" if gpus else f"{plural(threads, 'CPU')} each"),
              flush=True)
        _run_tasks(ray, task, jobs, window, thread_env(threads), done, stop)
    finally:
        ray.shutdown()


def _run_tasks(ray, task, jobs: Sequence[Job], window: int, env: dict[str, str], done: Done,
               stop: StopSignals) -> None:
    queue = deque(jobs)
    in_flight: dict = {}
    cancelled = False
    while queue or in_flight:
        while queue and len(in_flight) < window and stop.signum is None:
            job = queue.popleft()
            in_flight[task.remote(job.argv, env, str(job.stderr_path))] = (job, time.monotonic())
        if stop.signum is not None and not cancelled:
            for ref in in_flight:
                ray.cancel(ref)
            cancelled = True
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_SECONDS * 5)
        for ref in ready:
            job, started = in_flight.pop(ref)
            try:
                outcome = Outcome(job, ray.get(ref), time.monotonic() - started)
            except ray.exceptions.TaskCancelledError:
                outcome = Outcome(job, None, time.monotonic() - started, "cancelled")
            except ray.exceptions.RayError as e:
                outcome = Outcome(job, None, time.monotonic() - started, f"Ray: {str(e).strip().splitlines()[-1]}")
            done(outcome, stop.signum is not None)
