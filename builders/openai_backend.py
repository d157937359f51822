"""The `openai` generation backend: any OpenAI-compatible chat-completions server (vLLM serve, TGI, Together).

Bounded concurrency, retries with exponential backoff on 429, 5xx, timeouts and connection errors; the API key is
read from an environment variable and appears in no log line, error, catalog row or file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from pathlib import Path
from typing import Any, Sequence

from builders.config import OpenAIConfig, SamplingConfig
from builders.errors import InputError, IterdpoError

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
TOO_LONG_HINTS = ("context length", "maximum context", "too long", "max_model_len", "context_length")


class ServerError(IterdpoError):
    """The server could not be reached, or refused, after the allowed retries."""


class OpenAIGenerator:
    def __init__(self, model: str, sampling: SamplingConfig, chat_template: Path | None, cfg: OpenAIConfig):
        from builders.generate import Request, Sample  # noqa: F401  (types used below)

        self.model, self.sampling, self.cfg = model, sampling, cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._key = os.environ.get(cfg.api_key_env) or None
        self.template = None
        if chat_template is not None:
            try:
                self.template = Path(chat_template).read_text()
            except OSError as e:
                raise InputError(f"--chat-template {chat_template}: {e.strerror}") from None
        self.tokenizer = None
        if Path(model).exists():  # a local model folder: count completion tokens exactly
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(model)
            except Exception:
                self.tokenizer = None

    def prepare(self, prompts: Sequence[tuple[str, str, int]]) -> list:
        """The server renders the chat template; its context limit shows as a refusal (see `_request`)."""
        from builders.generate import Request

        return [Request(pid, prompt, seed) for pid, prompt, seed in prompts]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": "openai", "base_url": self.cfg.base_url}
        if self.template:
            out.update(chat_template=self.template,
                       chat_template_sha256=hashlib.sha256(self.template.encode()).hexdigest())
        return out

    def close(self) -> None:
        pass

    def generate(self, requests: Sequence) -> list[list]:
        """Samples per request; an empty list marks a prompt the server rejected as too long."""
        return asyncio.run(self._generate(requests))

    async def _generate(self, requests: Sequence) -> list[list]:
        import httpx

        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        limits = httpx.Limits(max_connections=self.cfg.concurrency)
        gate = asyncio.Semaphore(self.cfg.concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=self.cfg.timeout, limits=limits) as client:
            async def one(req):
                async with gate:
                    return await self._request(client, req)

            return list(await asyncio.gather(*(one(r) for r in requests)))

    def _body(self, req) -> dict[str, Any]:
        s = self.sampling
        body = {"model": self.model, "messages": [{"role": "user", "content": req.prompt}], "n": s.num_responses,
                "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "seed": req.seed}
        if self.template:
            body["chat_template"] = self.template  # vLLM's extension; other servers use their own template
        return body

    async def _request(self, client, req) -> list:
        import httpx

        from builders.generate import Sample

        delay = self.cfg.backoff
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            try:
                resp = await client.post(self.url, json=self._body(req))
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = type(e).__name__
            else:
                if resp.status_code == 200:
                    data = resp.json()
                    req.prompt_tokens = (data.get("usage") or {}).get("prompt_tokens")
                    return [Sample(c["message"]["content"] or "", c.get("finish_reason") or "stop",
                                   self._count(c["message"]["content"] or "", c.get("finish_reason")))
                            for c in sorted(data["choices"], key=lambda c: c.get("index", 0))]
                text = resp.text[:300].replace("\n", " ")
                if resp.status_code in (401, 403):
                    raise ServerError(f"server {self.cfg.base_url} refused the request: HTTP {resp.status_code} "
                                      f"(check ${self.cfg.api_key_env})")
                if resp.status_code == 400 and any(h in text.lower() for h in TOO_LONG_HINTS):
                    return []
                if resp.status_code not in RETRY_STATUS:
                    raise ServerError(f"server {self.cfg.base_url} answered HTTP {resp.status_code}: {text}")
                last = f"HTTP {resp.status_code}"
            if attempt < self.cfg.max_retries:
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay *= 2
        raise ServerError(f"server {self.cfg.base_url} failed {self.cfg.max_retries + 1} times ({last}); "
                          f"finished prompts are kept, rerun to continue")

    def _count(self, text: str, finish_reason: str | None) -> int | None:
        if self.tokenizer is None:
            return None
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + (1 if finish_reason == "stop" else 0)
