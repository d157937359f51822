"""Where a stage's model work runs: in this process, or on Ray replicas of the same backend.

    >>> from builders.config import ExecutorConfig
    >>> from builders.executor import producer
    >>> def build():  # the backend (a model, a client), built once a split has work left
    ...     return str.upper
    >>> def run(backend, items):  # items -> Finished units; module-level functions, so Ray can ship them
    ...     yield from ()
    >>> local = producer(ExecutorConfig(), build, run, chunk=64, resources=lambda gpus: {"num_cpus": 1},
    ...                  label="demo")
    >>> local.build is build and local.run is run  # locally: the pair itself
    True

(builders/generate.py passes `partial(make_generator, cfg)` and `partial(_produce, cfg)`; with
`ExecutorConfig(executor="ray", replicas=2)` the same call returns Ray replicas of that backend.)

A stage hands over how to build its local backend and how that backend turns work items into `Finished` rows;
the executor returns the `Producer` that runs them. Locally that is the pair itself. On Ray, `replicas` actors
each build the local backend and run the same local function on chunks of the items (builders/backends/ray.py), so
the rows, and the snapshot ids, are a local run's. No stage branches on the executor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from builders.config import ExecutorConfig
from builders.stage import Finished, Producer


def producer(
    ex: ExecutorConfig,
    build: Callable[[], Any],
    run: Callable[[Any, Sequence[Any]], Iterable[Finished]],
    *,
    chunk: int,
    resources: Callable[[float], dict[str, float]],
    label: str,
) -> Producer:
    """`build` and `run` must be picklable (module-level functions, or partials of them) for the ray executor;
    `chunk` items go to a replica at a time; `resources(cluster_gpus)`: what one replica takes (Ray's num_cpus,
    num_gpus)."""
    if ex.executor == "local":
        return Producer(build, run)
    from builders.backends.ray import replicated

    return replicated(ex, build, run, chunk=chunk, resources=resources, label=label)
