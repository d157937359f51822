"""The one fake OpenAI-compatible server of the project: the benches run it as a process, the tests in a thread.

    python bench/fake_openai.py [--port 0] [--latency-ms 340] [--model served-model] [--text long|short]

As a script it prints `PORT <n>` on stdout once it listens on 127.0.0.1 (loopback only). In a test:

    with FakeOpenAI(latency=0.1) as server:    # server.url is http://127.0.0.1:<port>/v1
        server.fail_after = 5                  # knobs may change between (and during) requests

Endpoints:
- POST /v1/chat/completions: `n` choices, finish_reason "stop", a `usage` object. `text="short"` (the tests):
  choice i says `answer(seed + i)`, usage says PROMPT_TOKENS and the sum of `tokens_of(seed + i)` (not derived
  from the text, so a test tells the server's count from a local one). `text="long"` (the benches, the script's
  default): ~1,500 characters of English-looking words (1,000-2,000, deterministic from the seed, the choice index
  and the prompt), ~4 characters per token. Each answer waits `latency` seconds first, as a busy server would.
  With `logprobs: true` (the judge), the answer is a verdict with `logprobs.content` (each token's `top_logprobs`):
  "[[A]]"/"[[B]]" when the prompt asks for one, else "Score: D"; the verdict token's distribution is
  `judge_distribution(prompt)`, its text the most likely value; a final assistant message with
  `continue_final_message` is continued (its text is not repeated). `judge_garbage`: that many judge requests
  first answer "I cannot judge this." (no verdict).
- GET /v1/models: lists `model` (as vLLM answers: `created` is the time of the call, the permission id fresh).
- GET /stats: the counters as JSON; POST /reset zeroes them.

Scripted behaviour (attributes, for the tests): `hold_until` (the first requests wait, at most 5 s, until that many
are in flight), `fail_first` / `fail_after` (answer `fail_status`, with an error body that echoes the request's
headers, as some proxies do), `hang_after` (after that many answers, accept requests and never answer them; with
`trickle`, send the headers and then a byte every 0.2 s, so no single read waits long) until `release()`.
Counters: requests, answered, hung, in_flight, max_in_flight, ports (client ports seen), auth (Authorization
headers seen); `hanging` is a semaphore released once per request held, a handshake for a test.

Stdlib only (asyncio streams, HTTP/1.1 keep-alive), so it starts in milliseconds and costs little CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import threading
import time
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "ultrafeedback_sample.jsonl"
PROMPT_TOKENS = 20  # what the short answers' usage reports per request
HANG_SECONDS = 60  # bounds: a client that would wait forever fails its test, it does not hang it
TRICKLE_SECONDS = 30
SERVED = {
    "id": "served-model",
    "object": "model",
    "owned_by": "fake",
    "root": "org/base-model",
    "parent": None,
    "max_model_len": 4096,
}


def answer(seed: int) -> str:
    """The short answer to the choice with this seed."""
    return f"answer {seed} " + "word " * (seed % 5)


def judge_distribution(prompt: str) -> dict[str, float]:
    """The fake judge's probabilities at its verdict token, deterministic from the judge prompt's text: A and B
    when the prompt asks for [[A]] or [[B]], else the digits 0-9."""
    h = hashlib.sha256(prompt.encode()).digest()
    values = ["A", "B"] if "[[A]]" in prompt else [str(d) for d in range(10)]
    weights = [1 + b for b in h[: len(values)]]
    return {v: w / sum(weights) for v, w in zip(values, weights)}


def tokens_of(seed: int) -> int:
    """The completion tokens the server reports for the short answer with this seed."""
    return 5 + seed % 7


def corpus() -> str:
    """English-looking text to cut long answers from: the bundled prompts' words, shuffled deterministically."""
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


