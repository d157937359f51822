"""The ray executor: a stage's model work on `replicas` Ray actors, the catalog written by the driver alone.

    generate(catalog, 1, GenerateConfig(..., scale_out=ExecutorConfig(executor="ray", replicas=8)))

The stage resolves the units its work area still lacks, as for a local run, and builders/executor.py:producer
gives it a `Replicated` backend in place of the local one: `replicas` actors each build that same local backend
(the stage's `build`), and the driver feeds them chunks of the work items (`chunk` items each, two queued per actor
so an actor never waits for the driver's commit) and yields each chunk's `Finished` as it completes (ray.wait), so
`run_stage` commits it through the one work path. Workers never touch the catalog.

An actor runs the stage's local `run` (`generate._produce`, `rank._produce`) on its chunk, so the rows are the
local run's: seeds come from (seed, prompt_id), never from where or with what a prompt ran.

Failures: a lost actor (its process crashed, its node went away, `ray.kill`) has its chunks resubmitted to the
live actors at once, up to `ATTEMPTS` times per chunk, and a new actor replaces it, taking chunks once its backend
has loaded. Committed work is in the catalog, so a killed driver reruns the same command and resumes.

Own actor, not `ray.data.llm`: its vLLM processor takes sampling params per row but not our seed rule with
`n` samples per request, our prepare step (chat template, too-long prompts skipped and counted) or the other
backends and rankers; wrapping our backends keeps one code path for every engine (README: Running on a Ray cluster).
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

from builders.config import ExecutorConfig, GenerateConfig, RankConfig
from builders.errors import InputError, IterdpoError, one_line
from builders.stage import Finished, Producer, chunks

ATTEMPTS = 3  # a chunk whose actor is gone for good goes to a new actor at most this often, then the run fails
DEPTH = 2  # chunks queued per actor: it starts the next while the driver commits the last


def _address(ex: ExecutorConfig) -> str:
    """Where a session goes: the option, else RAY_ADDRESS, else a new local instance ("local")."""
    return ex.ray_address or os.environ.get("RAY_ADDRESS") or "local"


def _runs_here(ex: ExecutorConfig) -> bool:
    """Whether the replicas will run on a Ray instance the stage starts on this machine (not a cluster the process
    is already connected to, nor one at an address)."""
    import ray

    return not ray.is_initialized() and _address(ex) == "local"


def preflight(ex: ExecutorConfig, resources: Callable[[float], dict[str, float]]) -> None:
    """The executor checks that need Ray's view, made before any input is read and without starting Ray (a
    socket connect or a CPU count, under a second): an address that does not answer; replicas that the instance a
    run starts on this machine cannot hold. A cluster (an address, or the process's own connection) is checked by
    the pool once connected: a cluster can grow, so there a shortfall is a warning."""
    if ex.executor != "ray":
        return
    import ray

    if ray.is_initialized():
        return
    address = _address(ex)
    if address != "local":
        _reachable(address)
        return
    try:
        from ray._private.utils import get_num_cpus  # what a local ray.init gives itself (cgroup limits included)

        cpus = float(get_num_cpus())
    except Exception:  # noqa: BLE001 - a private helper: fall back to the plain count
        cpus = float(os.cpu_count() or 1)
    gpus = cluster_gpus(ex)
    _check_capacity(ex, resources(gpus), {"CPU": cpus, "GPU": gpus}, local=True)


def check_generate_executor(cfg: GenerateConfig) -> None:
    preflight(cfg.scale_out, partial(generator_resources, cfg))


def check_rank_executor(cfg: RankConfig) -> None:
    """The ranker's device on the replicas, then `preflight`."""
    ex = cfg.scale_out
    if ex.executor != "ray":
        return
    if cfg.ranker != "python" and cfg.device is not None:
        if _runs_here(ex):  # the replicas run on this machine: its devices, in the local path's words
            from builders.backends.base import check_device

            check_device(cfg.device)
        if ":" in cfg.device:  # Ray shows each actor only the GPU it was given, as cuda:0
            raise InputError(
                f"device {cfg.device}: on the ray executor every replica is given a GPU of its own; use cuda (or cpu)",
                option="device",
            )
    preflight(ex, partial(ranker_resources, cfg))


def _check_capacity(ex: ExecutorConfig, options: dict[str, float], total: dict[str, float], local: bool) -> None:
    """Replicas that need more CPUs or GPUs than Ray has: an error on an instance of this machine (it never grows),
    a warning on a cluster (nodes may join; the replicas wait for them)."""
    need = {k: v * ex.replicas for k, v in (("CPU", options["num_cpus"]), ("GPU", options["num_gpus"])) if v}
    short = {k: v for k, v in need.items() if v > total.get(k, 0)}
    if not short:
        return
    have = ", ".join(f"{total.get(k, 0):g} {k}s" for k in need)
    wanted = ", ".join(f"{v:g} {k}s" for k, v in need.items())
    if local:
        raise InputError(
            f"replicas {ex.replicas} need {wanted}; this machine's Ray has {have}: use fewer "
            f"replicas or join a cluster (ray_address)",
            option="replicas",
        )
    print(
        f"Warning: the Ray cluster has {have} now; {ex.replicas} replicas need {wanted}: they wait for nodes to join",
        file=sys.stderr,
        flush=True,
    )


# --------------------------------------------------------------------------------------------------------- session
_session = {"depth": 0, "owned": False}


@contextmanager
def session(ex: ExecutorConfig) -> Iterator[None]:
    """Ray for the length of the block. Reuses a connection the process already has (a notebook's ray.init, an
    enclosing stage); else joins `ray_address` (None: RAY_ADDRESS, else a new local instance) and shuts down or
    disconnects at the end."""
    import ray

    if _session["depth"] == 0:
        _session["owned"] = not ray.is_initialized()
        if _session["owned"]:
            address = _address(ex)
            kw: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
            if address == "local":
                kw["include_dashboard"] = False
            _reachable(address)
            try:
                ray.init(address=address, **kw)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise IterdpoError(f"cannot start or reach Ray at {address}: {one_line(e)}") from None
    _session["depth"] += 1
    try:
        yield
    finally:
        _session["depth"] -= 1
        if _session["depth"] == 0 and _session["owned"]:
            ray.shutdown()
            _session["owned"] = False


def _reachable(address: str, timeout: float = 10.0) -> None:
    """HOST:PORT (or ray://HOST:PORT) accepts connections: Ray itself retries an unreachable address for minutes."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # auto, local: Ray answers at once
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise IterdpoError(
            f"cannot reach Ray at {address}: {e.strerror or type(e).__name__}; is `ray start` running there?"
        ) from None


def cluster_gpus(ex: ExecutorConfig) -> float:
    """GPUs of the cluster the executor runs on (a new local instance: this machine's)."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0)
    if _address(ex) == "local":
        import torch

        return torch.cuda.device_count()
    with session(ex):
        return ray.cluster_resources().get("GPU", 0)


# ------------------------------------------------------------------------------------------------------- the pool
class _Replica:
    """One actor: the backend `build()` makes, and `fn(backend, payload)` per chunk. A backend that fails to load
    is reported by every call (its own exception, e.g. an InputError), not as a dead actor."""

    def __init__(self, build: Callable[[], Any]):
        try:
            self.backend, self.error = build(), None
        except Exception as e:  # noqa: BLE001 - re-raised by every call, in its own type and words
            self.backend, self.error = None, e

    def describe(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return self.backend.describe()

    def run(self, fn: Callable[[Any, Any], Any], payload: Any) -> Any:
        if self.error is not None:
            raise self.error
        return fn(self.backend, payload)


def _merge(items: Sequence[Finished]) -> Finished:
    import pyarrow as pa

    units = {u: info for item in items for u, info in item.units.items()}
    return Finished(units, pa.concat_tables([item.rows for item in items]), sum(item.tokens for item in items))


class RayPool:
    """`replicas` actors holding the backend `build` makes; `stream` feeds them payloads and yields results as
    they complete. `stats` says how the work was split (StageResult.executor)."""

    def __init__(
        self, ex: ExecutorConfig, build: Callable[[], Any], resources: Callable[[float], dict[str, float]], what: str
    ):
        import ray

        self.ex, self.build, self.what = ex, build, what
        self._stack = ExitStack()
        start = time.perf_counter()
        self._stack.enter_context(session(ex))
        try:
            self.init_seconds = time.perf_counter() - start
            total = ray.cluster_resources()
            self.options = resources(total.get("GPU", 0))
            _check_capacity(ex, self.options, total, local=_session["owned"] and _address(ex) == "local")
            self._cls = ray.remote(_Replica)
            self._run_id = uuid.uuid4().hex[:8]
            self._names = itertools.count()
            self.actors = [self._spawn(i) for i in range(ex.replicas)]
            self.generation = [0] * ex.replicas
            # every replica built its backend (errors, e.g. a model that cannot load, surface here in their words)
            infos = self._get([a.describe.remote() for a in self.actors])
            self.info = infos[0]
            self.ready_seconds = time.perf_counter() - start - self.init_seconds
            self.units = [0] * ex.replicas
            self.nodes: set[str] = set()
            self.resubmitted = self.replaced = 0
        except BaseException:
            self.close()
            raise

    def _spawn(self, slot: int):
        name = f"iterdpo-{self.what}-{self._run_id}-{slot}.{next(self._names)}"
        # no Ray restarts: a lost actor's chunks go to the live ones at once, rather than wait on its restart
        return self._cls.options(name=name, max_restarts=0, **self.options).remote(self.build)

    @staticmethod
    def _get(refs):
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            raise e.cause from None  # the backend's own exception (an IterdpoError is one line on the CLI)
        except ray.exceptions.RayActorError as e:
            raise IterdpoError(
                f"a replica died while loading its backend ({type(e).__name__}); see the worker "
                f"logs in Ray's session folder (/tmp/ray/session_latest/logs)"
            ) from None

    def describe(self) -> dict[str, Any]:
        return {**self.info, "executor": {"executor": "ray", "replicas": self.ex.replicas}}

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "executor": "ray",
            "replicas": self.ex.replicas,
            "nodes": len(self.nodes),
            "ray_init_seconds": round(self.init_seconds, 2),
            "replicas_ready_seconds": round(self.ready_seconds, 2),
            "units_per_replica": list(self.units),
            "resubmitted_chunks": self.resubmitted,
            "replaced_replicas": self.replaced,
        }

    def stream(
        self, fn: Callable[[Any, Any], Finished], payloads: Sequence[Any], size: Callable[[Any], int]
    ) -> Iterator[Finished]:
        """fn(backend, payload) on the replicas, each result yielded as it completes (any order). A lost replica's
        chunks go back to the front of the queue, for the live replicas; its replacement takes chunks once its
        backend is loaded (on a cluster with no room for it, the others finish the run)."""
        import ray
        from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

        queue = deque(range(len(payloads)))
        work: dict[Any, tuple[int, int, int]] = {}  # ref -> (slot, actor generation, payload index)
        probes: dict[Any, tuple[int, int]] = {}  # a replacement's describe() -> (slot, generation): ready when done
        load = [0] * len(self.actors)
        ready = [True] * len(self.actors)
        attempts = [0] * len(payloads)

        def fill(slot: int) -> None:
            while queue and ready[slot] and load[slot] < DEPTH:
                i = queue.popleft()
                work[self.actors[slot].run.remote(fn, payloads[i])] = (slot, self.generation[slot], i)
                load[slot] += 1

        def replace_actor(slot: int, error: BaseException) -> None:
            print(
                f"Warning: {self.what} replica {slot} lost ({type(error).__name__}); its chunks go to the other "
                f"replicas and a new replica starts",
                file=sys.stderr,
                flush=True,
            )
            ray.kill(self.actors[slot], no_restart=True)
            self.actors[slot] = self._spawn(slot)
            self.generation[slot] += 1
            self.replaced += 1
            load[slot], ready[slot] = 0, False
            probes[self.actors[slot].describe.remote()] = (slot, self.generation[slot])

        for slot in range(len(self.actors)):
            fill(slot)
        try:
            while work or (queue and probes):
                (ref,), _ = ray.wait([*work, *probes], num_returns=1)
                if ref in probes:
                    slot, gen = probes.pop(ref)
                    if gen == self.generation[slot]:
                        self._get(ref)  # the backend loaded (or its own error)
                        ready[slot] = True
                        fill(slot)
                    continue
                slot, gen, i = work.pop(ref)
                current = gen == self.generation[slot]
                if current:
                    load[slot] -= 1
                try:
                    item, node = ray.get(ref)
                except RayTaskError as e:
                    raise e.cause from None
                except (RayActorError, ObjectLostError) as e:
                    attempts[i] += 1
                    if attempts[i] >= ATTEMPTS:
                        raise IterdpoError(
                            f"{self.what}: a chunk of {size(payloads[i])} units lost its replica "
                            f"{attempts[i]} times (last: {type(e).__name__}); the finished work is "
                            f"kept: rerun the same command to continue"
                        ) from None
                    queue.appendleft(i)
                    self.resubmitted += 1
                    if current:  # the first loss seen from this actor (its other chunks come back too)
                        replace_actor(slot, e)
                    for other in range(len(self.actors)):
                        fill(other)
                    continue
                self.units[slot] += len(item.units)
                self.nodes.add(node)
                fill(slot)
                yield item
        finally:
            for ref in [*work, *probes]:  # chunks of a failed or interrupted run: nobody will read them
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - the actors are killed next anyway
                    pass

    def close(self) -> None:
        import ray

        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        self._stack.close()


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


# ------------------------------------------------------------------------------------------------------ producer
def _run_chunk(run: Callable, backend: Any, payload: list[Any]) -> tuple[Finished, str]:
    return _merge(list(run(backend, payload))), _node()


class Replicated:
    """A stage's backend on Ray: `replicas` actors each hold the local backend `build` makes and run the local
    `run` on chunks of the work items; the driver yields each chunk's `Finished` as it completes."""

    def __init__(
        self,
        ex: ExecutorConfig,
        build: Callable[[], Any],
        run: Callable,
        chunk: int,
        resources: Callable[[float], dict[str, float]],
        label: str,
    ):
        self.run, self.chunk = run, chunk
        self.pool = RayPool(ex, build, resources, label)

    def produce(self, items: Sequence[Any]) -> Iterator[Finished]:
        payloads = [list(c) for c in chunks(list(items), self.chunk)]
        yield from self.pool.stream(partial(_run_chunk, self.run), payloads, len)

    def describe(self) -> dict[str, Any]:
        return self.pool.describe()

    def close(self) -> None:
        self.pool.close()


def generator_resources(cfg: GenerateConfig, gpus: float) -> dict[str, float]:
    """What one generation replica takes on a cluster with `gpus` GPUs."""
    if cfg.backend == "openai" or not gpus:
        return {"num_cpus": 1, "num_gpus": 0}
    return {"num_cpus": 1, "num_gpus": cfg.vllm.tensor_parallel_size if cfg.backend == "vllm" else 1}


def ranker_resources(cfg: RankConfig, gpus: float) -> dict[str, float]:
    """What one ranking replica takes on a cluster with `gpus` GPUs."""
    on_cpu = cfg.ranker == "python" or (cfg.device or "").startswith("cpu")
    # --device cuda asks for GPUs even where the cluster has none now (the capacity check says so): a replica
    # without one would fail inside Ray
    wants_gpu = not on_cpu and (cfg.device or "").startswith("cuda")
    return {"num_cpus": 1, "num_gpus": 1 if wants_gpu or (not on_cpu and gpus) else 0}


def replicated(
    ex: ExecutorConfig,
    build: Callable[[], Any],
    run: Callable,
    *,
    chunk: int,
    resources: Callable[[float], dict[str, float]],
    label: str,
) -> Producer:
    """The executor's Producer on Ray (builders/executor.py:producer)."""
    return Producer(
        partial(Replicated, ex, build, run, chunk, resources, label),
        Replicated.produce,
        lambda backend: backend.pool.stats,
    )


def ranker_on_gpu(cfg: RankConfig) -> bool:
    """Whether the replicas score on GPUs (then PairRM's batch options enter the work key, as locally)."""
    if cfg.device is not None:
        return not cfg.device.startswith("cpu")
    return cfg.ranker != "python" and cluster_gpus(cfg.scale_out) > 0
