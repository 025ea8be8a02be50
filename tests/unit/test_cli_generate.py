"""``tandem generate``: runs the local topology's model in process; output equals LLM.generate on
the same prompts; bad input exits 2 with a message naming the problem (before any model loads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.cli import main

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "local.yaml")
PROMPTS = ["What is 2 + 2?", "Name a colour."]


def test_bad_max_tokens_exits_2_naming_the_field(capsys):
    assert main(["generate", "--config", CONFIG, "--max-tokens", "0", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tandem: max_tokens must be >= 1"), err


def test_bad_top_p_exits_2(capsys):
    assert main(["generate", "--config", CONFIG, "--top-p", "1.5", "hi"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_missing_config_exits_2(tmp_path, capsys):
    assert main(["generate", "--config", str(tmp_path / "absent.yaml"), "hi"]) == 2
    assert capsys.readouterr().err.startswith("tandem: ")


@pytest.mark.slow
def test_generate_json_applies_chat_template_and_decodes_its_tokens(capsys):
    args = ["generate", "--config", CONFIG, "--chat", "--json", "--max-tokens", "6", *PROMPTS]
    assert main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS

    # the reference is the tokenizer alone (the engine's tokens are checked against HF in
    # tests/model): a second model load would double this test's time on a shared machine
    from core.tokenizer import Tokenizer
    from engine.tokenizer_files import load_tokenizer_files

    tok = Tokenizer(load_tokenizer_files("builtin:smollm2-135m-instruct"))
    for record, prompt in zip(records, PROMPTS, strict=True):
        chat = tok.apply_chat_template([{"role": "user", "content": prompt}])
        assert record["prompt_token_ids"] == chat
        ids = record["token_ids"]
        assert record["text"] == tok.decode(ids)
        if record["finish_reason"] == "length":
            assert len(ids) == 6
        else:
            assert record["finish_reason"] == "stop" and ids[-1] in tok.eos_token_ids
            assert len(ids) <= 6
