"""Structured-output specs -> xgrammar compiled grammars over one model's vocabulary."""

from __future__ import annotations

import re
from collections.abc import Sequence as Seq
from typing import Any

from core.structured_output import StructuredOutput
from core.tokenizer import TokenizerFiles

# xgrammar's messages start with "[hh:mm:ss] /path/file.cc:123: "; clients need only the rest
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class GrammarError(ValueError):
    """The spec itself is wrong (bad schema, regex or grammar): the client's fault."""


class GrammarCompiler:
    """Owns an xgrammar ``GrammarCompiler`` for the vocabulary of ``tokenizer_files``.

    ``vocab_size`` is the model's (the logits' width), which may exceed the tokenizer's.
    ``stop_token_ids`` end a grammar: a grammar that is complete allows only them.
    """

    def __init__(self, tokenizer_files: TokenizerFiles, vocab_size: int, stop_token_ids: Seq[int]):
        import xgrammar as xgr
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(tokenizer_files.tokenizer_json)
        )
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        # one thread: the compile runs beside the engine's own threads, never instead of them;
        # no cache here: GrammarCache keeps the results
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, spec: StructuredOutput) -> Any:
        """An ``xgrammar.CompiledGrammar``; raises GrammarError if the spec does not compile."""
        c = self._compiler
        try:
            if spec.kind == "json":
                # no free whitespace between tokens: small models given the choice tend to emit
                # newlines until max_tokens
                return c.compile_json_schema(
                    spec.value, any_whitespace=False, strict_mode=spec.strict
                )
            if spec.kind == "json_object":  # an object (not any JSON value), compact as above
                return c.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            if spec.kind == "regex":
                return c.compile_regex(spec.value)
            if spec.kind == "choice":
                return c.compile_grammar(choice_grammar(spec.choices))
            return c.compile_grammar(spec.value)
        except Exception as exc:  # xgrammar raises RuntimeError (and kin) for a bad spec
            message = _LOCATION.sub("", str(exc).strip()) or type(exc).__name__
            raise GrammarError(f"invalid {spec.kind} for structured output: {message}") from None


def choice_grammar(choices: Seq[str]) -> str:
    """EBNF for exactly one of ``choices`` (JSON string escapes are valid EBNF literals)."""
    import json

    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
