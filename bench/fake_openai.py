"""A fake OpenAI-compatible chat-completions server for benchmarks: answers fast and cheaply, so that what a bench
measures is the client's own cost.

    python bench/fake_openai.py [--port 0] [--latency-ms 340]

Prints `PORT <n>` on stdout once it listens on 127.0.0.1. Endpoints:
- POST /v1/chat/completions: `n` choices of ~1,500 characters (1,000-2,000, deterministic from the request's
  `seed`, the choice index and the prompt), finish_reason "stop", and a `usage` object (~4 characters per token);
  each answer waits --latency-ms first (0: instant), as a server busy generating would.
- GET /stats: {"requests", "in_flight", "max_in_flight", "latency_ms"}; POST /reset zeroes the counters.

Stdlib only (asyncio streams, HTTP/1.1 keep-alive), so it starts in milliseconds and costs little CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "ultrafeedback_sample.jsonl"


def corpus() -> str:
    """English-looking text to cut answers from: the bundled prompts' words, shuffled deterministically."""
    import random

    words = []
    for line in BUNDLED.read_text().splitlines():
        words += (json.loads(line).get("prompt") or "").split()
    rng = random.Random(0)
    text = []
    while sum(map(len, text)) < 400_000:
        rng.shuffle(words)
        text.append(" ".join(words))
    return " ".join(text)


class Server:
    def __init__(self, latency_ms: float):
        self.latency = latency_ms / 1000
        self.text = corpus()
        self.requests = self.in_flight = self.max_in_flight = 0

    def completion(self, body: dict) -> dict:
        n = int(body.get("n") or 1)
        prompt = "".join(m.get("content") or "" for m in body.get("messages") or [])
        key = hashlib.sha256(f"{body.get('seed')}|{prompt}".encode()).digest()
        choices = []
        for i in range(n):
            h = int.from_bytes(hashlib.sha256(key + bytes([i % 256])).digest()[:8], "big")
            length = 1000 + h % 1001
            start = (h >> 16) % (len(self.text) - 2100)
            choices.append({"index": i, "message": {"role": "assistant", "content": self.text[start:start + length]},
                            "finish_reason": "stop", "logprobs": None})
        prompt_tokens = max(1, len(prompt) // 4)
        completion_tokens = sum(len(c["message"]["content"]) // 4 for c in choices)
        return {"id": "chatcmpl-" + key.hex()[:24], "object": "chat.completion", "created": 0,
                "model": body.get("model") or "fake-model", "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def stats(self) -> dict:
        return {"requests": self.requests, "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "latency_ms": self.latency * 1000}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
                raw = await reader.readexactly(int(headers.get("content-length") or 0))
                status, out = await self.route(method, path.split("?")[0], raw)
                data = json.dumps(out).encode()
                writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def route(self, method: str, path: str, raw: bytes) -> tuple[str, dict]:
        if method == "POST" and path.endswith("/chat/completions"):
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if self.latency:
                    await asyncio.sleep(self.latency)
                try:
                    return "200 OK", self.completion(json.loads(raw))
                except (ValueError, TypeError, AttributeError) as e:
                    return "400 Bad Request", {"error": {"message": f"bad request: {e}"}}
            finally:
                self.in_flight -= 1
        if method == "GET" and path == "/stats":
            return "200 OK", self.stats()
        if method == "POST" and path == "/reset":
            self.requests = self.max_in_flight = 0
            return "200 OK", self.stats()
        return "404 Not Found", {"error": {"message": f"no route {method} {path}"}}


async def serve(port: int, latency_ms: float) -> None:
    app = Server(latency_ms)
    server = await asyncio.start_server(app.handle, "127.0.0.1", port, backlog=1024)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="wait per request before answering")
    args = ap.parse_args()
    try:
        asyncio.run(serve(args.port, args.latency_ms))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
