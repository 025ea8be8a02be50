"""The ``tandem`` command.

    tandem serve --config PATH [--host H] [--port N] [--address RAY_ADDRESS]
    tandem generate --config PATH [--chat] [--temperature T] [--max-tokens N] [--json] PROMPT...
    tandem bench (--url URL | --config PATH | --compare PATH...) [--workload ...] [--rates ...]
    tandem scale --url URL --pool decode --replicas N [--api-key KEY] [--wait S]

``serve`` is ``coordinator.launch`` (a torch-free coordinator over Ray actors). ``generate``
runs the in-process engine (``engine.llm.LLM``) on all prompts as one batch; the engine is
imported inside the subcommand so that ``serve`` never loads torch. ``bench`` is
``bench.tandem_bench`` (torch-free too): serving metrics against an OpenAI-compatible server.
"""

from __future__ import annotations

import argparse
import json
import sys

from core.config import ConfigError, TandemConfig, load_config


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="run prompts through the in-process engine")
    gen.add_argument("--config", required=True, help="a YAML topology: its model and KV cache")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, help="makes sampling reproducible")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")


def engine_config_fields(config: TandemConfig) -> dict:
    """EngineConfig fields for one in-process engine: the serving pool's cache and limits, and
    every core of this machine (one process owns it)."""
    from coordinator.worker_specs import engine_fields

    pool = config.pool("colocated" if config.mode == "colocated" else "decode")
    fields = engine_fields(config, pool)
    fields["num_threads"] = None
    fields["device"] = "auto"
    return fields


def generate(args: argparse.Namespace) -> int:
    from core.sampling_params import SamplingParams

    try:
        config = load_config(args.config)
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    except (ConfigError, OSError, ValueError) as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 2
    from engine.engine_config import EngineConfig  # torch: only this subcommand loads it
    from engine.llm import LLM

    llm = LLM(EngineConfig(**engine_config_fields(config)))
    prompts = [llm.encode_chat(p) if args.chat else p for p in args.prompts]
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(args.prompts, outputs, strict=True):
        if args.json:
            record = {
                "prompt": prompt,
                "text": out.text,
                "token_ids": out.token_ids,
                "prompt_token_ids": out.prompt_token_ids,
                "finish_reason": out.finish_reason,
            }
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            print(f"=== {prompt}\n{out.text}\n[{out.finish_reason}]", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from bench import tandem_bench
    from coordinator import scale_cli
    from coordinator.launch import add_arguments, run

    parser = argparse.ArgumentParser(prog="tandem", description="Disaggregated LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a topology over HTTP (OpenAI-compatible)")
    add_arguments(serve)
    _generate_parser(sub)
    bench = sub.add_parser(
        "bench",
        help="serving benchmark: TTFT/TPOT/ITL/E2E, throughput, goodput, plot",
        description=tandem_bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tandem_bench.add_arguments(bench)
    scale = sub.add_parser("scale", help="resize a pool of a running server (live scaling)",
                           description=scale_cli.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    scale_cli.add_arguments(scale)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return run(args)
    if args.command == "bench":
        return tandem_bench.run(args)
    if args.command == "scale":
        return scale_cli.run(args)
    return generate(args)


if __name__ == "__main__":
    sys.exit(main())
