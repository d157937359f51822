"""Render the model card (README.md of a Hub model repo) that ties a trained model to the data it learned from."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

TEMPLATES = Path(__file__).resolve().parent / "templates"
TAGS = ["dpo", "iterative-dpo", "trl", "iterdpo"]


def metadata(base_hub_id: str | None, license: str, datasets: list[str]) -> dict[str, Any]:
    """The card's YAML header, as the Hub reads it (base_model only when the base's hub id is known)."""
    meta: dict[str, Any] = {
        "license": license,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": TAGS,
    }
    if base_hub_id:
        meta["base_model"] = base_hub_id
    if datasets:
        meta["datasets"] = datasets
    return meta


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}g}"
    return "-" if value is None else str(value)


def render(
    *,
    repo_id: str,
    iteration: int,
    base: dict[str, Any],
    license: str,
    datasets: list[str],
    steps: list[dict[str, Any]],
    hyperparameters: dict[str, Any],
    rewards: list[dict[str, Any]],
    drift: list[dict[str, Any]],
    prompt_format: str,
    snapshot: str,
    version: str,
) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        keep_trailing_newline=True,
        autoescape=False,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = _number
    return env.get_template("model_card.md.j2").render(
        metadata=yaml.safe_dump(metadata(base["hub_id"], license, datasets), sort_keys=False, allow_unicode=True),
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        iteration=iteration,
        base=base,
        steps=steps,
        hyperparameters=yaml.safe_dump(hyperparameters, sort_keys=True).strip() if hyperparameters else "",
        rewards=rewards,
        drift=drift,
        prompt_format=prompt_format,
        snapshot=snapshot,
        version=version,
        last=steps[-1]["metrics"],
    )
