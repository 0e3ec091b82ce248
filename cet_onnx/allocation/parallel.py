"""Probes in parallel: ``--workers N`` worker processes, or ``--ray auto|ADDRESS`` Ray actors.

Every worker builds its own :class:`~cet_onnx.allocation.probes.ProbeSession` **once** (in the
main process's evaluation mode: rebuilt or bound, see :mod:`cet_onnx.allocation.probes`), from a
:class:`SessionSpec`: the serialized model (a model whose weights stay on disk serializes as
references, read from :attr:`SessionSpec.data_dir`), the weights, the probe batches, the loss and
the activation parameters. The weights' float values are read back from the model in the
worker, exactly as :func:`cet_onnx.load.load_weights` reads them. The main process keeps doing
what needs the rounding plan and the candidate cache (``cand.quantize(i, j).dequantize()``)
and sends ``(method, args)``, e.g. ``("probe", (weight, quantized array, format label))``; the
worker returns ``getattr(session, method)(*args)``.

Results come back in submission order, through a standard pool: a
:class:`concurrent.futures.ProcessPoolExecutor` (spawn context: onnxruntime sessions do not
survive ``fork``) or a :class:`ray.util.ActorPool`. At most ``2 × workers`` jobs are in flight,
so the main process never holds more than that many quantized arrays beyond its own cache.

The numbers are those of the serial run: the same model, data and session options give the
same losses (onnxruntime's CPU results do not depend on the thread count; checked on the
bundled and the orientation models, and by the byte-identity tests), so ``--workers`` changes
the wall time only. A worker that raises or dies is a one-line :class:`RuntimeFailure`.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import multiprocessing
import os
import signal
import socket
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

from cet_onnx.errors import InputError, RuntimeFailure, first_line

if TYPE_CHECKING:
    from cet_onnx.allocation.probes import ProbeSession
    from cet_onnx.graph.weights import WeightInfo
    from cet_onnx.options import AllocationOptions
    from cet_onnx.prepared import Prepared
    from cet_onnx.quant.quantizer import ActivationParams

RAY_EXTRA = "pip install 'cet-onnx[ray]'"

Job = tuple[str, tuple]   # (ProbeSession method, its arguments)


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def require_ray() -> None:
    """InputError naming the extra when Ray is not installed."""
    if not ray_available():
        raise InputError(f"--ray needs Ray, which is not installed: {RAY_EXTRA}")


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class SessionSpec:
    """Everything a worker needs to build its own ProbeSession (picklable)."""

    model: bytes                                   # ir.to_proto(model).SerializeToString()
    data_dir: str | None                           # the folder of weights that stay on disk
    weights: list[WeightInfo]
    act_params: dict[str, ActivationParams] | None
    batches: list[dict[str, np.ndarray]]
    providers: list[str]
    loss: str
    loss_output: str
    labels: np.ndarray | None
    threads: int = 0                               # intra-op threads of the worker's sessions (0: default)
    rebuilt: bool = False                          # evaluations as in the main process (ProbeSession.rebuilt)
    reference: np.ndarray | None = None            # the float model's outputs on the batches
    downstream: bool = False                       # downstream-only probes as in the main process

    @classmethod
    def of(cls, model: Any, session: ProbeSession, threads: int = 0) -> SessionSpec:
        """The spec of ``session``, a ProbeSession built on ``model`` (an ``ir.Model``)."""
        import onnx_ir as ir

        from cet_onnx.io import external_data
        return cls(ir.to_proto(model).SerializeToString(), external_data.data_dir(model), list(session.weights),
                   session.act_params, list(session.batches), list(session.providers), session.loss_name,
                   session.loss_output, session.labels, threads, session.rebuilt, session.reference,
                   session.downstream)

    def build(self) -> ProbeSession:
        import onnx
        import onnx_ir as ir

        from cet_onnx.allocation.probes import ProbeSession
        from cet_onnx.io.external_data import LazyValues
        model = ir.serde.deserialize_model(onnx.load_from_string(self.model))
        if self.data_dir is not None:
            ir.external_data.set_base_dir(model.graph, self.data_dir)
        values = LazyValues({w.name: model.graph.initializers[w.name].const_value for w in self.weights})
        if self.data_dir is None:   # weights in memory, as in the main process
            values = dict(values)
        return ProbeSession(model, self.weights, values, self.act_params, self.batches, self.providers, self.loss,
                            self.loss_output, self.labels, threads=self.threads, rebuilt=self.rebuilt,
                            reference=self.reference, downstream=self.downstream)


@dataclass
class _Failed:
    """What a worker returns instead of raising: the one-line reason."""

    message: str


class _Worker:
    """One ProbeSession in a worker process or a Ray actor; never raises, returns :class:`_Failed`."""

    def __init__(self, spec: SessionSpec) -> None:
        from cet_onnx.progress import set_quiet
        set_quiet(True)  # the main process draws the progress
        self.session: ProbeSession | None = None
        self.error: str | None = None
        try:
            self.session = spec.build()
        except Exception as exc:  # reported on the first job, as one line
            self.error = f"a probe worker could not build its session: {first_line(exc)}"

    def call(self, job: Job) -> tuple[Any, int] | _Failed:
        """``(result, forward passes)`` of ``job``."""
        if self.session is None:
            return _Failed(self.error or "a probe worker has no session")
        method, args = job
        runs0 = self.session.runs
        try:
            return getattr(self.session, method)(*args), self.session.runs - runs0
        except Exception as exc:
            return _Failed(f"a probe worker failed on {method} of '{args[0]}': {first_line(exc)}")


# --------------------------------------------------------------------------- worker processes

_process_worker: _Worker | None = None


def _process_init(spec: SessionSpec) -> None:
    global _process_worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _process_worker = _Worker(spec)


def _process_call(job: Job) -> tuple[Any, int] | _Failed:
    assert _process_worker is not None
    return _process_worker.call(job)


_DIED = "a probe worker process died (killed, or out of memory?)"


class ProbePool:
    """Worker processes or Ray actors, each with its own ProbeSession.

    Results come in order, with at most ``2 × workers`` jobs in flight.
    """

    workers: int

    def _submit(self, job: Job) -> None:
        raise NotImplementedError

    def _next(self) -> tuple[Any, int] | _Failed:
        """The result of the oldest job in flight."""
        raise NotImplementedError

    def map(self, session: ProbeSession, method: str, args: Iterable[tuple]) -> Iterator[Any]:
        """``session.<method>(*a)`` for every ``a``, run by the workers, in order.

        Their forward passes are added to ``session.runs``.
        """
        in_flight = 0
        for a in args:
            self._submit((method, tuple(a)))
            in_flight += 1
            if in_flight >= 2 * self.workers:
                in_flight -= 1
                yield _unpack(session, self._next())
        for _ in range(in_flight):
            yield _unpack(session, self._next())

    def close(self) -> None:
        raise NotImplementedError


def _unpack(session: ProbeSession, out: tuple[Any, int] | _Failed) -> Any:
    if isinstance(out, _Failed):
        raise RuntimeFailure(out.message)
    result, runs = out
    session.runs += runs
    return result


class ProcessProbePool(ProbePool):
    """``workers`` processes (a spawn-context ProcessPoolExecutor), each with its own ProbeSession."""

    def __init__(self, spec: SessionSpec, workers: int) -> None:
        self.workers = workers
        self._futures: collections.deque[Future] = collections.deque()
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_process_init, initargs=(spec,))

    def _submit(self, job: Job) -> None:
        try:
            self._futures.append(self._pool.submit(_process_call, job))
        except BrokenProcessPool:
            raise RuntimeFailure(_DIED) from None

    def _next(self) -> tuple[Any, int] | _Failed:
        try:
            return self._futures.popleft().result()
        except BrokenProcessPool:
            raise RuntimeFailure(_DIED) from None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- Ray

class RayProbePool(ProbePool):
    """Ray actors in a ``ray.util.ActorPool``, each holding one ProbeSession.

    ``address``: ``auto`` starts a local cluster unless one is running (``ray.init()``), else
    the address of a cluster to join. ``workers``: actors, default the cluster's CPU count.
    """

    def __init__(self, spec: SessionSpec, address: str, workers: int | None) -> None:
        require_ray()
        import ray
        from ray.util import ActorPool
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            if address != "auto":
                _check_reachable(address)
            try:
                ray.init(address=None if address == "auto" else address, log_to_driver=False,
                         include_dashboard=False, logging_level="ERROR")
            except Exception as exc:
                raise RuntimeFailure(f"--ray {address}: cannot start or reach a Ray cluster: {first_line(exc)}") \
                    from None
            self._started = True
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor = ray.remote(num_cpus=1)(_Worker)
        spec_ref = ray.put(spec)
        self._actors = [actor.remote(spec_ref) for _ in range(self.workers)]
        self._pool = ActorPool(self._actors)

    def _submit(self, job: Job) -> None:
        self._pool.submit(lambda actor, j: actor.call.remote(j), job)

    def _next(self) -> tuple[Any, int] | _Failed:
        try:
            return self._pool.get_next()
        except self._ray.exceptions.RayError as exc:
            raise RuntimeFailure(f"a Ray probe worker died: {first_line(exc)}") from None

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        if self._started:
            self._ray.shutdown()


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A quick one-line failure for a Ray address nothing listens on (ray.init would retry for minutes)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port: let Ray interpret it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RuntimeFailure(f"--ray {address}: no Ray cluster reachable there ({first_line(exc)})") from None


# --------------------------------------------------------------------------- the hook

def run(session: ProbeSession, method: str, args: Iterable[tuple], pool: ProbePool | None) -> Iterator[Any]:
    """``session.<method>(*a)`` for every ``a`` in order: in ``pool`` when given, else here, one by one."""
    if pool is None:
        return (getattr(session, method)(*a) for a in args)
    return pool.map(session, method, args)


@contextlib.contextmanager
def probe_pool(p: Prepared, a: AllocationOptions, session: ProbeSession) -> Iterator[ProbePool | None]:
    """The pool ``--workers`` / ``--ray`` ask for (None: the serial path), closed on exit."""
    pool: ProbePool | None = None
    if a.ray is not None:
        pool = RayProbePool(SessionSpec.of(p.model, session, threads=1), a.ray, a.workers)
    elif a.workers is not None and a.workers > 1:
        threads = max(1, cpu_count() // a.workers)  # no oversubscription: the workers share the CPUs
        pool = ProcessProbePool(SessionSpec.of(p.model, session, threads=threads), a.workers)
    try:
        yield pool
    finally:
        if pool is not None:
            pool.close()
