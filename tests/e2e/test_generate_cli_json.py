"""``tandem generate``: the in-process engine from the command line, one JSON line per prompt.

Run through ``coordinator.cli.main`` in this process (argument parsing, config, engine, output
as the console script does) to spare a second interpreter importing torch on 2 cores."""

from __future__ import annotations

import json

import pytest
from e2e_client import greedy
from server_process import ROOT

from coordinator.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_generate_json_equals_the_engine(llm, capsys):
    prompts = ["What is the capital of France?", "Say hi"]
    config = str(ROOT / "configs/local.yaml")
    code = main(["generate", "--config", config, "--chat", "--max-tokens", "12", "--json",
                 *prompts])  # fmt: skip
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = llm.generate([llm.encode_chat(p) for p in prompts], greedy(12))
    assert [(r["prompt"], r["text"], r["token_ids"], r["finish_reason"]) for r in lines] == [
        (p, e.text, e.token_ids, e.finish_reason) for p, e in zip(prompts, expected, strict=True)
    ]


def test_generate_rejects_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: x}\npools: {}\nmode: sideways\n")
    assert main(["generate", "--config", str(bad), "hi"]) == 2
    assert "mode" in capsys.readouterr().err
