"""End-to-end fixtures: references computed in this process (the in-process engine and HF
transformers, both greedy float32 on the built-in model). HTTP helpers live in e2e_client.py.

Servers themselves are started per module (``start_tandem`` in server_process.py) so that only
one runs at a time on this 2-core machine.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from e2e_client import CHAT_PROMPTS, MODEL, TEXT_PROMPTS, greedy

from engine.engine_config import EngineConfig
from engine.llm import LLM
from engine.loader.builtin import builtin_gguf_path


@pytest.fixture(scope="session")
def llm() -> LLM:
    """The in-process engine: the reference the served outputs must equal."""
    return LLM(EngineConfig(num_blocks=1024, max_model_len=2048))


@pytest.fixture(scope="session")
def chat_ids(llm: LLM) -> list[list[int]]:
    return [llm.encode_chat(p) for p in CHAT_PROMPTS]


@pytest.fixture(scope="session")
def mixed_prompts(llm: LLM, chat_ids: list[list[int]]) -> list[list[int]]:
    """32 prompts of 5 to ~200 tokens: chat prompts, plain text, and long repeated passages."""
    texts = [llm.tokenizer.encode(t) for t in TEXT_PROMPTS]
    story = "The river ran past the old mill, and the miller counted the sacks of grain. "
    long = [llm.tokenizer.encode(story * k + "Then") for k in (2, 5, 8, 11)]
    prompts = chat_ids + texts + long
    return [prompts[i % len(prompts)] for i in range(32)]


@pytest.fixture(scope="session")
def mixed_max_tokens(mixed_prompts: list[list[int]]) -> list[int]:
    return [4 + (i * 5) % 17 for i in range(len(mixed_prompts))]  # 4..20


@pytest.fixture(scope="session")
def mixed_expected(llm: LLM, mixed_prompts, mixed_max_tokens) -> list:
    """The in-process engine's greedy outputs for the mixed prompts (one batch, computed once
    for every topology)."""
    return llm.generate(mixed_prompts, [greedy(n) for n in mixed_max_tokens])


@pytest.fixture(scope="session")
def hf_smollm2() -> transformers.PreTrainedModel:
    """HF transformers' Llama dequantized from the same GGUF (float32)."""
    path = builtin_gguf_path(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()
