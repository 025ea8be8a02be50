"""Weight-only quantization (``model.quantization: int8 | int4``) and ``dtype: auto``.

- A GGUF's Q4_1 / Q8_0 blocks are kept as they are: dequantized, bit-identical to the float path.
- A quantized model computes with exactly its dequantized weights: a tiny random Llama quantized
  by the engine gives the same greedy tokens and logprobs (to float32 summation order) as the
  float32 engine on a checkpoint holding those dequantized weights, through the quantized kernels
  (decode), the per-call dequantization (prefill) and the kept dense copy.
- On the real model, bounded quality against float32 (greedy agreement, |delta logprob|, held-out
  perplexity); the figures behind the bounds are in docs/benchmarks.md (``bench.quant_quality``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.chat_prompts import CHAT_PROMPTS
from bench.quant_quality import HELDOUT, MODEL, compare, greedy, make_runner, perplexity
from core.sampling_params import SamplingParams
from core.tokenizer import Tokenizer
from engine import engine_config
from engine import linear as engine_linear
from engine.engine_config import EngineConfig, auto_dtype
from engine.engine_core import EngineCore
from engine.loader import load_model
from engine.loader.gguf_loader import KEPT_BLOCKS, hf_name, unpermute_rows
from engine.quantized_weight import QuantizedWeight
from engine.tokenizer_files import load_tokenizer_files
from kernels import cpu_ext
from tests.model.test_engine_vs_hf import run_engine


def test_gguf_q4_1_and_q8_0_blocks_are_kept_bit_exact(builtin_gguf_path):
    _, kept = load_model(builtin_gguf_path, torch.float32, "int4")
    quantized = {k: v for k, v in kept.items() if isinstance(v, QuantizedWeight)}
    assert len(quantized) == 30 * 7 + 1  # every layer linear (Q4_1) + the embedding (Q8_0)
    assert {q.fmt for q in quantized.values()} == {"int4", "int8"}
    assert quantized["model.embed_tokens.weight"].group_size == 32
    # against the float path's own dequantization (gguf + llama.cpp's Q/K row order undone)
    reader = gguf.GGUFReader(builtin_gguf_path)
    by_name = {hf_name(t.name): t for t in reader.tensors}
    for name, heads in (("model.embed_tokens.weight", None),
                        ("model.layers.3.self_attn.q_proj.weight", 9),
                        ("model.layers.3.self_attn.k_proj.weight", 3),
                        ("model.layers.29.mlp.down_proj.weight", None)):  # fmt: skip
        t = by_name[name]
        dense = gguf.quants.dequantize(t.data, t.tensor_type)
        dense = dense if heads is None else unpermute_rows(dense, heads)
        assert torch.equal(quantized[name].dequantize(), torch.from_numpy(dense)), name
    assert KEPT_BLOCKS["int8"] == {gguf.GGMLQuantizationType.Q8_0}  # Q4_1 is no int8 format


def dequantized_twin(src: Path, dst: Path, quantization: str) -> Path:
    """A copy of a HF checkpoint whose weights are what ``quantization`` makes of them, in float32
    (layer linears int4 groups of 32 / int8 per channel, the tied embedding int8 per channel)."""
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    for name, w in tensors.items():
        if name.endswith("_proj.weight"):
            tensors[name] = QuantizedWeight.quantize(w, quantization).dequantize()
        elif name == "model.embed_tokens.weight":
            tensors[name] = QuantizedWeight.quantize(w, "int8").dequantize()
    save_file(tensors, str(dst / "model.safetensors"))
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def run_tiny(
    directory: Path, prepare: Callable[[EngineCore], None] | None = None, **config
) -> tuple[list[list[int]], list[list[float]], list[float]]:
    """Greedy tokens, their logprobs and all prompt logprobs of 3 prompts (5, 19, 40 tokens:
    prefill steps above and below the quantized kernels' row limit, then decode steps).
    ``prepare(engine)`` runs before the first step; one thread unless ``num_threads`` says."""
    config.setdefault("num_threads", 1)
    engine = EngineCore(EngineConfig(model=str(directory), num_blocks=64, **config))
    if prepare is not None:
        prepare(engine)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 19, 40)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0,
                            prompt_logprobs=0)  # fmt: skip
    tokens, deltas = run_engine(engine, prompts, params)
    lps = [[lp.logprob for d in ds for lp in d.logprobs] for ds in deltas]
    prompt_lps = [lp.logprob for ds in deltas for d in ds for lp in d.prompt_logprobs]
    assert len(prompt_lps) == 4 + 18 + 39
    return tokens, lps, prompt_lps


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_model_computes_with_its_dequantized_weights(quantization, tiny_llama_dir,
                                                               tmp_path):  # fmt: skip
    twin = dequantized_twin(tiny_llama_dir, tmp_path / "twin", quantization)
    ref_tokens, ref_lps, ref_prompt = run_tiny(twin)
    for keep_dense in (False, True):
        tokens, lps, prompt = run_tiny(tiny_llama_dir, quantization=quantization,
                                       keep_dense_weights=keep_dense)  # fmt: skip
        assert tokens == ref_tokens
        assert torch.allclose(torch.tensor(prompt), torch.tensor(ref_prompt), atol=2e-5)
        assert all(torch.allclose(torch.tensor(a), torch.tensor(b), atol=2e-5)
                   for a, b in zip(lps, ref_lps, strict=True))  # fmt: skip
    # and the quantization is real: the float32 original differs
    _, _, original = run_tiny(tiny_llama_dir)
    assert not torch.allclose(torch.tensor(original), torch.tensor(ref_prompt), atol=1e-3)


@pytest.mark.parametrize("speculative", [None, {"method": "ngram", "num_speculative_tokens": 3}])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quantization", ["int8", "int4", "int4+a8", "none", "int4+dense"])
def test_one_call_decoder_layers_equal_the_per_op_path(quantization, dtype, speculative,
                                                       tiny_llama_dir, monkeypatch):  # fmt: skip
    """``tandem_cpu.DecoderStack`` (kernels/csrc/decoder_layer.cpp) runs a decode step's layers
    in one C++ call: the same tokens and bit for bit the same logprobs as the per-op path, and
    it did run, for all layers of every decode step it covers (with n-gram speculation: also
    verification steps of several rows per sequence). Quantized layers within their kernel's row
    limit take that kernel; dense layers (``none``; ``int4+dense``: a dense copy, the int4
    kernel's limit cut to 1 row so that most steps exceed it) the packed weight's kernel in
    bfloat16, our float32 kernel in float32 (steps above its row limit take MKL per op and are
    not fused)."""
    dense = quantization in ("none", "int4+dense")
    if quantization == "int4+dense":
        monkeypatch.setattr(engine_linear, "QUANT_MAX_ROWS", 1)
        monkeypatch.setattr(engine_linear, "QUANT_MAX_ROWS_BESIDE_DIRECT_BF16", 1)
        monkeypatch.setattr(engine_linear, "QUANT_MAX_ROWS_PACKED_BF16", 1)
        monkeypatch.setattr(engine_linear, "QUANT_MAX_ROWS_PACKED_F32", 1)
    runs, rows, limit = {}, {}, []
    for fuse in (True, False):
        calls: list[int] = []

        def count_calls(engine: EngineCore, fuse: bool = fuse, calls: list[int] = calls) -> None:
            model = engine.model
            op = model._fused_op
            assert op is not None  # the C++ extension builds here (tests/conftest.py)

            def counted(stack, x: torch.Tensor, residual, begin: int, end: int, *args):
                assert (begin, end) == (0, len(model.layers))  # every layer in the one call
                calls.append(x.shape[0])
                return op(stack, x, residual, begin, end, *args)

            model._fused_op, model.fuse_layers = counted, fuse
            limit.append(model.layers[0].mlp.down_proj.max_quant_rows)  # 8, 64 with int8 inputs

        extra = {} if speculative is None else {"speculative": speculative}
        quant, _, flag = quantization.partition("+")
        runs[fuse] = run_tiny(tiny_llama_dir, count_calls, dtype=dtype, quantization=quant,
                              quantize_activations=flag == "a8",
                              keep_dense_weights=flag == "dense", **extra)  # fmt: skip
        rows[fuse] = calls
    assert runs[True] == runs[False]  # tokens, logprobs and prompt logprobs: exactly equal
    assert rows[False] == []
    assert len(rows[True]) > 0
    if dense and dtype == "float32":
        assert max(rows[True]) <= engine_linear.F32_DIRECT_MAX_ROWS
    if quantization == "int4+dense":  # steps above the int4 kernel's limit: the packed copy
        assert max(rows[True]) > limit[0] == 1
    elif not dense:
        assert max(rows[True]) <= limit[0]
    if speculative is not None:
        assert max(rows[True]) > 3  # a verification step: more rows than the 3 sequences


@pytest.mark.parametrize("speculative", [None, {"method": "ngram", "num_speculative_tokens": 3}])
@pytest.mark.parametrize("config", ["float32:int4", "bfloat16:int4+a8", "bfloat16:none",
                                    "float32:none"])  # fmt: skip
def test_one_call_decoder_layers_on_two_threads_equal_the_per_op_path(config, speculative,
                                                                      tiny_llama_dir):  # fmt: skip
    """On two threads ``DecoderStack`` runs its layers in one team (kernels/csrc/team.h), or
    with ``set_layer_team(False)`` an OpenMP region per parallel loop, and the per-op path
    each op's own at::parallel_for: the same tokens, bit for bit the same logprobs."""
    dtype, quantization = config.split(":")
    quant, _, flag = quantization.partition("+")
    runs, stack_steps = {}, {}
    for mode in ("team", "no team", "per-op"):
        steps = stack_steps[mode] = []

        def prepare(engine: EngineCore, mode: str = mode, steps: list = steps) -> None:
            model, op = engine.model, engine.model._fused_op
            assert op is not None

            def counted(stack, x: torch.Tensor, *args):
                steps.append(stack.team_for(x.shape[0]))
                return op(stack, x, *args)

            model._fused_op, model.fuse_layers = counted, mode != "per-op"
            model.set_layer_team(mode == "team")

        extra = {} if speculative is None else {"speculative": speculative}
        runs[mode] = run_tiny(tiny_llama_dir, prepare, dtype=dtype, quantization=quant,
                              quantize_activations=flag == "a8", num_threads=2,
                              **extra)  # fmt: skip
    assert runs["team"] == runs["no team"] == runs["per-op"]
    assert stack_steps["per-op"] == [] and stack_steps["team"] and stack_steps["no team"]
    assert not any(stack_steps["no team"])
    # in a team at every step: our kernels for every linear (bfloat16 dense: where the CPU has
    # them), two CPUs to run on
    if len(os.sched_getaffinity(0)) >= 2 and not os.environ.get("OMP_PROC_BIND"):
        assert all(stack_steps["team"]) or config == "bfloat16:none"


def test_one_call_decoder_layers_run_only_where_every_linear_takes_their_kernels(
    tiny_llama_dir, monkeypatch
):
    """A float32 int8 model with int8 activations and dense copies, in which the [64, K] linears
    cannot take the int8-activation kernel (``pack_a8`` refuses them, as it does any N % 16 != 0):
    those keep the float kernel, up to QUANT_MAX_ROWS rows, the others linear_a8's 64. No step
    is fused then (neither the quantized set nor the dense copies are what every linear takes at
    3 rows), and the tokens and logprobs equal the per-op path's exactly."""
    real = cpu_ext.pack_a8

    def pack_a8(fmt: str, tensors: tuple) -> tuple | None:
        return None if tensors[0].shape[0] == 64 else real(fmt, tensors)

    monkeypatch.setattr(cpu_ext, "pack_a8", pack_a8)
    runs, fused = {}, []
    for fuse in (True, False):

        def prepare(engine: EngineCore, fuse: bool = fuse) -> None:
            model, op = engine.model, engine.model._fused_op
            assert op is not None
            kinds = {w.a8 for ly in model.layers
                     for w in (ly.self_attn.o_proj, ly.mlp.gate_up_proj)}  # fmt: skip
            assert kinds == {False, True}

            def counted(stack, x: torch.Tensor, *args):
                fused.append(x.shape[0])
                return op(stack, x, *args)

            model._fused_op, model.fuse_layers = counted, fuse

        runs[fuse] = run_tiny(tiny_llama_dir, prepare, dtype="float32", quantization="int8",
                              quantize_activations=True, keep_dense_weights=True)  # fmt: skip
    assert fused == []
    assert runs[True] == runs[False]


def test_one_call_decoder_layers_stop_after_each_layer_for_a_caller_that_waits(tiny_llama_dir):
    """A decode step with ``after_layer`` (a worker that sends each layer's KV as it is stored)
    runs its fused layers one call each, calls back after each in order, and computes what the
    one call for all of them does."""
    seen: list[list[int]] = []
    ranges: list[tuple[int, int]] = []

    def per_layer(engine: EngineCore) -> None:
        execute, op = engine.runner.execute, engine.model._fused_op
        assert op is not None

        def counted(stack, x, residual, begin, end, *args):
            ranges.append((begin, end))
            return op(stack, x, residual, begin, end, *args)

        engine.model._fused_op = counted

        def with_callback(batch, after_layer=None):
            if batch.is_prefill:
                return execute(batch, after_layer)
            seen.append([])
            return execute(batch, seen[-1].append)

        engine.runner.execute = with_callback

    config = {"dtype": "bfloat16", "quantization": "int4"}
    assert run_tiny(tiny_llama_dir, per_layer, **config) == run_tiny(tiny_llama_dir, **config)
    assert len(seen) > 0 and all(s == [0, 1] for s in seen)  # the tiny Llama's 2 layers
    assert ranges == [(0, 1), (1, 2)] * len(seen)  # fused, one call a layer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_activations_move_only_small_steps_and_little(dtype, tiny_llama_dir, monkeypatch):
    """``quantize_activations``: calls of at most ``A8_MAX_ROWS`` rows (16 here, so that these
    prompts fall on both sides of it) take ``linear_a8`` on the repacked weights (not its
    reference): the decode steps of the 3 sequences, and the LM head on the 5-token prompt's 4
    prompt-logprob rows. The prefill's layers (64 rows) and the head on the other prompts' 18 and
    39 rows stay on the dense copy, bit for bit. What moves, moves by about the activations'
    rounding. (The float kernels' limit cut to 16 too: float32's linear_packed would take the
    18-row head.)"""
    monkeypatch.setattr(engine_linear, "A8_MAX_ROWS", 16)
    monkeypatch.setattr(engine_linear, "A8_MAX_ROWS_BESIDE_AMX_BF16", 16)
    monkeypatch.setattr(engine_linear, "QUANT_MAX_ROWS_PACKED_F32", 16)
    layers: list = []
    config = {"dtype": dtype, "quantization": "int4", "keep_dense_weights": True}
    tokens, lps, prompt = run_tiny(tiny_llama_dir, **config)
    tokens8, lps8, prompt8 = run_tiny(tiny_llama_dir, lambda e: layers.append(e.model.layers),
                                      quantize_activations=True, **config)  # fmt: skip
    proj = layers[0][0].self_attn.qkv_proj
    assert proj.kernel_tensors[0].dim() == 5 and "linear_a8" in str(proj._quant_kernel)
    assert prompt8[4:] == prompt[4:]
    diffs = [abs(a - b) for a, b in zip(prompt8[:4], prompt[:4], strict=True)]
    for t8, t, lp8, lp in zip(tokens8, tokens, lps8, lps, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(t8, t, strict=True)) if a != b), len(t))
        diffs += [abs(a - b) for a, b in zip(lp8[:same], lp[:same], strict=True)]
    assert len(diffs) >= 16 and 0 < max(diffs) < 0.02, diffs  # measured: 40, max 0.0028


