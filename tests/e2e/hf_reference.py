"""Greedy generation with HF transformers: the reference served outputs are checked against."""

from __future__ import annotations

import torch
import transformers


def hf_greedy(model: transformers.PreTrainedModel, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, top_p=None, top_k=None
        )
    return out[0, len(prompt) :].tolist()
