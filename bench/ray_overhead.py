"""The ray executor's overhead over the local path: the same tiny generation job, local vs Ray with 1 and 2 replicas.

    python bench/ray_overhead.py [--prompts 200] [--responses 2] [--tokens 16]

Prints, for the `generate` stage on the tiny generator (transformers backend): the local wall time; Ray's start-up
(a local instance) apart; per replica count, the replicas' start-up (a worker process importing torch and loading
the model) and the work's wall time after it, and how the prompts were split across the replicas. All three runs
must register the same snapshot id. On a machine with few cores (2 here) replicas share them: this measures the
executor's overhead (chunk dispatch, results crossing the object store, commits), not a speed-up; on a cluster
each replica has its own GPU or node.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from builders.catalog import Catalog  # noqa: E402
from builders.config import ExecutorConfig, GenerateConfig, SamplingConfig, SplitConfig  # noqa: E402
from builders.generate import generate, make_generator  # noqa: E402
from builders.prompts import import_prompts, split_prompts  # noqa: E402
from builders.tiny import build_tiny_models  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "ultrafeedback_sample.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--responses", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch-prompts", type=int, default=8, help="prompts per chunk sent to a replica")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="iterdpo-raybench-"))
    try:
        model = build_tiny_models(root / "models").generator
        pristine = root / "prompts.duckdb"
        catalog = Catalog(pristine)
        import_prompts(catalog, str(SAMPLE))
        split_prompts(catalog, SplitConfig(iterations=1, train_size=args.prompts, test_size=0, seed=0))
        cfg = GenerateConfig(
            model=str(model),
            splits=("train",),
            batch_prompts=args.batch_prompts,
            sampling=SamplingConfig(num_responses=args.responses, temperature=0.7, max_tokens=args.tokens, seed=1),
        )

        def run(name: str, scale_out: ExecutorConfig, generator=None):
            shutil.copy(pristine, root / f"{name}.duckdb")
            t0 = time.perf_counter()
            result = generate(
                Catalog(root / f"{name}.duckdb"),
                1,
                replace(cfg, scale_out=scale_out),
                progress=False,
                generator=generator,
            )
            return result, time.perf_counter() - t0

        t0 = time.perf_counter()
        generator = make_generator(cfg)
        load = time.perf_counter() - t0
        local, local_wall = run("local", ExecutorConfig(), generator)
        generator.close()
        print(
            f"{args.prompts} prompts x {args.responses} responses x {args.tokens} tokens, tiny generator, "
            f"chunks of {args.batch_prompts} prompts; {os.cpu_count()} cores"
        )
        print(f"local:          {load + local_wall:6.1f} s wall = {load:.1f} s model load + {local_wall:.1f} s work")

        import ray

        t0 = time.perf_counter()
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            object_store_memory=100 * 1024 * 1024,
        )
        print(f"ray start-up:   {time.perf_counter() - t0:6.1f} s (a local instance; not counted below)")
        try:
            for replicas in (1, 2):
                result, wall = run(f"ray{replicas}", ExecutorConfig(executor="ray", replicas=replicas))
                ex = result.executor
                work = wall - ex["replicas_ready_seconds"]
                assert result.snapshots[0].id == local.snapshots[0].id, "the ray run registered another snapshot"
                print(
                    f"ray, {replicas} replica{'s' if replicas > 1 else ' '}: {wall:6.1f} s wall = "
                    f"{ex['replicas_ready_seconds']:.1f} s replicas' start-up + {work:.1f} s work "
                    f"({work / local_wall:.2f}x the local work); prompts per replica "
                    f"{'/'.join(map(str, ex['units_per_replica']))}"
                )
        finally:
            ray.shutdown()
        print(f"same snapshot id in all runs: {local.snapshots[0].id[:12]}")
        print("on this machine the replicas share its cores: this is the executor's overhead, not a speed-up")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
