"""The openai backend against a fake server with a fixed latency: does it keep the server busy?

    python bench/openai_window.py [--prompts 2100] [--latency 0.34] [--concurrency 64 128] [--responses 5]

For each concurrency, one `generate` stage (fresh catalog, default commit_seconds) against a fake OpenAI-compatible
server in its own process (bench/fake_openai.py: asyncio, HTTP/1.1 keep-alive, ~1,500 characters per answer after
`--latency` seconds, so only the client's cost is measured). Prints the wall time against the server-bound ideal ceil(prompts / c) * latency, the most
requests the server saw in flight, and the client process's CPU seconds (the stage, its commits included).
Goals (issue 16): within 1.3x of the ideal at concurrency 64; max in flight = concurrency.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------------- the fake server
def start_server(latency: float, model: str) -> tuple[subprocess.Popen, str]:
    """bench/fake_openai.py in its own process (its CPU is not the client's), listing `model` on /v1/models."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("fake_openai.py")),
            "--latency-ms",
            str(latency * 1000),
            "--model",
            model,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise SystemExit("the fake server did not start")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def server_stats(url: str) -> dict:
    import httpx

    return httpx.get(url.removesuffix("/v1") + "/stats").json()


# ------------------------------------------------------------------------------------------------- the client
def run(prompts: int, latency: float, concurrency: int, responses: int, model: str, root: Path) -> dict:
    import builders.generate as gen
    from builders.catalog import Catalog
    from builders.config import GenerateConfig, OpenAIConfig, SamplingConfig, SplitConfig
    from builders.prompts import import_prompts, split_prompts

    source = root / "prompts.jsonl"
    if not source.exists():
        source.write_text(
            "".join(
                json.dumps({"prompt": f"Prompt number {i}: say something about {i}."}) + "\n" for i in range(prompts)
            )
        )
    catalog = Catalog(root / f"c{concurrency}.duckdb")
    import_prompts(catalog, str(source))
    split_prompts(catalog, SplitConfig(iterations=1, train_size=prompts, test_size=0, seed=0))
    if not Path(model).exists():
        gen.model_identity = lambda m, revision=None: {"model": m}  # a served name: nothing to resolve on the hub
    server, url = start_server(latency, model)
    try:
        cfg = GenerateConfig(
            model=model,
            backend="openai",
            splits=("train",),
            sampling=SamplingConfig(num_responses=responses, max_tokens=512, seed=1),
            openai=OpenAIConfig(base_url=url, concurrency=concurrency),
        )
        cpu0, t0 = time.process_time(), time.perf_counter()
        result = gen.generate(catalog, 1, cfg, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        stats = server_stats(url)
    finally:
        server.terminate()
        server.wait()
    ideal = math.ceil(prompts / concurrency) * latency
    return {
        "concurrency": concurrency,
        "wall_s": round(wall, 2),
        "ideal_s": round(ideal, 2),
        "ratio": round(wall / ideal, 2),
        "max_in_flight": stats["max_in_flight"],
        "requests": stats["requests"],
        "client_cpu_s": round(cpu, 2),
        "tokens": result.tokens,
        "tok_per_s": round(result.tokens / wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2100)
    parser.add_argument("--latency", type=float, default=0.34)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--responses", type=int, default=5)
    parser.add_argument("--model", default="served-model", help="a served name (default) or a local model folder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="iterdpo-openai-bench-"))
    print(
        f"{args.prompts} prompts x {args.responses} responses, {args.latency * 1000:.0f} ms per request, "
        f"{os.cpu_count()} CPU cores"
    )
    for c in args.concurrency:
        r = run(args.prompts, args.latency, c, args.responses, args.model, root)
        print(
            f"concurrency {c:4d}: wall {r['wall_s']:6.2f} s  ideal {r['ideal_s']:6.2f} s  ({r['ratio']:.2f}x)  "
            f"max in flight {r['max_in_flight']:4d}  client CPU {r['client_cpu_s']:6.2f} s  "
            f"{r['tokens']:,} tokens ({r['tok_per_s']:,} tok/s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