@pytest.mark.parametrize("amx,direct", [(True, True), (False, True), (False, False)])
def test_int8_activation_row_limit_follows_the_kernel_that_runs(amx, direct, monkeypatch):
    """``linear_a8`` on the repacked weight takes steps of up to ``A8_MAX_ROWS`` rows (beside a
    bfloat16 dense copy on a CPU with AMX, ``A8_MAX_ROWS_BESIDE_AMX_BF16``: oneDNN's tiles win
    above); where it cannot run (float16 activations, N % 16 != 0) its torch reference does,
    within the float kernels' limit (its float64 block sums grow with the rows: ~450 MB for
    SmolLM2's head at 64). The float kernels' limit is ``QUANT_MAX_ROWS``, cut beside a bfloat16
    dense copy that our dense kernel takes (``QUANT_MAX_ROWS_BESIDE_DIRECT_BF16``: AMX tiles, or
    vdpbf16ps on a CPU without AMX)."""
    monkeypatch.setattr(engine_linear, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(engine_linear, "dense_runs_direct", lambda n, k: direct)
    g = torch.Generator().manual_seed(0)
    beside_amx = engine_linear.A8_MAX_ROWS_BESIDE_AMX_BF16 if amx else engine_linear.A8_MAX_ROWS
    float_beside_amx = (engine_linear.QUANT_MAX_ROWS_BESIDE_DIRECT_BF16 if direct
                        else engine_linear.QUANT_MAX_ROWS)  # fmt: skip
    for dtype, n, a8, dense_limit in (
        (torch.bfloat16, 48, True, beside_amx),
        (torch.float32, 48, True, engine_linear.A8_MAX_ROWS),
        (torch.float16, 48, False, engine_linear.QUANT_MAX_ROWS),
        (torch.bfloat16, 40, False, float_beside_amx),
    ):
        w = torch.randn(n, 64, generator=g) * 0.05
        for keep_dense in (True, False):
            layer = engine_linear.Linear(64, n).to(dtype)
            layer.load(w, quantization="int4", keep_dense=keep_dense)
            layer.bind("cpu", dtype, int8_activations=True)
            assert layer.a8 == a8, (dtype, n)
            # without a dense copy linear_a8 keeps its own limit: dequantizing costs more
            alone = engine_linear.A8_MAX_ROWS if a8 else engine_linear.QUANT_MAX_ROWS
            assert layer.max_quant_rows == (dense_limit if keep_dense else alone), (dtype, n)
            calls: list[int] = []

            def counted(x, *ws, kernel=layer._quant_kernel, calls=calls):
                calls.append(len(x))
                return kernel(x, *ws)

            layer._quant_kernel = counted
            sizes = (dense_limit, dense_limit + 1, engine_linear.A8_MAX_ROWS)
            for rows in sizes:
                layer(torch.randn(rows, 64, generator=g).to(dtype))
            no_dense = max(alone, engine_linear.QUANT_MAX_ROWS_NO_DENSE[dtype])
            limit = dense_limit if keep_dense else no_dense
            assert calls == [r for r in sizes if r <= limit], (dtype, n, keep_dense, calls)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_activation_row_limit_follows_the_kernel_that_runs(fmt, dtype, monkeypatch):
    """Without int8 activations a quantized weight with a dense copy takes ``linear_packed``
    (where this build runs it for ``dtype``) up to its limit against that copy: float32
    ``QUANT_MAX_ROWS_PACKED_F32``; bfloat16 x of int4 ``QUANT_MAX_ROWS_PACKED_BF16`` (no AMX);
    bfloat16 x of int8 the float kernels' limit beside our dense kernel
    (``QUANT_MAX_ROWS_BESIDE_DIRECT_BF16``); where it does not run, the row kernels their own."""
    monkeypatch.setattr(engine_linear, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(engine_linear, "dense_runs_direct", lambda n, k: True)
    bits = 4 if fmt == "int4" else 8
    runs = cpu_ext.load_ops().linear_packed_available(dtype, bits)
    layer = engine_linear.Linear(64, 48).to(dtype)
    layer.load(torch.randn(48, 64) * 0.05, quantization=fmt, keep_dense=True)
    layer.bind("cpu", dtype)
    assert ("linear_packed" in str(layer._quant_kernel)) == runs
    if dtype == torch.float32:
        want = engine_linear.QUANT_MAX_ROWS_PACKED_F32 if runs else engine_linear.QUANT_MAX_ROWS
    elif fmt == "int4" and runs:
        want = engine_linear.QUANT_MAX_ROWS_PACKED_BF16
    else:
        want = engine_linear.QUANT_MAX_ROWS_BESIDE_DIRECT_BF16
    assert layer.max_quant_rows == want
    x = torch.randn(want, 64).to(dtype)
    ref = x.float() @ layer.quantized.dequantize(torch.float32).t()
    assert torch.allclose(layer(x).float(), ref, rtol=2e-2, atol=2e-2)


def test_packed_layers_keep_no_plain_copy(tiny_llama_dir):
    """A CPU layer packed for oneDNN (every bfloat16 one; an int4 layer's bfloat16 dense copy)
    drops its plain weight: every CPU call takes the packed one. The tied embedding table keeps
    it (its rows are looked up); the weight bytes a step reads are counted all the same."""
    for quantization, keep_dense in (("none", False), ("int4", True)):
        config = EngineConfig(model=str(tiny_llama_dir), dtype="bfloat16", num_blocks=16,
                              num_threads=1, quantization=quantization,
                              keep_dense_weights=keep_dense)  # fmt: skip
        model = EngineCore(config).model
        for layer in model.layers:
            for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                        layer.mlp.gate_up_proj, layer.mlp.down_proj):  # fmt: skip
                assert lin.packed is not None and lin.weight is None and lin.has_dense
        table = model.embed_tokens.table
        assert table.weight is not None or table.quantized is not None
        if quantization == "none":
            down = model.layers[0].mlp.down_proj
            assert down.weight_bytes == down.in_features * down.out_features * 2


@pytest.mark.parametrize("dtype,quantize_activations",
                         [("bfloat16", False), ("bfloat16", True), ("float32", False)])  # fmt: skip
def test_quantized_weights_on_huge_pages_compute_the_same(dtype, quantize_activations,
                                                          tiny_llama_dir, monkeypatch):  # fmt: skip
    """The kernels' weight tensors are copied onto 2 MiB pages when bound (the quantized
    weight's own too where the kernel takes them as they are, float32 x: one copy), and the
    model computes exactly what it did on the tensors as loaded."""
    from engine.model import LlamaForCausalLM
    from tests.unit.test_huge_pages import vm_flags

    config = dict(dtype=dtype, quantization="int4",
                  quantize_activations=quantize_activations)  # fmt: skip
    seen = []
    huge = run_tiny(tiny_llama_dir, prepare=seen.append, **config)
    model = seen[0].model
    for lin in (model.layers[0].self_attn.qkv_proj, model.layers[-1].mlp.down_proj, model.lm_head):
        assert lin.a8 == quantize_activations
        assert all("hg" in vm_flags(t.data_ptr()) for t in lin.kernel_tensors)
        # int4_linear / int8_linear read the quantized weight's tensors: moved, not copied (the
        # repacked kernels, linear_a8 and linear_packed where this build has it, read a copy of
        # their own)
        bits = 4 if lin.quantized.fmt == "int4" else 8
        packed = cpu_ext.load_ops().linear_packed_available(lin.dtype, bits)
        raw = not lin.a8 and not packed
        ours, its = lin.kernel_tensors, lin.quantized.tensors()
        same = len(ours) == len(its) and all(a is b for a, b in zip(ours, its, strict=True))
        assert same == raw
    monkeypatch.setattr(LlamaForCausalLM, "huge_pages", False)
    assert run_tiny(tiny_llama_dir, **config) == huge


def test_packed_weights_are_collapsed_onto_huge_pages(tiny_llama_dir, monkeypatch):
    """Every oneDNN-packed weight (each bfloat16 layer and the LM head) is collapsed onto 2 MiB
    pages in place when the model binds its kernels, and the model computes what it did without
    (engine.huge_pages.collapse_onto_huge_pages: tests/unit/test_huge_pages.py)."""
    import engine.model as model_module
    from engine.model import LlamaForCausalLM

    collapsed: list[tuple[int, int]] = []
    real = model_module.collapse_onto_huge_pages

    def recorded(address: int, nbytes: int) -> int:
        collapsed.append((address, nbytes))
        return real(address, nbytes)

    monkeypatch.setattr(model_module, "collapse_onto_huge_pages", recorded)
    seen = []
    huge = run_tiny(tiny_llama_dir, prepare=seen.append, dtype="bfloat16")
    packed = [m.packed for m in seen[0].model.modules() if getattr(m, "packed", None) is not None]
    assert len(packed) == 4 * len(seen[0].model.layers) + 1
    mkldnn = torch.ops.mkldnn
    assert {(mkldnn.data_ptr(p), mkldnn._nbytes(p)) for p in packed} <= set(collapsed)
    monkeypatch.setattr(LlamaForCausalLM, "huge_pages", False)
    assert run_tiny(tiny_llama_dir, dtype="bfloat16") == huge


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_models_stay_close_to_float32(dtype, tiny_llama_dir):
    """On any CPU: float16 too where oneDNN cannot pack it (no AVX512-FP16: plain F.linear)."""
    _, _, f32 = run_tiny(tiny_llama_dir)
    for quantization in ("none", "int4"):
        _, _, b16 = run_tiny(tiny_llama_dir, dtype=dtype, quantization=quantization)
        diff = (torch.tensor(b16) - torch.tensor(f32)).abs()
        assert diff.mean() < 0.05 and diff.max() < 0.5, (quantization, diff.mean(), diff.max())


def test_auto_dtype_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(engine_config, "cpu_has_fast_bf16", lambda: True)
    assert auto_dtype(cpu) == torch.bfloat16
    assert EngineConfig(dtype="auto", device="cpu").torch_dtype == torch.bfloat16
    monkeypatch.setattr(engine_config, "cpu_has_fast_bf16", lambda: False)
    assert auto_dtype(cpu) == torch.float32
    monkeypatch.undo()
    native = torch.cpu._is_avx512_bf16_supported()
    assert (auto_dtype(cpu) == torch.bfloat16) == (native or engine_config.cpu_has_fast_bf16())
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int3")
    with pytest.raises(ValueError, match="quantize_activations: true needs quantization: int4"):
        EngineConfig(quantization="none", quantize_activations=True)


# The real model, against float32: 8 chat prompts x 32 greedy tokens and the held-out text, in
# batches of 8 (decode steps on the quantized kernels). Measured with the same sizes (``python -m
# bench.quant_quality --prompts 8 --new-tokens 32 --configs float32:int4,float32:int8``):
# int4 8/8 identical, mean and max |dlp| < 5e-5, perplexity 27.463 both; int8 4/8 identical,
# mean common prefix 22.0 / 32, mean |dlp| 0.030 (max 0.217), perplexity 27.656 (+0.7 %); and
# int4 with int8 activations below.
@pytest.mark.slow
def test_real_model_quality_bounded():
    tokenizer = Tokenizer(load_tokenizer_files(MODEL))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}])
               for p in CHAT_PROMPTS[:8]]  # fmt: skip
    text = tokenizer.encode(HELDOUT.read_text())
    runner = make_runner("float32:none", tokenizer, 2, 8)
    ref, ppl_ref = greedy(runner, prompts, 32), perplexity(runner, text)
    # int4 from the GGUF: the very same weights (Q4_1 layers, Q8_0 head): float32 rounding only
    runner = make_runner("float32:int4", tokenizer, 2, 8)
    a = compare(*ref, *greedy(runner, prompts, 32))
    assert a.num_identical >= 7 and a.mean_abs_dlogprob < 1e-3, a
    assert abs(perplexity(runner, text) / ppl_ref - 1) < 1e-3
    # int8: the Q4_1 layers requantized per channel (a second rounding of every weight)
    runner = make_runner("float32:int8", tokenizer, 2, 8)
    a = compare(*ref, *greedy(runner, prompts, 32))
    assert a.num_identical >= 2 and a.mean_common_prefix >= 14 and a.mean_abs_dlogprob < 0.06, a
    assert 0 < a.max_abs_dlogprob and abs(perplexity(runner, text) / ppl_ref - 1) < 0.02
    # int4 with int8 activations (quantize_activations, llama.cpp's arithmetic); measured (``...
    # --configs float32:int4+a8 --ppl-chunk 8``): 4/8 identical, mean common prefix 19.5 / 32,
    # mean |dlp| 0.024 (max 0.18), perplexity 27.594 (+0.5 %) with the held-out text prefilled 8
    # tokens per step, so that its logprobs come from the int8-activation kernels too (AMD EPYC);
    # 1/8 identical, prefix 14.0, |dlp| 0.026 (max 0.17) on an Intel Xeon, whose float32 reference
    # (MKL) differs: which near-tie flips a whole continuation moves with the CPU, |dlp| does not
    runner = make_runner("float32:int4+a8", tokenizer, 2, 8)
    a = compare(*ref, *greedy(runner, prompts, 32))
    assert a.num_identical >= 1 and a.mean_common_prefix >= 12 and a.mean_abs_dlogprob < 0.05, a
    ppl = perplexity(make_runner("float32:int4+a8", tokenizer, 2, 8, chunk=8), text)
    assert 0 < a.max_abs_dlogprob and 0 < abs(ppl / ppl_ref - 1) < 0.02
