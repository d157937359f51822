"""The `openai` generation backend: any OpenAI-compatible chat-completions server (vLLM serve, TGI, Together).

Bounded concurrency, retries with exponential backoff on 429, 5xx, timeouts and connection errors; the API key is
read from an environment variable and appears in no log line, error, catalog row or file.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import random
import re
from pathlib import Path
from typing import Any, Sequence

from builders.config import OpenAIConfig, SamplingConfig
from builders.backends.base import Request, Sample, call_sampling as _sampling
from builders.errors import InputError, IterdpoError

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
TOO_LONG_HINTS = ("context length", "maximum context", "too long", "max_model_len", "context_length")


class ServerError(IterdpoError):
    """The server could not be reached, or refused, after the allowed retries."""


def validate_openai(cfg: OpenAIConfig) -> None:
    """Every option of the backend, before any work (a concurrency of 0 would wait forever)."""
    if not re.match(r"https?://[^/\s]+", cfg.base_url or ""):
        raise InputError(f"base_url must be an http:// or https:// URL, not {redact(cfg.base_url)!r}", option="base_url")
    if not cfg.api_key_env or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cfg.api_key_env):
        raise InputError(f"api_key_env must name an environment variable (e.g. OPENAI_API_KEY), "
                         f"not {cfg.api_key_env!r}", option="api_key_env")
    if not isinstance(cfg.concurrency, int) or cfg.concurrency < 1:
        raise InputError(f"concurrency must be at least 1, not {cfg.concurrency}", option="concurrency")
    if not isinstance(cfg.max_retries, int) or cfg.max_retries < 0:
        raise InputError(f"max_retries must be 0 or more, not {cfg.max_retries}", option="max_retries")
    if not isinstance(cfg.timeout, (int, float)) or not math.isfinite(cfg.timeout) or cfg.timeout <= 0:
        raise InputError(f"the request timeout must be a positive number of seconds, not {cfg.timeout}")
    if not isinstance(cfg.backoff, (int, float)) or not math.isfinite(cfg.backoff) or cfg.backoff < 0:
        raise InputError(f"the retry backoff must be 0 or more seconds, not {cfg.backoff}")


_SECRET_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[^\s\"',;]+"),  # an echoed Authorization header
    re.compile(r"\bsk-[A-Za-z0-9_\-]{4,}"),  # OpenAI-style keys
    re.compile(r"(?i)((?:api[_-]?key|token|authorization)[\"']?\s*[:=]\s*[\"']?)(?!bearer\s)[^\s\"',;}]+"),
    re.compile(r"(//)[^/@\s]+(?=@)"),  # credentials in a URL
)


def redact(text: str | None, *secrets: str | None) -> str:
    """`text` without the given secrets or anything shaped like a key: error bodies of some servers echo the
    request's Authorization header, and they end up on a user's terminal and in CI logs."""
    text = text or ""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "***", text)
    return text


class OpenAIGenerator:
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
        self.tokenizer = None
        if Path(model).exists():  # a local model folder: count completion tokens exactly
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(model)
            except Exception:
                self.tokenizer = None

    def prepare(self, prompts: Sequence[tuple[str, str, int]], sampling: SamplingConfig | None = None) -> list:
        """The server renders the chat template; its context limit shows as a refusal (see `_request`)."""

        return [Request(pid, prompt, seed) for pid, prompt, seed in prompts]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": "openai", "base_url": redact(self.cfg.base_url)}
        if self.template:
            out.update(chat_template=self.template,
                       chat_template_sha256=hashlib.sha256(self.template.encode()).hexdigest())
        return out

    def close(self) -> None:
        pass

    def generate(self, requests: Sequence, sampling: SamplingConfig | None = None) -> list[list]:
        """Samples per request; an empty list marks a prompt the server rejected as too long."""

        return asyncio.run(self._generate(requests, _sampling(sampling, self.sampling)))

    async def _generate(self, requests: Sequence, sampling: SamplingConfig) -> list[list]:
        import httpx

        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        limits = httpx.Limits(max_connections=self.cfg.concurrency)
        gate = asyncio.Semaphore(self.cfg.concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=self.cfg.timeout, limits=limits) as client:
            async def one(req):
                async with gate:
                    return await self._request(client, req, sampling)

            return list(await asyncio.gather(*(one(r) for r in requests)))

    def _body(self, req, s: SamplingConfig) -> dict[str, Any]:
        body = {"model": self.model, "messages": [{"role": "user", "content": req.prompt}], "n": s.num_responses,
                "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "seed": req.seed}
        if self.template:
            body["chat_template"] = self.template  # vLLM's extension; other servers use their own template
        return body

    async def _request(self, client, req, sampling: SamplingConfig) -> list:
        import httpx


        delay = self.cfg.backoff
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            try:
                resp = await client.post(self.url, json=self._body(req, sampling))
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = type(e).__name__
            else:
                if resp.status_code == 200:
                    try:
                        data = resp.json()
                        req.prompt_tokens = (data.get("usage") or {}).get("prompt_tokens")
                        return [Sample(c["message"]["content"] or "", c.get("finish_reason") or "stop",
                                       self._count(c["message"]["content"] or "", c.get("finish_reason")))
                                for c in sorted(data["choices"], key=lambda c: c.get("index", 0))]
                    except (ValueError, KeyError, TypeError, AttributeError):
                        raise ServerError(f"server {redact(self.cfg.base_url)} answered HTTP 200 without a chat "
                                          f"completion (is --base-url an OpenAI-compatible /v1 endpoint?)") from None
                # redact before cutting: a key cut in half at the limit would still leak its first characters
                text = redact(resp.text, self._key)[:300].replace("\n", " ")
                if resp.status_code in (401, 403):
                    raise ServerError(f"server {redact(self.cfg.base_url)} refused the request: HTTP {resp.status_code} "
                                      f"(check ${self.cfg.api_key_env})")
                if resp.status_code == 400 and any(h in text.lower() for h in TOO_LONG_HINTS):
                    return []
                if resp.status_code not in RETRY_STATUS:
                    raise ServerError(f"server {redact(self.cfg.base_url)} answered HTTP {resp.status_code}: {text}")
                last = f"HTTP {resp.status_code}"
            if attempt < self.cfg.max_retries:
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay *= 2
        raise ServerError(f"server {redact(self.cfg.base_url)} failed {self.cfg.max_retries + 1} times ({last}); "
                          f"finished prompts are kept, rerun to continue")

    def _count(self, text: str, finish_reason: str | None) -> int | None:
        if self.tokenizer is None:
            return None
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + (1 if finish_reason == "stop" else 0)
