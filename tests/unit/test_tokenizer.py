"""core.tokenizer against transformers' tokenizer built from the same builtin GGUF."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import jinja2
import msgpack
import pytest

from core.tokenizer import Tokenizer, TokenizerFiles
from engine.loader.builtin import builtin_gguf_path
from engine.tokenizer_files import load_tokenizer_files

REPO = Path(__file__).resolve().parents[2]

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "Tabs\tand\nnewlines\n\n",
    "déjà vu — naïve café, Ünïcödé",
    "emoji 👋🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵",
    "中文分词测试，日本語のテキスト、한국어 문장",
    "def f(x):\n    return x ** 2  # code",
    "special tokens in text: <|im_start|>user\nhi<|im_end|>",
    "",
    "1234567890 3.14159 -42",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi 👋 in 中文"},
    ],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second, with émojis 🎉?"},
    ],
    [
        {"role": "user", "content": "no system, two turns"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "  spaced  "},
    ],
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    import transformers

    path = builtin_gguf_path("smollm2-135m-instruct")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def files() -> TokenizerFiles:
    return load_tokenizer_files("builtin:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tokenizer(files: TokenizerFiles) -> Tokenizer:
    return Tokenizer(files)


def test_files_describe_smollm2(files: TokenizerFiles, tokenizer: Tokenizer) -> None:
    assert (files.bos_token, files.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert files.bos_token_id == 1 and files.eos_token_ids == (2,)
    assert tokenizer.eos_token_ids == (2,)
    assert not files.add_bos_token  # SmolLM2's chat template writes <|im_start|> itself
    assert tokenizer.vocab_size == 49152
    assert files.chat_template and "<|im_start|>" in files.chat_template


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_hf(tokenizer, hf_tokenizer, add_special_tokens: bool) -> None:
    for text in TEXTS:
        expected = hf_tokenizer.encode(text, add_special_tokens=add_special_tokens)
        assert tokenizer.encode(text, add_special_tokens=add_special_tokens) == expected, text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_hf(tokenizer, hf_tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(0)
    cases = [hf_tokenizer.encode(text) for text in TEXTS]
    cases += [hf_tokenizer.apply_chat_template(c, tokenize=True)["input_ids"]
              for c in CONVERSATIONS]
    # arbitrary id runs: specials in the middle, byte tokens that split characters
    cases += [[rng.randrange(49152) for _ in range(rng.randrange(1, 40))] for _ in range(50)]
    for ids in cases:
        expected = hf_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) == expected, ids


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tokenizer, hf_tokenizer, add_generation_prompt: bool) -> None:
    for messages in CONVERSATIONS:
        text = hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        ids = hf_tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt
        )["input_ids"]
        assert tokenizer.apply_chat_template_text(messages, add_generation_prompt) == text
        assert tokenizer.apply_chat_template(messages, add_generation_prompt) == ids


def test_continue_final_message_matches_hf(tokenizer, hf_tokenizer) -> None:
    for last in ("The capital is", "Trailing space ", "emoji 🎉\n"):
        messages = [*CONVERSATIONS[0], {"role": "assistant", "content": last}]
        text = hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False, continue_final_message=True
        )
        ours = tokenizer.apply_chat_template_text(messages, False, continue_final_message=True)
        assert ours == text and ours.rstrip().endswith(last.strip())
        assert tokenizer.apply_chat_template(messages, False, True) == hf_tokenizer.encode(
            text, add_special_tokens=False
        )
    with pytest.raises(ValueError, match="exclude each other"):
        tokenizer.apply_chat_template(CONVERSATIONS[0], True, continue_final_message=True)


def test_chat_template_default_system_and_generation_prompt(tokenizer) -> None:
    text = tokenizer.apply_chat_template_text([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_hf_directory_matches_gguf(tmp_path, files, hf_tokenizer) -> None:
    import transformers

    hf_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    from_dir = load_tokenizer_files(str(tmp_path))
    assert from_dir.chat_template == files.chat_template
    assert from_dir.eos_token_ids == (2, 0)  # tokenizer EOS first, then the model config's
    assert (from_dir.bos_token, from_dir.bos_token_id) == (files.bos_token, files.bos_token_id)
    assert from_dir.add_bos_token == files.add_bos_token
    ours, theirs = Tokenizer(from_dir), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text)
    for messages in CONVERSATIONS:
        expected = theirs.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True
        )["input_ids"]
        assert ours.apply_chat_template(messages) == expected


def test_template_in_tokenizer_config_and_added_token_dicts(tmp_path, files) -> None:
    """Older saves: template inside tokenizer_config.json, special tokens as AddedToken dicts."""
    (tmp_path / "tokenizer.json").write_text(files.tokenizer_json)
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|endoftext|>",
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer_files(str(tmp_path))
    assert loaded.bos_token_id == 1 and loaded.eos_token_ids == (0,)
    tok = Tokenizer(loaded)
    assert tok.apply_chat_template_text([{"role": "user", "content": "x"}]) == "<|im_start|>x"


def test_template_helpers_and_sandbox(files) -> None:
    raising = TokenizerFiles(
        tokenizer_json=files.tokenizer_json,
        chat_template="{% if messages[0]['role'] != 'user' %}{{ raise_exception('bad role') }}"
        "{% endif %}{{ messages | tojson }}",
    )
    tok = Tokenizer(raising)
    # transformers' tojson: no HTML escaping, non-ASCII kept
    assert tok.apply_chat_template_text([{"role": "user", "content": "<b>é"}]) == (
        '[{"role": "user", "content": "<b>é"}]'
    )
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role"):
        tok.apply_chat_template_text([{"role": "system", "content": "x"}])
    escaping = TokenizerFiles(
        tokenizer_json=files.tokenizer_json,
        chat_template="{{ messages.__class__.__mro__ }}",
    )
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer(escaping).apply_chat_template_text([{"role": "user", "content": "x"}])


def test_no_template_and_inconsistent_bos_flag_are_errors(files) -> None:
    bare = TokenizerFiles(tokenizer_json=files.tokenizer_json, bos_token_id=1)
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(bare).apply_chat_template([{"role": "user", "content": "x"}])
    wrong = TokenizerFiles(tokenizer_json=files.tokenizer_json, bos_token_id=1, add_bos_token=True)
    with pytest.raises(ValueError, match="does not add BOS"):
        Tokenizer(wrong)


def test_files_round_trip_through_msgpack(files) -> None:
    wire = msgpack.packb(files.to_dict())
    assert TokenizerFiles.from_dict(msgpack.unpackb(wire)) == files
    with pytest.raises(ValueError, match="unknown TokenizerFiles fields: extra"):
        TokenizerFiles.from_dict({**files.to_dict(), "extra": 1})


def test_core_tokenizer_imports_no_torch() -> None:
    code = (
        "import sys, core.tokenizer, core.detokenizer; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_sentencepiece_only_directory_goes_through_transformers(tmp_path) -> None:
    """No tokenizer.json: transformers converts tokenizer.model (Llama-2 layout, BOS added)."""
    import sentencepiece
    import transformers

    corpus = ["Hello world, a tiny corpus for a tiny tokenizer.",
              "The quick brown fox jumps over the lazy dog 123."] * 50
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=340, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2,
    )
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    files = load_tokenizer_files(str(tmp_path))
    assert files.add_bos_token and files.bos_token_id == 1 and files.eos_token_ids == (2,)
    ours, theirs = Tokenizer(files), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        ids = theirs.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
