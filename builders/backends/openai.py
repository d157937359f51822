"""The `openai` generation backend: any OpenAI-compatible chat-completions server (vLLM serve, TGI, Together).

Bounded concurrency, retries with exponential backoff on 429, 5xx, timeouts and connection errors; each request is
bounded as a whole by `request_timeout` (a server that accepts and never answers costs that, per attempt); the API
key is read from an environment variable and appears in no log line, error, catalog row or file. `model` is a local
folder (its tokenizer counts what `usage` cannot) or the name the server serves (nothing is looked up for it).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import hashlib
import os
import queue
import random
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from builders.backends.base import Request, Sample
from builders.backends.base import call_sampling as _sampling
from builders.config import OpenAIConfig, SamplingConfig, validate_openai
from builders.conversation import as_messages
from builders.errors import InputError, IterdpoError, redact

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
TOO_LONG_HINTS = ("context length", "maximum context", "too long", "max_model_len", "context_length")
MODELS_TIMEOUT = 10.0  # seconds for GET /models: what it tells is recorded, never needed, so it may not hold us up
# fields of a /models entry that change from call to call (vLLM stamps `created` with the time of the call and
# gives each permission a fresh id), or say nothing
VOLATILE = ("created", "permission", "object")
TIMED_OUT = "timed out"


class ServerError(IterdpoError):
    """The server could not be reached, or refused, after the allowed retries."""


class _End:
    """The window's last word on the results queue: every request was answered."""


