"""The ``glocal`` command: ``glocal train ...``, ``glocal generate ...``, ``glocal models``."""

from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    from glocal.configs.base import parse_overrides
    from glocal.train.trainer import train

    result = train(args.config, args.workdir, parse_overrides(args.overrides))
    return 143 if result.get("stopped") else 0  # 128 + SIGTERM: schedulers may requeue


def _eval(args) -> int:
    from glocal.configs.base import parse_overrides
    from glocal.train.evaluate import evaluate_workdir

    evaluate_workdir(args.workdir, step=args.step, overrides=parse_overrides(args.overrides))
    return 0


def _plot(args) -> int:
    from glocal.train.plot import plot_runs

    out = plot_runs(args.workdirs, args.output)
    print(f"wrote {out}")
    return 0


def _generate(args) -> int:
    import glocal
    import glocal.models as gm
    from glocal import workdir as workdirs
    from glocal.configs.base import parse_overrides
    from glocal.tokenizers import get_tokenizer

    overrides = parse_overrides(args.overrides)
    if args.workdir:
        if overrides:
            raise SystemExit("key=value overrides only apply to an untrained --config model.")
        model, step = workdirs.load_model(args.workdir, args.step)
        tokenizer = get_tokenizer(workdirs.read_model_file(args.workdir).get("tokenizer"))
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

    t = sub.add_parser("train", help="train (or resume) a model; default data: the stdlib corpus")
    t.add_argument("--config", help="<model>_<preset>, e.g. transformer_small (optional when "
                                     "resuming an existing workdir)")
    t.add_argument("--workdir", required=True, help="where config, checkpoints and metrics go; "
                                                    "an existing workdir is resumed")
    t.add_argument("overrides", nargs="*", help="key=value for model or training fields, e.g. "
                                                "steps=200 mesh.data=2 data=PATH")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="validation loss / bits-per-byte of a workdir's checkpoint")
    e.add_argument("--workdir", required=True)
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    e.add_argument("overrides", nargs="*", help="key=value training fields, e.g. eval_batches=32")
    e.set_defaults(func=_eval)

    pl = sub.add_parser("plot", help="loss curves of several workdirs on one figure")
    pl.add_argument("workdirs", nargs="+")
    pl.add_argument("-o", "--output", default="curves.png")
    pl.set_defaults(func=_plot)

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
    from glocal.workdir import WorkdirError
    from glocal.configs.base import ConfigError
    from glocal.sharding import ShardingError
    from glocal.train.data import DataError

    try:
        return args.func(args)
    except (ConfigError, WorkdirError, DataError, ShardingError) as e:
        print(f"glocal: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
