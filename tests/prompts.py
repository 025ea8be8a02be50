"""Chat prompts shared by the model, FP8 and end-to-end tests (references are computed on them)."""

from bench.chat_prompts import CHAT_PROMPTS as ALL_CHAT_PROMPTS

CHAT_PROMPTS = ALL_CHAT_PROMPTS[:8]


def chat_token_ids(hf_tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt as one user turn, chat-templated by HF's tokenizer (the reference side)."""
    return [
        list(hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
            return_dict=True)["input_ids"])  # fmt: skip
        for p in prompts
    ]
