"""Fine-tuning's vocabulary surgery, as pure functions: a base model's vocabulary extended
by the new text's characters, and its weights laid out for the extended vocabulary."""

from __future__ import annotations

import torch

from charrnn.data.text import Vocab


def extended_vocab(base: Vocab, text: Vocab) -> tuple[Vocab, str]:
    """The base vocabulary with the characters of text it lacks, sorted; and those characters."""
    added = "".join(c for c in text.chars if c not in base)
    return Vocab("".join(sorted(base.chars + added))), added


def extended_weights(base: dict[str, torch.Tensor], base_vocab: Vocab, vocab: Vocab,
                     fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every weight from the base model, on the extended vocabulary. The embedding and
    output rows of characters the base never saw are new: embedding rows from `fresh` (a
    new model's state_dict, as it draws them), output rows at zero weight and the base's
    lowest bias, so a new character starts as the rarest one and is learned."""
    kept = torch.tensor([vocab.chars.index(c) for c in base_vocab.chars])  # base id -> new id
    weights = dict(fresh)
    for key, value in base.items():
        if key == "embedding.weight" or key.startswith("head."):
            if key == "embedding.weight":
                row = fresh[key].clone()
            elif key == "head.weight":
                row = torch.zeros_like(fresh[key])
            else:
                row = torch.full_like(fresh[key], float(value.min()))
            row[kept] = value
            value = row
        weights[key] = value
    return weights
