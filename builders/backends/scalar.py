"""The `scalar` ranker: any AutoModelForSequenceClassification reward model, one score per response."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from builders.backends.base import device_for, unflatten
from builders.conversation import as_messages, render_lines
from builders.errors import InputError, one_line
from builders.models import resolve_folder


class ScalarRM:
    """AutoModelForSequenceClassification over (prompt, response), rendered with the chat template when the
    tokenizer has one (reward models trained on conversations: a conversation prompt is the whole history), else
    as a text pair (a conversation as its rendered lines)."""

    def __init__(self, ref: str, device: str | None = None, batch_size: int = 16):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = resolve_folder(ref, "ranker model")
        self.device, self.batch_size = device_for(device), batch_size
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
        except Exception as e:
            raise InputError(f"scalar reward model {ref!r} cannot be loaded ({one_line(e)})") from None
        # transformers fills weights the checkpoint lacks (e.g. the score head of a plain backbone, or of a PairRM
        # folder) with random values and only warns: scores from them are noise, so refuse
        missing = sorted(info.get("missing_keys") or []) + sorted(
            k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or []
        )
        if missing:
            heads = [k for k in missing if k.split(".")[0] in ("classifier", "score", "pooler", "v_head")]
            shown = ", ".join((heads or missing)[:3]) + (", ..." if len(missing) > 3 else "")
            raise InputError(
                f"scalar reward model {ref!r}: {len(missing)} weights are missing from its checkpoint "
                f"and would be random ({shown}); it is not a trained sequence-classification reward model"
            )
        self.model = model.to(self.device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.torch = torch

    def describe(self) -> dict[str, Any]:
        return {"ranker": "scalar", "chat_template": bool(self.tokenizer.chat_template)}

    def close(self) -> None:
        pass  # the weights go with the object; nothing else to release

    def _inputs(self, prompts: list[Any], responses: list[str]):
        tok = self.tokenizer
        if tok.chat_template:
            texts = [
                tok.apply_chat_template([*as_messages(p), {"role": "assistant", "content": r}], tokenize=False)
                for p, r in zip(prompts, responses)
            ]
            return tok(texts, padding=True, truncation=True, return_tensors="pt", add_special_tokens=False)
        flat = [p if isinstance(p, str) else "\n".join(render_lines(p)) for p in prompts]
        return tok(flat, responses, padding=True, truncation=True, return_tensors="pt")

    def score(self, prompts: Sequence[Any], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        flat = [(p, c) for p, cands in zip(prompts, candidates) for c in cands]
        values: list[float] = []
        with self.torch.no_grad():
            for start in range(0, len(flat), self.batch_size):
                chunk = flat[start : start + self.batch_size]
                enc = self._inputs([p for p, _ in chunk], [c for _, c in chunk]).to(self.device)
                values.extend(self.model(**enc).logits[:, 0].float().cpu().tolist())
        return unflatten(values, candidates)