class OpenAIGenerator:
    """Keeps exactly `concurrency` requests in flight for as long as there are prompts: an asyncio loop in a
    background thread runs one worker per slot over one httpx client (kept for the generator's life), and hands
    each answer to the caller through a queue, so the server keeps working while the stage commits."""

    def __init__(self, model: str, sampling: SamplingConfig, chat_template: Path | None, cfg: OpenAIConfig):

        validate_openai(cfg)
        self.model, self.cfg = model, cfg
        self.sampling = sampling  # only a default for direct calls without sampling; the stage passes its own
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._key = os.environ.get(cfg.api_key_env) or None
        self.template = None
        if chat_template is not None:
            try:
                self.template = Path(chat_template).read_text()
            except OSError as e:
                raise InputError(f"chat_template {chat_template}: {e.strerror}", option="chat_template") from None
        self._local = Path(model).expanduser().exists()  # a local folder: its tokenizer can count what usage cannot
        self._tok: Any = None
        self._served: dict[str, Any] | None = None  # what GET /models said about the model, asked once
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Any = None  # httpx.AsyncClient, made in the loop on first use

    def prepare(self, prompts: Sequence[tuple[str, str, int]], sampling: SamplingConfig | None = None) -> list:
        """The server renders the chat template; its context limit shows as a refusal (see `_request`)."""

        return [Request(pid, prompt, seed) for pid, prompt, seed in prompts]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "backend": "openai",
            "base_url": redact(self.cfg.base_url),
            **self.server_model(),
            "token_counts": TOKEN_COUNTS["local" if self._local else "served"],
        }
        if self.template:
            out.update(
                chat_template=self.template, chat_template_sha256=hashlib.sha256(self.template.encode()).hexdigest()
            )
        return out

    def server_model(self) -> dict[str, Any]:
        """What the server reports about the model (its GET /models entry, less what changes per call), asked
        once: for a served name it is all the snapshot can say about the weights behind it. Never an error (not
        every server has the endpoint): `server_model` is then null and `server_model_note` says why."""
        if self._served is None:
            self._served = self._ask_models()
        return self._served

    def _ask_models(self) -> dict[str, Any]:
        import httpx

        def note(text: str) -> dict[str, Any]:
            return {"server_model": None, "server_model_note": text}

        try:
            resp = httpx.get(
                self.cfg.base_url.rstrip("/") + "/models",
                headers={"Authorization": f"Bearer {self._key}"} if self._key else {},
                timeout=min(self.cfg.request_timeout, MODELS_TIMEOUT),
            )
        except httpx.HTTPError as e:
            return note(f"GET /models: {type(e).__name__}")
        if resp.status_code != 200:
            return note(f"GET /models: HTTP {resp.status_code}")
        try:
            listed = [m for m in resp.json()["data"] if isinstance(m, dict)]
        except (ValueError, KeyError, TypeError):
            return note("GET /models: not a model list")
        for entry in listed:
            if entry.get("id") == self.model:
                return {"server_model": {k: v for k, v in entry.items() if k not in VOLATILE}}
        ids = [str(m.get("id")) for m in listed]
        more = f", ... ({len(ids)} in all)" if len(ids) > 5 else ""
        return note(f"GET /models does not list {self.model!r} (it lists {', '.join(ids[:5]) or 'none'}{more})")

    def close(self) -> None:
        """Cancels whatever is still in flight, closes the client and stops the loop's thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        except Exception:
            pass  # a loop that cannot even cancel its tasks is left to the daemon thread's end
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    def stream(
        self, prompts: Sequence[tuple[str, str, int]], sampling: SamplingConfig | None = None
    ) -> Iterator[tuple[Request, list[Sample]]]:
        """(request, samples) for each (prompt_id, prompt, seed) as the server answers, in completion order; an
        empty list: the server refused the prompt as too long. A failure (after retries) is raised here, after
        the answers that came before it; closing the iterator early cancels what is in flight."""
        s = _sampling(sampling, self.sampling)
        for _, req, samples in self._answers(self.prepare(prompts, s), s):
            yield req, samples

    def generate(self, requests: Sequence, sampling: SamplingConfig | None = None) -> list[list]:
        """Samples per request, in the order given; an empty list marks a prompt the server rejected as too long."""
        out: list[list] = [[] for _ in requests]
        for i, _, samples in self._answers(list(requests), _sampling(sampling, self.sampling)):
            out[i] = samples
        return out

    # -- the caller's side: a queue of answers -----------------------------------------------------------------
    def _answers(self, requests: list, s: SamplingConfig) -> Iterator[tuple[int, Request, list[Sample]]]:
        if not requests:
            return
        loop = self._start()
        answers: queue.SimpleQueue = queue.SimpleQueue()
        window = asyncio.run_coroutine_threadsafe(self._window(list(enumerate(requests)), s, answers.put), loop)
        finished = False
        try:
            while True:
                got = [self._next(answers, window)]
                while True:  # everything answered meanwhile: counted in one tokenizer call, then handed on
                    try:
                        got.append(answers.get_nowait())
                    except queue.Empty:
                        break
                ready = [g for g in got if isinstance(g, tuple)]
                self._count_locally(ready, s)
                yield from ready
                for g in got:
                    if isinstance(g, BaseException):
                        raise g
                    if isinstance(g, _End):
                        finished = True
                        return
        finally:
            if not finished:  # a failure, Ctrl-C or the caller stopped early: nothing may stay in flight
                window.cancel()
                self.close()

    @staticmethod
    def _next(answers: queue.SimpleQueue, window: concurrent.futures.Future) -> Any:
        while True:
            try:
                return answers.get(timeout=1.0)
            except queue.Empty:
                if window.done() and answers.empty():  # the loop ended without a word: should not happen
                    exc = None if window.cancelled() else window.exception()
                    raise (exc or IterdpoError("the openai backend's request loop stopped unexpectedly")) from None

    def _count_locally(self, ready: list, s: SamplingConfig) -> None:
        """Exact counts the server's `usage` cannot give (a total over n > 1 choices, or no usage at all), from
        the local model folder's tokenizer: one batched call per group of answers, in the caller's thread."""
        missing = [smp for _, _, samples in ready for smp in samples if smp.completion_tokens is None]
        if not missing or not self._local:
            return
        tok = self._tokenizer()
        if tok is None:
            return
        ids = tok([smp.text for smp in missing], add_special_tokens=False)["input_ids"]
        for smp, one in zip(missing, ids):
            smp.completion_tokens = len(one) + (1 if smp.finish_reason == "stop" else 0)  # the end-of-sequence token

    def _tokenizer(self) -> Any:
        if self._tok is None:
            from transformers import AutoTokenizer

            try:
                self._tok = AutoTokenizer.from_pretrained(self.model)
            except Exception:
                self._tok = False  # not a tokenizer folder: counts stay unknown (null), never guessed
        return self._tok or None

    # -- the loop's side ---------------------------------------------------------------------------------------
    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=_run_loop, args=(loop,), name="iterdpo-openai", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    async def _window(self, todo: list, s: SamplingConfig, put) -> None:
        """`concurrency` workers, each sending its next request as soon as its last one is answered: exactly
        `concurrency` in flight (no batches, no semaphore), until the prompts run out."""
        import httpx

        if self._client is None:
            c = self.cfg.concurrency
            # limits apply to a proxy from the environment; the direct route has its own transport (see there)
            self._client = httpx.AsyncClient(
                headers={"Authorization": f"Bearer {self._key}"} if self._key else {},
                timeout=self.cfg.request_timeout,
                limits=httpx.Limits(max_connections=c, max_keepalive_connections=c),
                transport=_slot_transport(c),
            )
        client = self._client
        pending = collections.deque(todo)

        async def worker(slot: int) -> None:
            _SLOT.set(slot)  # this task's own connection
            while pending:
                i, req = pending.popleft()
                put((i, req, await self._request(client, req, s)))

        workers = [asyncio.ensure_future(worker(i)) for i in range(min(self.cfg.concurrency, len(todo)))]
        try:
            await asyncio.gather(*workers)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a ServerError after retries, or a refusal: the rest is cancelled, then it is told
            put(e)
        else:
            put(_End())
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _shutdown(self) -> None:
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _body(self, req, s: SamplingConfig) -> dict[str, Any]:
        body = {
            "model": self.model,
            "messages": as_messages(req.prompt),
            "n": s.num_responses,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "seed": req.seed,
        }
        if self.template:
            body["chat_template"] = self.template  # vLLM's extension; other servers use their own template
        return body

    async def _request(self, client, req, sampling: SamplingConfig) -> list:
        import httpx

        delay, timeout = self.cfg.backoff, self.cfg.request_timeout
        attempts = self.cfg.max_retries + 1
        last = ""
        for attempt in range(attempts):
            try:
                # the whole request: httpx's timeout bounds each read, so a server that trickles bytes, or
                # answers the connect and then nothing, would hold a slot for as long as it likes
                resp = await _within(timeout, client.post(self.url, json=self._body(req, sampling)))
            except (asyncio.TimeoutError, httpx.TimeoutException):
                last = TIMED_OUT
            except httpx.TransportError as e:
                last = type(e).__name__
            else:
                if resp.status_code == 200:
                    try:
                        data = resp.json()
                        samples = [
                            Sample(c["message"]["content"] or "", c.get("finish_reason") or "stop", None)
                            for c in sorted(data["choices"], key=lambda c: c.get("index", 0))
                        ]
                    except (ValueError, KeyError, TypeError, AttributeError):
                        raise ServerError(
                            f"server {redact(self.cfg.base_url)} answered HTTP 200 without a chat "
                            f"completion (is --base-url an OpenAI-compatible /v1 endpoint?)"
                        ) from None
                    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
                    req.prompt_tokens = _count(usage.get("prompt_tokens"))
                    # usage counts all n choices together: a row gets it only when it is the only choice
                    req.completion_tokens = _count(usage.get("completion_tokens"))
                    if len(samples) == 1:
                        samples[0].completion_tokens = req.completion_tokens
                    return samples
                # redact before cutting: a key cut in half at the limit would still leak its first characters
                text = redact(resp.text, self._key)[:300].replace("\n", " ")
                if resp.status_code in (401, 403):
                    raise ServerError(
                        f"server {redact(self.cfg.base_url)} refused the request: HTTP {resp.status_code} "
                        f"(check ${self.cfg.api_key_env})"
                    )
                if resp.status_code == 400 and any(h in text.lower() for h in TOO_LONG_HINTS):
                    return []
                if resp.status_code not in RETRY_STATUS:
                    raise ServerError(f"server {redact(self.cfg.base_url)} answered HTTP {resp.status_code}: {text}")
                last = f"HTTP {resp.status_code}"
            if attempt < self.cfg.max_retries:
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay *= 2
        if last == TIMED_OUT:
            raise ServerError(
                f"the server at {redact(self.cfg.base_url)} did not answer within {timeout:g} s "
                f"(request_timeout) after {attempts} attempt{'s' if attempts > 1 else ''}; finished "
                f"prompts are kept, rerun to resume",
                option="request_timeout",
            )
        raise ServerError(
            f"server {redact(self.cfg.base_url)} failed {attempts} times ({last}); "
            f"finished prompts are kept, rerun to continue"
        )


# how the rows' token counts were made, recorded with the snapshot (a null count is never a guess)
TOKEN_COUNTS = {
    "local": "prompt_tokens and completion_tokens from the server's usage; with num_responses > 1, usage is one "
    "total for a prompt's responses, so each row's completion_tokens is counted with the model folder's "
    "tokenizer (null if it has none)",
    "served": "prompt_tokens and completion_tokens from the server's usage; with num_responses > 1, usage is one "
    "total for a prompt's responses and a served name has no local tokenizer, so each row's "
    "completion_tokens is null (the stage's token total still counts usage)",
}


def _count(value: Any) -> int | None:
    """A token count from `usage`, or None when the server gave none (never a guess)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


