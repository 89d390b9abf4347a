"""Evaluate a generation's candidates: in this process, or on Ray actors that each build their own fitness.

Both report outcomes in candidate-index order through a callback (as soon as the prefix is complete), so the
trial log and the search are the same for any number of workers (the fitness is deterministic).
Ray is optional and imported only when `search.workers > 1`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np

from vlmerge.errors import VlmergeError
from vlmerge.search.fitness import FitnessFactory, Outcome, Problem, evaluate_safely

log = logging.getLogger(__name__)
OnOutcome = Callable[[int, Outcome], None]
RAY_HINT = "pip install 'ray>=2.9'  (or: pip install 'vlmerge[ray]')"


class LocalWorkers:
    """One fitness in this process; candidates one after the other."""

    def __init__(self, problem: Problem):
        self.fitness = problem.make_fitness()

    def map(self, xs: Sequence[np.ndarray], on_outcome: OnOutcome) -> None:
        for i, x in enumerate(xs):
            on_outcome(i, evaluate_safely(self.fitness, x))

    def close(self) -> None:
        self.fitness = None


class _Worker:
    """A Ray actor: builds its fitness once (its own models), then scores candidates."""

    def __init__(self, factory: FitnessFactory, threads: int):
        self.fitness = factory()
        if "torch" in sys.modules:  # a CPU fitness shares the cores with the other workers
            sys.modules["torch"].set_num_threads(threads)

    def ready(self) -> bool:
        return True

    def evaluate(self, x: np.ndarray) -> Outcome:
        return evaluate_safely(self.fitness, x)


def import_ray():
    try:
        import ray
    except ImportError:
        raise VlmergeError(f"search.workers > 1 needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


class RayWorkers:
    """`n` actors, one GPU each where the cluster has GPUs (else a share of the CPUs); dynamic dispatch."""

    def __init__(
        self,
        factory: FitnessFactory,
        n: int,
        *,
        address: str | None = None,
        gpus_per_worker: float | None = None,
    ):
        ray = import_ray()
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            with _keep_sigterm_handler():  # ray.init installs its own (sys.exit): keep the search's
                if address:
                    ray.init(address=address, logging_level=logging.WARNING)
                else:
                    with _python_path_of_this_process():
                        ray.init(
                            num_cpus=os.cpu_count() or 1,
                            include_dashboard=False,
                            logging_level=logging.WARNING,
                        )
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
        per_gpu = (1.0 if gpus >= 1 else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
        if address is None and per_gpu * n > gpus + 1e-9:  # (a cluster may scale up: its actors wait)
            self.close()
            raise VlmergeError(
                f"search.workers = {n} with {per_gpu} GPU each, but Ray sees {gpus:g} GPUs: lower "
                "search.workers or set search.gpus_per_worker"
            )
        threads = max(1, int(cpus // n))
        actor = ray.remote(_Worker).options(
            num_cpus=0 if per_gpu else cpus / n, num_gpus=per_gpu, max_restarts=1
        )
        self.actors = [actor.remote(factory, threads) for _ in range(n)]
        try:
            ray.get([a.ready.remote() for a in self.actors])
        except ray.exceptions.RayError as err:
            self.close()
            raise VlmergeError(f"a search worker could not build its fitness: {_last_line(err)}") from None
        log.info("search: %d Ray workers (%g GPU, %d threads each)", n, per_gpu, threads)

    def map(self, xs: Sequence[np.ndarray], on_outcome: OnOutcome) -> None:
        ray = self.ray
        queue, idle = list(enumerate(xs)), list(self.actors)
        pending: dict = {}
        results: dict[int, Outcome] = {}
        emitted = 0
        while queue or pending:
            while idle and queue:
                i, x = queue.pop(0)
                worker = idle.pop(0)
                pending[worker.evaluate.remote(np.asarray(x))] = (i, worker)
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i, worker = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayError as err:  # the actor died (OOM, segfault): the candidate failed
                    results[i] = Outcome(None, {}, 0.0, f"worker failed: {_last_line(err)}")
                idle.append(worker)
            while emitted in results:
                on_outcome(emitted, results.pop(emitted))
                emitted += 1

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            self.ray.kill(actor)
        self.actors = []
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


@contextmanager
def _keep_sigterm_handler():
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def _python_path_of_this_process():
    """A local Ray's workers (started by its raylet, which inherits our environment) import what we import."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def _last_line(err: Exception) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def make_workers(
    problem: Problem, n: int, *, address: str | None = None, gpus_per_worker: float | None = None
):
    if n == 1:
        return LocalWorkers(problem)
    if problem.factory is None:
        raise VlmergeError(
            f"search.workers = {n} needs a picklable fitness factory (Problem.factory), not a fitness object"
        )
    return RayWorkers(problem.factory, n, address=address, gpus_per_worker=gpus_per_worker)
