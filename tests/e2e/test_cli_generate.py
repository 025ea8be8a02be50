"""``tandem generate``: the in-process engine from the command line, one JSON line per prompt."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from e2e_client import greedy
from server_process import ROOT, server_env

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_generate_json_equals_the_engine(llm):
    prompts = ["What is the capital of France?", "Say hi"]
    result = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "generate", "--config", "configs/local.yaml",
         "--chat", "--max-tokens", "12", "--json", *prompts],  # fmt: skip
        cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    expected = llm.generate([llm.encode_chat(p) for p in prompts], greedy(12))
    assert [(r["prompt"], r["text"], r["token_ids"]) for r in lines] == [
        (p, e.text, e.token_ids) for p, e in zip(prompts, expected, strict=True)
    ]


def test_generate_rejects_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: x}\npools: {}\nmode: sideways\n")
    result = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "generate", "--config", str(bad), "hi"],
        cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "mode" in result.stderr
