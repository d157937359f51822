"""The `llm-blender` ranker: llm-blender's own Blender.rank, the reference PairRM is tested against."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import Any

from builders.backends.base import device_for
from builders.backends.pairrm import backbone_ref, pairrm_config
from builders.conversation import render_lines
from builders.models import resolve_folder


def apply_llm_blender_fixes() -> None:
    """llm-blender 0.0.2 targets transformers 4. Two shims, applied only when this backend loads:
    1. it imports transformers.utils.hub.TRANSFORMERS_CACHE (removed in transformers 5) and uses it as cache dir;
    2. its collator calls tokenizer.batch_encode_plus (removed in transformers 5), which is tokenizer(...) there."""
    import transformers.utils.hub as hub
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    if not hasattr(hub, "TRANSFORMERS_CACHE"):
        from huggingface_hub.constants import HF_HUB_CACHE

        hub.TRANSFORMERS_CACHE = HF_HUB_CACHE
    if not hasattr(PreTrainedTokenizerBase, "batch_encode_plus"):

        def batch_encode_plus(self, batch_text_or_text_pairs, **kwargs):
            return self(batch_text_or_text_pairs, **kwargs)

        PreTrainedTokenizerBase.batch_encode_plus = batch_encode_plus


class LlmBlender:
    """The reference: llm-blender's own Blender.rank, one prompt per batch (its truncation is batch-dependent)."""

    def __init__(self, ref: str, device: str | None = None, batch_size: int = 1):
        apply_llm_blender_fixes()
        import llm_blender

        self.folder = resolve_folder(ref, "ranker model")
        cfg = pairrm_config(self.folder)
        self.batch_size = batch_size
        self.blender = llm_blender.Blender()
        # llm-blender prints its progress to stdout, which belongs to `--json`
        with contextlib.redirect_stdout(sys.stderr):
            self.blender.loadranker(
                str(self.folder), device=device_for(device), model_name=backbone_ref(self.folder, cfg["model_name"])
            )

    def describe(self) -> dict[str, Any]:
        return {"ranker": "llm-blender", "batch_size": self.batch_size, "llm_blender_version": "0.0.2"}

    def close(self) -> None:
        pass  # the weights go with the object; nothing else to release

    def score(self, prompts: Sequence[Any], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        # a conversation as PairRM's rendered history (whole: llm-blender's own truncation applies to it)
        prompts = [p if isinstance(p, str) else "\n".join(render_lines(p)) for p in prompts]
        out = []
        for start in range(0, len(prompts), self.batch_size):
            got = self.blender.rank(
                list(prompts[start : start + self.batch_size]),
                [list(c) for c in candidates[start : start + self.batch_size]],
                return_scores=True,
                batch_size=self.batch_size,
                disable_tqdm=True,
            )
            out.extend([float(x) for x in row] for row in got)
        return out
