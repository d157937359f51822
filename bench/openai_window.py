"""The openai backend against a fake server with a fixed latency: does it keep the server busy?

    python bench/openai_window.py [--prompts 2100] [--latency 0.34] [--concurrency 64 128] [--responses 5]

For each concurrency, one `generate` stage (fresh catalog, default commit_seconds) against a fake OpenAI-compatible
server in its own process (asyncio, HTTP/1.1 keep-alive, answers after `--latency` seconds, so only the client's
cost is measured). Prints the wall time against the server-bound ideal ceil(prompts / c) * latency, the most
requests the server saw in flight, and the client process's CPU seconds (the stage, its commits included).
Goals (issue 16): within 1.3x of the ideal at concurrency 64; max in flight = concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
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
async def _serve(latency: float) -> None:
    stats = {"in_flight": 0, "max_in_flight": 0, "requests": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if method == "GET" and path.endswith("/stats"):
                    payload = json.dumps(stats).encode()
                else:
                    stats["requests"] += 1
                    stats["in_flight"] += 1
                    stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
                    try:
                        req = json.loads(body)
                        await asyncio.sleep(latency)
                    finally:
                        stats["in_flight"] -= 1
                    text = "word " * 300  # ~1,500 characters, as in the workload
                    choices = [{"index": i, "message": {"role": "assistant", "content": f"{req['seed'] + i} {text}"},
                                "finish_reason": "stop"} for i in range(req["n"])]
                    payload = json.dumps({"choices": choices, "usage": {
                        "prompt_tokens": 20, "completion_tokens": 301 * req["n"], "total_tokens": 20 + 301 * req["n"]}}
                    ).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--latency", str(latency)], stdout=subprocess.PIPE,
                            text=True)
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/v1"


def server_stats(url: str) -> dict:
    import httpx

    return httpx.get(url + "/stats").json()


# ------------------------------------------------------------------------------------------------- the client
def run(prompts: int, latency: float, concurrency: int, responses: int, model: str, root: Path) -> dict:
    import builders.generate as gen
    from builders.catalog import Catalog
    from builders.config import GenerateConfig, OpenAIConfig, SamplingConfig, SplitConfig
    from builders.prompts import import_prompts, split_prompts

    source = root / "prompts.jsonl"
    if not source.exists():
        source.write_text("".join(json.dumps({"prompt": f"Prompt number {i}: say something about {i}."}) + "\n"
                                  for i in range(prompts)))
    catalog = Catalog(root / f"c{concurrency}.duckdb")
    import_prompts(catalog, str(source))
    split_prompts(catalog, SplitConfig(iterations=1, train_size=prompts, test_size=0, seed=0))
    if not Path(model).exists():
        gen.model_identity = lambda m, revision=None: {"model": m}  # a served name: nothing to resolve on the hub
    server, url = start_server(latency)
    try:
        cfg = GenerateConfig(model=model, backend="openai", splits=("train",),
                             sampling=SamplingConfig(num_responses=responses, max_tokens=512, seed=1),
                             openai=OpenAIConfig(base_url=url, concurrency=concurrency))
        cpu0, t0 = time.process_time(), time.perf_counter()
        result = gen.generate(catalog, 1, cfg, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        stats = server_stats(url)
    finally:
        server.terminate()
        server.wait()
    ideal = math.ceil(prompts / concurrency) * latency
    return {"concurrency": concurrency, "wall_s": round(wall, 2), "ideal_s": round(ideal, 2),
            "ratio": round(wall / ideal, 2), "max_in_flight": stats["max_in_flight"], "requests": stats["requests"],
            "client_cpu_s": round(cpu, 2), "tokens": result.tokens, "tok_per_s": round(result.tokens / wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2100)
    parser.add_argument("--latency", type=float, default=0.34)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--responses", type=int, default=5)
    parser.add_argument("--model", default="served-model", help="a served name (default) or a local model folder")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.latency))
        return
    root = Path(tempfile.mkdtemp(prefix="iterdpo-openai-bench-"))
    print(f"{args.prompts} prompts x {args.responses} responses, {args.latency * 1000:.0f} ms per request, "
          f"{os.cpu_count()} CPU cores")
    for c in args.concurrency:
        r = run(args.prompts, args.latency, c, args.responses, args.model, root)
        print(f"concurrency {c:4d}: wall {r['wall_s']:6.2f} s  ideal {r['ideal_s']:6.2f} s  ({r['ratio']:.2f}x)  "
              f"max in flight {r['max_in_flight']:4d}  client CPU {r['client_cpu_s']:6.2f} s  "
              f"{r['tokens']:,} tokens ({r['tok_per_s']:,} tok/s)", flush=True)


if __name__ == "__main__":
    main()
