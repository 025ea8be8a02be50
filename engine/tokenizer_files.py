"""Collect a model's tokenizer as plain ``TokenizerFiles`` from the same source as its weights.

- builtin / GGUF: transformers builds the tokenizer from the GGUF metadata (vocab, merges,
  special tokens, chat template); we keep its serialized backend and its chat template.
- HF directory: tokenizer.json + tokenizer_config.json (+ chat_template.jinja / .json) are read
  directly; a directory with only sentencepiece files goes through transformers' conversion.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from core.tokenizer import TokenizerFiles
from engine.loader import resolve_source

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def load_tokenizer_files(source: str) -> TokenizerFiles:
    """TokenizerFiles for a model source as ``engine.loader.load_model`` accepts it."""
    kind, path, _ = resolve_source(source)
    if kind == "gguf":
        return _from_transformers(str(path.parent), gguf_file=path.name)
    if (path / "tokenizer.json").is_file():
        return _from_hf_dir(path)
    return _from_transformers(str(path))


def _unique(ids: list[int | None]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _config_eos_ids(directory: Path) -> list[int]:
    """EOS ids from config.json and generation_config.json (chat models often list several)."""
    found: list[int] = []
    for name in ("config.json", "generation_config.json"):
        file = directory / name
        if not file.is_file():
            continue
        eos = json.loads(file.read_text()).get("eos_token_id")
        found.extend(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return found


def _from_transformers(directory: str, gguf_file: str | None = None) -> TokenizerFiles:
    import transformers  # heavy; only this path needs it

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = transformers.AutoTokenizer.from_pretrained(directory, **kwargs)
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    eos_ids = [tok.eos_token_id]
    if gguf_file is None:
        eos_ids += _config_eos_ids(Path(directory))
    return TokenizerFiles(
        tokenizer_json=tok.backend_tokenizer.to_str(),
        chat_template=template,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        unk_token=tok.unk_token,
        pad_token=tok.pad_token,
        bos_token_id=tok.bos_token_id,
        eos_token_ids=_unique(eos_ids),
        add_bos_token=_adds_bos(tok.backend_tokenizer.to_str(), tok.bos_token_id),
    )


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """transformers 5 saves chat_template.jinja; older saves put it in chat_template.json or in
    tokenizer_config.json, possibly as a list of named templates (we take "default")."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    json_file = directory / "chat_template.json"
    if template is None and json_file.is_file():
        template = json.loads(json_file.read_text()).get("chat_template")
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default")
    return template


def _from_hf_dir(directory: Path) -> TokenizerFiles:
    tokenizer_json = (directory / "tokenizer.json").read_text()
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    specials = {name: _token_content(config.get(name)) for name in _SPECIAL_NAMES}
    # ids of special tokens come from the vocabulary itself, not from the model config
    vocab = Tokenizer.from_str(tokenizer_json).get_vocab(with_added_tokens=True)
    bos_id = vocab.get(specials["bos_token"]) if specials["bos_token"] else None
    eos_ids = [vocab.get(specials["eos_token"])] if specials["eos_token"] else []
    return TokenizerFiles(
        tokenizer_json=tokenizer_json,
        chat_template=_chat_template(directory, config),
        bos_token=specials["bos_token"],
        eos_token=specials["eos_token"],
        unk_token=specials["unk_token"],
        pad_token=specials["pad_token"],
        bos_token_id=bos_id,
        eos_token_ids=_unique(eos_ids + _config_eos_ids(directory)),
        # like transformers 5, trust the post-processor over tokenizer_config's add_bos_token
        add_bos_token=_adds_bos(tokenizer_json, bos_id),
    )


def _adds_bos(tokenizer_json: str, bos_id: int | None) -> bool:
    """Whether ``encode(..., add_special_tokens=True)`` starts with BOS."""
    probe = Tokenizer.from_str(tokenizer_json).encode("a", add_special_tokens=True).ids
    return bos_id is not None and bool(probe) and probe[0] == bos_id


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.tokenizer_files SOURCE``: the source's TokenizerFiles, msgpack-encoded,
    on stdout (anything the libraries print, from Python or native code, goes to stderr); run by
    coordinator/launch.py."""
    import argparse
    import os
    import sys

    import msgpack

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("source")
    args = parser.parse_args(argv)
    sys.stdout.flush()
    out = os.dup(1)  # stdout for the payload only; fd 1 itself now writes to stderr
    os.dup2(2, 1)
    payload = msgpack.packb(load_tokenizer_files(args.source).to_dict())
    with os.fdopen(out, "wb") as stream:
        stream.write(payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