class FakeOpenAI:
    def __init__(self, latency: float = 0.0, text: str = "short", model: str = SERVED["id"]):
        if text not in ("short", "long"):
            raise ValueError(f"text must be short or long, not {text!r}")
        self.latency, self.model = latency, model
        self._text = corpus() if text == "long" else None
        self.hold_until, self.fail_first, self.fail_after, self.fail_status = 1, 0, None, 503
        self.hang_after, self.trickle = None, False
        self.judge_garbage = 0
        self.requests = self.answered = self.hung = self.in_flight = self.max_in_flight = 0
        self.ports: set[int] = set()
        self.auth: list[str | None] = []
        self.hanging = threading.Semaphore(0)
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------- running it
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def serve(self, port: int = 0, ready=None) -> None:
        """Serves until stop() (or forever); `ready(port)` is called once it listens."""
        self._loop = asyncio.get_running_loop()
        self._full, self._release, self._stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", port, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        if ready:
            ready(self.port)
        async with server:
            await self._stop.wait()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> FakeOpenAI:
        started = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.serve(ready=lambda _: started.set())), name="fake-openai", daemon=True
        )
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError("the fake OpenAI server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def release(self) -> None:
        """Lets every request held by `hang_after` end (closing its connection unanswered)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._release.set)

    def stats(self) -> dict:
        return {
            "requests": self.requests,
            "answered": self.answered,
            "hung": self.hung,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "latency_ms": self.latency * 1000,
        }

    # ----------------------------------------------------------------------------------------- HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = (writer.get_extra_info("peername") or ("", 0))[1]
        try:
            while True:  # one request after the other on a keep-alive connection, until the client closes it
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
                lower = {k.lower(): v for k, v in headers.items()}
                raw = await reader.readexactly(int(lower.get("content-length") or 0))
                out = await self._route(method, path.split("?")[0], headers, lower, raw, port, writer)
                if out is None:  # a request held and never answered: the connection ends with it
                    break
                status, payload = out
                data = json.dumps(payload).encode()
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
                if lower.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass  # a client that gave up (its requests cancelled) or spoke no HTTP: nothing to answer
        finally:
            writer.close()

    async def _route(self, method, path, headers, lower, raw, port, writer):
        if method == "POST" and path.endswith("/chat/completions"):
            return await self._chat(headers, lower, raw, port, writer)
        if method == "GET" and path.endswith("/models"):
            entry = {
                **SERVED,
                "id": self.model,
                "created": int(time.time()),
                "permission": [{"id": f"modelperm-{time.time_ns()}"}],
            }
            return "200 OK", {"object": "list", "data": [entry]}
        if method == "GET" and path == "/stats":
            return "200 OK", self.stats()
        if method == "POST" and path == "/reset":
            self.requests = self.answered = self.hung = self.max_in_flight = 0
            return "200 OK", self.stats()
        return "404 Not Found", {"error": {"message": f"no route {method} {path}"}}

    async def _chat(self, headers, lower, raw, port, writer):
        self.requests += 1
        self.ports.add(port)
        self.auth.append(lower.get("authorization"))
        try:
            body = json.loads(raw)
            int(body.get("n") or 1)
        except (ValueError, TypeError, AttributeError) as e:
            return "400 Bad Request", {"error": {"message": f"bad request: {e}"}}
        if self.hang_after is not None and self.answered >= self.hang_after:
            self.hung += 1
            self.hanging.release()
            await self._hang(writer)
            return None
        fail = self.requests <= self.fail_first or (self.fail_after is not None and self.answered >= self.fail_after)
        self.answered += not fail
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.in_flight >= self.hold_until:
                self._full.set()
            # the first requests wait until `hold_until` are in (or 5 s): a slow connect on a busy machine must not
            # make a client that does keep them all in flight look as if it did not
            try:
                await asyncio.wait_for(self._full.wait(), 5)
            except TimeoutError:
                pass
            if self.latency:
                await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        if fail:
            return f"{self.fail_status} Failing", {"error": f"overloaded; request headers: {headers}"}
        if body.get("logprobs"):
            return "200 OK", self._judge(body)
        return "200 OK", self._long(body) if self._text else self._short(body)

    def _judge(self, body: dict) -> dict:
        messages = body.get("messages") or []
        prompt = next((m.get("content") or "" for m in messages if m.get("role") == "user"), "")
        begun = messages[-1].get("content") or "" if body.get("continue_final_message") and messages else ""
        import math

        if self.judge_garbage > 0:
            self.judge_garbage -= 1
            tokens, verdict_at, dist = ["I", " cannot", " judge", " this", "."], None, {}
        else:
            dist = judge_distribution(prompt)
            best = max(dist, key=lambda v: dist[v])
            pairwise = "[[A]]" in prompt
            head = (["[["] if pairwise else ["Score", ":", " "]) if not begun else ([] if pairwise else [" "])
            tokens, verdict_at = [*head, best, *(["]]"] if pairwise else [])], len(head)
        content = []
        for k, token in enumerate(tokens):
            top = [{"token": v, "logprob": math.log(p)} for v, p in dist.items()] if k == verdict_at else []
            lp = math.log(dist[token]) if k == verdict_at else -0.01
            content.append({"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": top})
        return {
            "id": "chatcmpl-judge",
            "object": "chat.completion",
            "created": 0,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(tokens)},
                    "finish_reason": "stop",
                    "logprobs": {"content": content},
                }
            ],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": len(tokens),
                "total_tokens": PROMPT_TOKENS + len(tokens),
            },
        }

    async def _hang(self, writer: asyncio.StreamWriter) -> None:
        if not self.trickle:
            try:
                await asyncio.wait_for(self._release.wait(), HANG_SECONDS)
            except TimeoutError:
                pass
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        deadline = time.monotonic() + TRICKLE_SECONDS
        while time.monotonic() < deadline and not self._release.is_set():
            writer.write(b" ")
            await writer.drain()
            try:
                await asyncio.wait_for(self._release.wait(), 0.2)
            except TimeoutError:
                pass
        # then the connection closes with the body cut short: a client still waiting fails, it does not time out

    def _short(self, body: dict) -> dict:
        seeds = [int(body.get("seed") or 0) + i for i in range(int(body.get("n") or 1))]
        choices = [
            {"index": i, "message": {"role": "assistant", "content": answer(s)}, "finish_reason": "stop"}
            for i, s in enumerate(seeds)
        ]
        completion = sum(map(tokens_of, seeds))
        return {
            "id": f"chatcmpl-{seeds[0]}",
            "object": "chat.completion",
            "created": 0,
            "model": self.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": completion,
                "total_tokens": PROMPT_TOKENS + completion,
            },
        }

    def _long(self, body: dict) -> dict:
        n = int(body.get("n") or 1)
        prompt = "".join(m.get("content") or "" for m in body.get("messages") or [])
        key = hashlib.sha256(f"{body.get('seed')}|{prompt}".encode()).digest()
        choices = []
        for i in range(n):
            h = int.from_bytes(hashlib.sha256(key + bytes([i % 256])).digest()[:8], "big")
            length = 1000 + h % 1001
            start = (h >> 16) % (len(self._text) - 2100)
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": self._text[start : start + length]},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            )
        prompt_tokens = max(1, len(prompt) // 4)
        completion_tokens = sum(len(c["message"]["content"]) // 4 for c in choices)
        return {
            "id": "chatcmpl-" + key.hex()[:24],
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model") or self.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="wait per request before answering")
    ap.add_argument("--model", default=SERVED["id"], help="the model name GET /v1/models lists")
    ap.add_argument("--text", choices=("long", "short"), default="long", help="~1,500 characters or a few words")
    args = ap.parse_args()
    app = FakeOpenAI(args.latency_ms / 1000, args.text, args.model)
    try:
        asyncio.run(app.serve(args.port, ready=lambda port: print(f"PORT {port}", flush=True)))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
