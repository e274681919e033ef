"""A model as the server holds it (`Served`: its name, the api.Model, its engine, its card)
and what a completion body must be to reach it (`check_completion`)."""

from __future__ import annotations

import math
import time
from typing import Any

from charrnn.serve.bridge import Bridge
from charrnn.serve.engine import Engine
from charrnn.serve.metrics import Metrics
from charrnn.serve.schemas import APIError, CompletionBody, Limits
from charrnn.store.rundir import records
from charrnn.version import __version__


class Served:
    """One model as served: its name, the api.Model, its engine."""

    def __init__(self, name: str, model, limits: Limits, bridge: Bridge, metrics: Metrics, threads: int | None):
        self.name, self.model = name, model
        self.engine = Engine(model, limits.max_streams, limits.max_queued, bridge.notify,
                             metrics.meter(name, lambda: self.engine), threads)
        self.created = int(model.path.stat().st_mtime) if model.path.exists() else int(time.time())

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "charrnn"}

    def details(self) -> dict:
        model, config = self.model, self.model.model_config
        parameters = sum(p.numel() for p in model.network.parameters())
        training: dict[str, Any] = {"step": model.step, "corpus": model.corpus.get("name"),
                                    "corpus_chars": model.corpus.get("chars")}
        if model.run_dir is not None:
            found = [r for _, r in records(model.run_dir / "metrics.jsonl", strict=False)]
            losses = [r["val_loss"] for r in found if isinstance(r.get("val_loss"), (int, float))]
            if losses:
                training["best_val_loss"] = min(losses)
                training["best_val_bpc"] = min(losses) / math.log(2)
            if found:
                training["last_record"] = found[-1]
        return {**self.card(), "charrnn": {
            "config": {**config.__dict__}, "parameters": parameters, "vocabulary": model.vocab.chars,
            "vocabulary_size": len(model.vocab), "start_mix": model.prior is not None, "training": training,
            "file": str(model.path), "version": __version__}}


def check_completion(body: CompletionBody, target: Served, limits: Limits) -> list[str]:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise APIError(400, "prompt: the list is empty; give at least one prompt", "prompt")
    if len(prompts) > limits.max_prompts:
        raise APIError(400, f"prompt: at most {limits.max_prompts} prompts in one request, not {len(prompts)}", "prompt")
    for k, prompt in enumerate(prompts):
        name = f"prompt[{k}]" if isinstance(body.prompt, list) else "prompt"
        if not prompt:
            raise APIError(400, f"{name} is empty; give at least one character (a newline starts a fresh text)", "prompt")
        if len(prompt) > limits.max_prompt:
            raise APIError(400, f"{name} has {len(prompt):,} characters; the limit is {limits.max_prompt:,} (--max-prompt)",
                           "prompt")
    if body.max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens must be 0 to {limits.max_tokens} characters (--max-tokens), not {body.max_tokens}",
                       "max_tokens")
    if body.echo and body.stream and body.logprobs is not None:
        raise APIError(400, "echo with logprobs is not available when streaming", "echo")
    return prompts
