"""The `transformers` generation backend (CPU fallback, tests, the quickstart), and the chat-template handling
shared by the local backends (transformers, vllm)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from builders.backends.base import Request, Sample
from builders.backends.base import call_sampling as _sampling
from builders.config import SamplingConfig
from builders.conversation import as_messages
from builders.errors import InputError, one_line


class Templated:
    """Shared by the local backends: the tokenizer, its chat template, and the context-length rule."""

    def __init__(self, model: str, sampling: SamplingConfig | None, chat_template: Path | None):
        from transformers import AutoTokenizer

        self.model = model
        self.sampling = sampling  # only a default for direct calls without sampling; the stage passes its own
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except Exception as e:
            raise InputError(f"model {model!r}: cannot load its tokenizer ({one_line(e)})") from None
        if chat_template is not None:
            try:
                self.tokenizer.chat_template = Path(chat_template).read_text()
            except OSError as e:
                raise InputError(f"chat_template {chat_template}: {e.strerror}", option="chat_template") from None
        if not self.tokenizer.chat_template:
            raise InputError(
                f"model {model!r}: its tokenizer has no chat template; give a chat_template file",
                option="chat_template",
            )
        self.context_length = 0  # set by the backend

    def prepare(
        self, prompts: Sequence[tuple[str, str, int]], sampling: SamplingConfig | None = None
    ) -> list[Request | str]:
        """(prompt_id, prompt, seed) -> a rendered, tokenized Request, or "too_long" (no room for max_tokens). A
        prompt is a string or a conversation (its system message, if any, must show in the rendered text)."""
        max_tokens = _sampling(sampling, self.sampling).max_tokens
        texts = [render(self.tokenizer, p, f"model {self.model!r}", pid) for pid, p, _ in prompts]
        # one batched call (the fast tokenizer parallelises it); the template writes BOS itself
        all_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        out: list[Request | str] = []
        for (pid, prompt, seed), text, ids in zip(prompts, texts, all_ids):
            too_long = len(ids) + max_tokens > self.context_length
            out.append("too_long" if too_long else Request(pid, prompt, seed, text, ids, len(ids)))
        return out

    def template_info(self) -> dict[str, Any]:
        template = self.tokenizer.chat_template
        return {"chat_template": template, "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()}


def render(tokenizer: Any, prompt: str | list[dict[str, str]], where: str, prompt_id: str | None = None) -> str:
    """`prompt` rendered by the tokenizer's chat template for generation. A template that fails on a conversation
    (e.g. one that refuses a system role) or drops its system message is an InputError: the model would silently
    be asked something else than the prompt."""
    messages = as_messages(prompt)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2's TemplateError, or raise_exception() in the template
        about = f" for prompt {prompt_id}" if prompt_id else ""
        raise InputError(
            f"{where}: its chat template cannot render the conversation{about} ({one_line(e)}); "
            f"give a --chat-template that does",
            option="chat_template",
        ) from None
    if messages[0]["role"] == "system" and messages[0]["content"] not in text:
        raise InputError(
            f"{where}: its chat template drops the system message; give a --chat-template that renders a "
            f"system role (or no --system-prompt)",
            option="chat_template",
        )
    return text


# a system message and two turns: what a template must render for --system-prompt and conversations
PROBE = [
    {"role": "system", "content": "iterdpo-probe-system"},
    {"role": "user", "content": "iterdpo-probe-user-1"},
    {"role": "assistant", "content": "iterdpo-probe-assistant"},
    {"role": "user", "content": "iterdpo-probe-user-2"},
]


def check_template(tokenizer: Any, where: str) -> None:
    """Before any work: the chat template renders a system message and a multi-turn conversation, every message."""
    text = render(tokenizer, PROBE, where)
    lost = [m["role"] for m in PROBE if m["content"] not in text]
    if lost:
        raise InputError(
            f"{where}: its chat template drops the {', '.join(dict.fromkeys(lost))} message(s) of a conversation; "
            f"give a --chat-template that renders them",
            option="chat_template",
        )


class TransformersGenerator(Templated):
    """CPU fallback: one generate() call per prompt (its n samples together), seeded per prompt."""

    def __init__(self, model: str, sampling: SamplingConfig | None = None, chat_template: Path | None = None):
        super().__init__(model, sampling, chat_template)
        import torch
        from transformers import AutoModelForCausalLM

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        try:
            self.lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(self.device).eval()
        except Exception as e:
            raise InputError(f"model {model!r}: cannot load it ({one_line(e)})") from None
        limits = [getattr(self.lm.config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        self.context_length = min(x for x in limits if isinstance(x, int) and 0 < x < 10**8)

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig | None = None) -> list[list[Sample]]:
        import torch

        s = _sampling(sampling, self.sampling)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        out = []
        for req in requests:
            torch.manual_seed(req.seed)
            ids = torch.tensor([req.token_ids], device=self.device)
            with torch.no_grad():
                seqs = self.lm.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=s.temperature > 0,
                    temperature=s.temperature if s.temperature > 0 else None,
                    top_p=s.top_p if s.temperature > 0 else None,
                    max_new_tokens=s.max_tokens,
                    num_return_sequences=s.num_responses,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
            samples = []
            for seq in seqs[:, ids.shape[1] :].tolist():
                stop = seq.index(eos) if eos in seq else None
                kept = seq[:stop] if stop is not None else seq
                text = self.tokenizer.decode(kept, skip_special_tokens=True)
                samples.append(
                    Sample(text, "stop" if stop is not None else "length", len(kept) + (1 if stop is not None else 0))
                )
            out.append(samples)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "transformers",
            "device": self.device,
            "context_length": self.context_length,
            **self.template_info(),
        }

    def close(self) -> None:
        self.lm = None
