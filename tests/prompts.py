"""Chat prompts shared by the model, FP8 and end-to-end tests (references are computed on them)."""

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity in one sentence.",
    "List three prime numbers.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a tip for learning to program.",
]


def chat_token_ids(hf_tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt as one user turn, chat-templated by HF's tokenizer (the reference side)."""
    return [
        list(hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
            return_dict=True)["input_ids"])  # fmt: skip
        for p in prompts
    ]
