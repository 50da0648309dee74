"""The ``glocal`` command: ``glocal train ...``, ``glocal generate ...``, ``glocal models``."""

from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    from glocal.configs.base import parse_overrides
    from glocal.train.trainer import train

    train(args.config, args.workdir, parse_overrides(args.overrides))
    return 0


def _generate(args) -> int:
    import glocal
    import glocal.models as gm
    from glocal import checkpoint
    from glocal.configs.base import parse_overrides
    from glocal.tokenizers import get_tokenizer

    overrides = parse_overrides(args.overrides)
    if args.workdir:
        if overrides:
            raise SystemExit("key=value overrides only apply to an untrained --config model.")
        model, step = checkpoint.load_model(args.workdir, args.step)
        tokenizer = get_tokenizer(checkpoint.read_model_file(args.workdir).get("tokenizer"))
        print(f"# loaded {args.workdir} at step {step}", file=sys.stderr)
    else:
        name, preset = gm.split_config_name(args.config)
        model = gm.build(name, preset, seed=args.seed, **overrides)
        tokenizer = get_tokenizer("byte")
        print(f"# untrained {args.config} (random weights)", file=sys.stderr)
    prompt = tokenizer.encode(args.prompt) or [tokenizer.bos_id]
    new = glocal.generate(model, [prompt], args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          stop_tokens=[tokenizer.eos_id])[0]
    print(args.prompt + tokenizer.decode(new))
    return 0


def _models(args) -> int:
    import glocal.models as gm

    for name in gm.list_models():
        print(f"{name}: presets {', '.join(gm.list_presets(name))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glocal", description="Efficient transformer zoo (JAX/Flax).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on the default corpus")
    t.add_argument("--config", required=True, help="<model>_<preset>, e.g. transformer_small")
    t.add_argument("--workdir", required=True, help="where config, checkpoints and metrics go")
    t.add_argument("overrides", nargs="*", help="key=value for model or training fields")
    t.set_defaults(func=_train)

    g = sub.add_parser("generate", help="continue a prompt with a saved or untrained model")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a trained workdir")
    src.add_argument("--config", help="an untrained preset, e.g. transformer_tiny")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    g.add_argument("overrides", nargs="*", help="key=value model overrides (with --config)")
    g.set_defaults(func=_generate)

    m = sub.add_parser("models", help="list registered models and presets")
    m.set_defaults(func=_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from glocal.checkpoint import WorkdirError
    from glocal.configs.base import ConfigError

    try:
        return args.func(args)
    except (ConfigError, WorkdirError) as e:
        print(f"glocal: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
