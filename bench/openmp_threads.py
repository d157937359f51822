"""What the quickstart's CPU settings buy: a DPO-sized forward+backward of SmolLM2 (4 sequences of 256 tokens, as a
quickstart pair batch) in fp32 and in bf16 autocast, on 1 and 2 torch threads, with OpenMP's waiting threads
spinning (OMP_WAIT_POLICY=ACTIVE) or sleeping (PASSIVE, what `iterdpo` sets). Prints wall and CPU seconds per step
and the load average beside them: on a shared machine the figures move with the load, the ratios much less.

    python bench/openmp_threads.py --model quickstart/models/smollm2   # after `make quickstart`

Measured on the 2-core AMD EPYC (AVX512-BF16) build machine, loaded (load average 6-15 from other jobs):
bf16 autocast needs 1.7x less CPU per step than fp32 (6.9 vs 11.7 s); with ACTIVE, 2 threads took 2-7x the wall
time of 1 thread (31-64 s vs 9-14 s for two bf16 steps of 2 x 200 tokens); with PASSIVE 7-11 s vs 8 s. The
in-process vLLM engine likewise (16 prompts x 5 responses x 64 tokens, load ~7): ACTIVE 156 s on 2 threads vs
28 s on 1; PASSIVE 33 s on 2 vs 33 s on 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _steps(model_dir: str, threads: int, bf16: bool, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (4, 256))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids).logits.float()
        logits.log_softmax(-1).mean().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: first-call allocations and kernel selection
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "threads": threads,
        "bf16": bf16,
        "wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "wall_s": round(min(wall), 2),
        "cpu_s": round(min(cpu), 2),
        "load": round(os.getloadavg()[0], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="quickstart/models/smollm2", help="a causal LM folder (SmolLM2-135M)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement, in a fresh process
    args = parser.parse_args()
    if args.one:
        threads, bf16 = args.one.split(",")
        print(json.dumps(_steps(args.model, int(threads), bf16 == "1", args.repeats)))
        return
    # OpenMP reads its wait policy once, when torch loads: each setting runs in its own process
    for policy in ("ACTIVE", "PASSIVE"):
        for threads in (1, 2):
            for bf16 in ("0", "1"):
                env = {**os.environ, "OMP_WAIT_POLICY": policy, "OMP_NUM_THREADS": "1"}
                cmd = [sys.executable, __file__, "--model", args.model, "--repeats", str(args.repeats)]
                out = subprocess.run(
                    [*cmd, "--one", f"{threads},{bf16}"], env=env, capture_output=True, text=True, check=True
                )
                print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