async def _within(seconds: float, awaitable) -> Any:
    """`awaitable`, or asyncio.TimeoutError after `seconds`. asyncio.timeout where there is one (3.11+): 3.11's
    wait_for can swallow a cancellation that lands as the request ends, and a worker told to stop would go on."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


_SLOT: contextvars.ContextVar[int] = contextvars.ContextVar("iterdpo_openai_slot", default=0)


def _slot_transport(slots: int) -> Any:
    """One keep-alive connection per worker, each in a pool of its own. httpcore's shared pool rescans all its
    connections (and, for each idle one, all of them again) whenever a request starts or ends, polling idle
    sockets as it goes: at 128 in flight that cost ~35 s of CPU for 2,100 requests. One pool per worker: O(1)."""
    import httpx

    class SlotTransport(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.ssl = httpx.create_ssl_context()  # one for all slots: each costs milliseconds to make
            self.pools: dict[int, httpx.AsyncHTTPTransport] = {}

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            slot = _SLOT.get()
            pool = self.pools.get(slot)
            if pool is None:
                pool = self.pools[slot] = httpx.AsyncHTTPTransport(
                    verify=self.ssl, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)
                )
            return await pool.handle_async_request(request)

        async def aclose(self) -> None:
            for pool in self.pools.values():
                await pool.aclose()

    return SlotTransport()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The background thread: the loop runs until `close()` stops it, then is closed with nothing pending."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
