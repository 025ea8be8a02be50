"""IncrementalDetokenizer: streamed chunks add up to the full decode, never a broken character.

Two real tokenizers: SmolLM2's byte-level BPE (from the builtin GGUF) and a Llama-2-style
sentencepiece BPE (metaspace + byte fallback, leading space stripped by the decoder) built here
with the ``tokenizers`` library, since no such model ships on this machine.
"""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from core.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from core.tokenizer import Tokenizer, TokenizerFiles
from engine.tokenizer_files import load_tokenizer_files

TEXTS = [
    "Hello world! This is a plain sentence.",
    "  two leading spaces,  double  spaces, trailing ",
    "emoji: 👋🏽 family 👨‍👩‍👧‍👦 flag 🇯🇵 then text",
    "中文分词测试，日本語のテキスト、한국어 문장",
    "rare CJK 龘靐齉 and math ∮ ∑ √ ≈ ∞",
    "mixed é à ü ß\nnew line\ttab 🎉🎉🎉",
    "🙂",
]


def _smollm2() -> Tokenizer:
    return Tokenizer(load_tokenizer_files("builtin:smollm2-135m-instruct"))


def _sentencepiece_style() -> Tokenizer:
    """A Llama-2-shaped tokenizer, laid out as transformers converts a sentencepiece model:
    ▁ for spaces, <0xNN> byte fallback, leading space stripped, BOS post-processor."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    chars = ["▁"] + [chr(c) for c in range(33, 127)]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "w"), ("o", "r"), ("▁w", "or"),
              ("l", "d"), ("▁wor", "ld"), ("i", "n"), ("▁", "a"), ("e", "s")]
    vocab_list = specials + byte_tokens + chars + [a + b for a, b in merges]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                 byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    files = TokenizerFiles(tokenizer_json=tok.to_str(), bos_token="<s>", eos_token="</s>",
                           bos_token_id=1, eos_token_ids=(2,), add_bos_token=True)
    return Tokenizer(files)


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return _smollm2()


@pytest.fixture(scope="module", params=["smollm2", "sentencepiece"])
def tokenizer(request) -> Tokenizer:
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2")
    return _sentencepiece_style()


def stream(tokenizer: Tokenizer, ids: list[int], chunk_sizes: list[int],
           prompt_ids: list[int] | None = None, skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids or [],
                                   skip_special_tokens=skip)
    chunks, start = [], 0
    for size in chunk_sizes:
        chunks.append(detok.push(ids[start : start + size]))
        start += size
    assert start == len(ids)
    chunks.append(detok.flush())
    assert detok.output_token_ids == ids
    assert detok.text == "".join(chunks)
    return chunks


def test_characters_really_are_split_across_tokens(tokenizer) -> None:
    """Guard for the tests below: some single tokens of these texts decode to U+FFFD."""
    split = [i for text in TEXTS for i in tokenizer.encode(text, add_special_tokens=False)
             if REPLACEMENT_CHAR in tokenizer.decode([i])]
    assert len(split) > 10


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    chunks = stream(tokenizer, ids, [1] * len(ids))
    assert "".join(chunks) == tokenizer.decode(ids)
    assert not any(REPLACEMENT_CHAR in chunk for chunk in chunks)
    assert chunks[-1] == ""  # nothing left for flush: every character completed


@pytest.mark.parametrize("seed", range(5))
def test_random_chunk_sizes(tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        sizes = []
        while sum(sizes) < len(ids):
            sizes.append(min(rng.randint(0, 4), len(ids) - sum(sizes)))
        chunks = stream(tokenizer, ids, sizes)
        assert "".join(chunks) == tokenizer.decode(ids)
        assert not any(REPLACEMENT_CHAR in chunk for chunk in chunks)


def test_with_prompt_context(tokenizer) -> None:
    """Output after a prompt: the first token's leading space must survive (sentencepiece
    decoders strip it from a bare decode), and a split character completes across pushes."""
    prompt = tokenizer.encode("Question: say hello.\nAnswer:")
    for text in [" the world", " 👋🏽 hello 中文", "\nthe end"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        full = tokenizer.decode(prompt + ids)
        expected = full[len(tokenizer.decode(prompt)):]
        chunks = stream(tokenizer, ids, [1] * len(ids), prompt_ids=prompt)
        assert "".join(chunks) == expected
        assert not any(REPLACEMENT_CHAR in chunk for chunk in chunks)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, skip: bool) -> None:
    eos = tokenizer.eos_token_ids[0]
    ids = [eos]
    for piece in ["Hi", " 👋", " there"]:
        ids += [*tokenizer.encode(piece, add_special_tokens=False), eos]
    chunks = stream(tokenizer, ids, [1] * len(ids), skip=skip)
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert not any(REPLACEMENT_CHAR in chunk for chunk in chunks)


def test_truncated_mid_character_is_held_then_flushed(tokenizer) -> None:
    ids = tokenizer.encode("ok 👋", add_special_tokens=False)
    # drop tokens from the end until the last character is incomplete
    while ids and not tokenizer.decode(ids).endswith(REPLACEMENT_CHAR):
        ids = ids[:-1]
    assert ids, "the emoji should span several byte tokens"
    detok = IncrementalDetokenizer(tokenizer)
    pushed = "".join(detok.push([i]) for i in ids)
    assert REPLACEMENT_CHAR not in pushed
    tail = detok.flush()
    assert tail.endswith(REPLACEMENT_CHAR)
    assert pushed + tail == tokenizer.decode(ids)


def test_many_random_sequences_match_full_decode(smollm2: Tokenizer) -> None:
    """Arbitrary id runs (invalid byte sequences included): the concatenation still equals the
    full decode, and a chunk only carries U+FFFD where the full decode has one too.

    Byte-level BPE only: a byte-fallback decoder turns a whole run of <0xNN> tokens into U+FFFDs
    once an invalid byte joins it, retroactively, including ASCII bytes already streamed. Real
    models' outputs are valid UTF-8 almost always; that case is not worth holding every byte
    token for.
    """
    tokenizer = smollm2
    rng = random.Random(7)
    vocab = tokenizer.vocab_size
    for _ in range(40):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        chunks = stream(tokenizer, ids, [1] * len(ids))
        full = tokenizer.decode(ids)
        assert "".join(chunks) == full
        if REPLACEMENT_CHAR not in full:
            assert not any(REPLACEMENT_CHAR in chunk for chunk in chunks)


def test_prompt_ending_inside_a_character(tokenizer) -> None:
    """Ids of a prompt that stops mid-emoji: the output's first bytes complete it, and the
    whole character is streamed (never a U+FFFD)."""
    ids = tokenizer.encode("Say 👋 now", add_special_tokens=False)
    cut = next(k for k in range(1, len(ids))
               if tokenizer.decode(ids[:k]).endswith(REPLACEMENT_CHAR))
    prompt, output = ids[:cut], ids[cut:]
    chunks = stream(tokenizer, output, [1] * len(output), prompt_ids=prompt)
    assert not any(REPLACEMENT_CHAR in chunk for chunk in chunks)
    prompt_text = tokenizer.decode(prompt).rstrip(REPLACEMENT_CHAR)
    assert prompt_text + "".join(chunks) == tokenizer.decode(ids) == "Say 👋 now"
