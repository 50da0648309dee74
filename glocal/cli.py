"""The ``glocal`` command: ``glocal train ...``, ``glocal generate ...``, ``glocal convert`` /
``glocal export`` (Hugging Face checkpoints), ``glocal models``, ``glocal launch -n N -- ...``
(one command as N processes of a JAX job).

A user error (``glocal.errors.UserError``: a bad config value, path, data file or
generation argument) prints one ``glocal: error: ...`` message that says how to fix it and
exits 2, like argparse's own errors; ``glocal --debug ...`` shows its traceback instead.
Anything else is a bug and keeps its traceback. ``key=value`` overrides may come anywhere
among the options.
"""

from __future__ import annotations

import argparse
import sys


def _check_override_keys(overrides: dict[str, str], config_name: str | None, workdir) -> None:
    """Reject a key that is neither a training field nor a field of the run's model family
    (from --config, or the workdir's model.json), suggesting names from both sets."""
    import pathlib

    import glocal.models as gm
    from glocal import workdir as workdirs
    from glocal.train.config import split_overrides

    if config_name is not None:
        family = gm.split_config_name(config_name)[0]
    elif (pathlib.Path(workdir) / workdirs.MODEL_FILE).is_file():
        family = workdirs.read_model_file(workdir).get("model")
    else:
        return  # the command itself reports that the workdir holds no model
    split_overrides(overrides, family)


def _one_process(command: str) -> None:
    """Commands other than train run as one process: they read checkpoints written by any
    number of processes (orbax stores global arrays), and have no use for more."""
    from glocal.errors import UserError
    from glocal.train.distributed import wants_distributed

    if wants_distributed():
        raise UserError(f"glocal {command} runs as one process; run it on one host without glocal launch "
                        f"(it reads checkpoints written by any number of processes; under SLURM use srun -n 1, "
                        f"or set GLOCAL_DISTRIBUTED=0).")


def _train(args) -> int:
    from glocal.configs.base import parse_overrides
    from glocal.train.trainer import train
    from glocal.workdir import check_workdir

    overrides = parse_overrides(args.overrides)
    check_workdir(args.workdir, writable=True)
    _check_override_keys(overrides, args.config, args.workdir)
    result = train(args.config, args.workdir, overrides)
    return 143 if result.get("stopped") else 0  # 128 + SIGTERM: schedulers may requeue


def _eval(args) -> int:
    from glocal.configs.base import parse_overrides
    from glocal.train.evaluate import evaluate_workdir
    from glocal.workdir import check_workdir

    _one_process("eval")
    overrides = parse_overrides(args.overrides)
    check_workdir(args.workdir, writable=False)
    _check_override_keys(overrides, None, args.workdir)
    evaluate_workdir(args.workdir, step=args.step, overrides=overrides)
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
    from glocal.errors import UserError
    from glocal.tokenizers import decode_continuation, get_tokenizer, stop_ids

    _one_process("generate")
    overrides = parse_overrides(args.overrides)
    if args.workdir:
        if overrides:
            raise UserError("key=value overrides only apply to an untrained --config model; a "
                            "--workdir model keeps the config it was trained with.")
        workdirs.check_workdir(args.workdir, writable=False)
        model, step = workdirs.load_model(args.workdir, args.step)
        tokenizer = workdirs.load_tokenizer(args.workdir)
        source = f"# loaded {args.workdir} at step {step}"
    else:
        name, preset = gm.split_config_name(args.config)
        model = gm.build(name, preset, seed=args.seed, **overrides)
        tokenizer = get_tokenizer("byte")
        source = f"# untrained {args.config} (random weights)"
    # Hugging Face tokenizers add their own specials to a prompt (a Llama one prepends BOS).
    encode = getattr(tokenizer, "encode_prompt", tokenizer.encode)
    prompt = encode(args.prompt) or [tokenizer.bos_id]
    new = glocal.generate(model, [prompt], args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          stop_tokens=stop_ids(tokenizer))[0]
    print(source, file=sys.stderr)  # (after the arguments passed generate's checks)
    print(args.prompt + decode_continuation(tokenizer, prompt, new))
    return 0


def _convert(args) -> int:
    from glocal.configs.base import parse_overrides
    from glocal.hf import convert

    _one_process("convert")
    convert(args.from_hf, args.workdir, dtype=args.dtype, tokenizer=args.tokenizer,
            overrides=parse_overrides(args.overrides))
    return 0


def _export(args) -> int:
    from glocal.hf import export

    _one_process("export")
    export(args.workdir, args.to_hf, args.step, format=args.format,
           max_shard_bytes=_parse_size(args.max_shard_size), dtype=args.dtype)
    return 0


def _parse_size(text: str) -> int:
    """``"2GB"``, ``"500MB"``, ``"123"`` (bytes) -> bytes."""
    from glocal.errors import UserError

    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    size = None
    for unit, scale in units.items():
        if t.endswith(unit) and t[:-len(unit)].strip().replace(".", "", 1).isdigit():
            size = int(float(t[:-len(unit)]) * scale)
            break
    if size is None and t.isdigit():
        size = int(t)
    if size is not None and size > 0:
        return size
    raise UserError(f"--max-shard-size {text!r} is not a positive size; write e.g. 2GB, 500MB or a number of bytes.")


def _models(args) -> int:
    import glocal.models as gm

    for name in gm.list_models():
        print(f"{name}: presets {', '.join(gm.list_presets(name))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)  # accepted before or after the command
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of user errors too (they exit 2 with one message)")
    p = argparse.ArgumentParser(prog="glocal", description="Efficient transformer zoo (JAX/Flax).",
                                epilog="A user error prints one message and exits with status 2.")
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", parents=[debug],
                       help="train (or resume) a model; default data: the stdlib corpus")
    t.add_argument("--config", help="<model>_<preset>, e.g. transformer_small (optional when "
                                     "resuming an existing workdir)")
    t.add_argument("--workdir", required=True, help="where config, checkpoints and metrics go; "
                                                    "an existing workdir is resumed")
    t.add_argument("overrides", nargs="*", help="key=value for model or training fields, e.g. "
                                                "steps=200 mesh.data=2 data=PATH")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", parents=[debug],
                       help="validation loss / bits-per-byte of a workdir's checkpoint")
    e.add_argument("--workdir", required=True)
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    e.add_argument("overrides", nargs="*", help="key=value training fields, e.g. eval_batches=32")
    e.set_defaults(func=_eval)

    pl = sub.add_parser("plot", parents=[debug], help="loss curves of several workdirs on one figure")
    pl.add_argument("workdirs", nargs="+")
    pl.add_argument("-o", "--output", default="curves.png")
    pl.set_defaults(func=_plot)

    g = sub.add_parser("generate", parents=[debug],
                       help="continue a prompt with a saved or untrained model")
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

    c = sub.add_parser("convert", parents=[debug],
                       help="import a local Hugging Face folder (Llama, Mistral, Qwen2, Qwen3, Mixtral) into a new workdir")
    c.add_argument("--from-hf", required=True, metavar="DIR", help="config.json + safetensors (+ tokenizer.json)")
    c.add_argument("--workdir", required=True, help="a new workdir; generate, eval and train accept it")
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="parameter and compute dtype (default float32)")
    c.add_argument("--tokenizer", default=None, metavar="hf:DIR",
                   help="a tokenizer folder, when the model folder has no tokenizer.json")
    c.add_argument("overrides", nargs="*", help="key=value model options that keep the weights as they are, "
                                                "e.g. remat=full attention_impl=blockwise max_seq_len=4096")
    c.set_defaults(func=_convert)

    x = sub.add_parser("export", parents=[debug],
                       help="write a workdir's model as a Hugging Face folder (or glocal-format safetensors)")
    x.add_argument("--workdir", required=True)
    x.add_argument("--to-hf", required=True, metavar="DIR", help="a new folder")
    x.add_argument("--step", type=int, default=None, help="checkpoint step (default latest; 0: imported weights)")
    x.add_argument("--format", default="auto", choices=("auto", "hf", "glocal"),
                   help="hf: Llama/Mistral/Qwen2/Qwen3/Mixtral (error if the model has no twin); glocal: glocal names "
                        "and config; auto (default): hf when possible")
    x.add_argument("--max-shard-size", default="2GB", help="split safetensors above this size (default 2GB)")
    x.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="tensor dtype of the files (default: the model's parameter dtype)")
    x.set_defaults(func=_export)

    la = sub.add_parser("launch", add_help=False,
                        help="run a glocal command as N processes of one JAX job on this machine "
                             "(glocal launch --help)")
    la.add_argument("rest", nargs=argparse.REMAINDER)

    m = sub.add_parser("models", parents=[debug], help="list registered models and presets")
    m.set_defaults(func=_models)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may sit anywhere among the options (argparse
    alone takes one run of positionals only; the rest come back unrecognised, in order)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and not any(a.startswith("-") for a in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:  # its own parser: everything after -- is the command it runs
        from glocal.launch import main as launch_main

        return launch_main(argv[1:])
    args = parse_args(argv)
    from glocal.errors import UserError

    try:
        status = args.func(args)
    except UserError as e:
        if args.debug:
            _leave_job_after_traceback(e)
            raise
        print(f"glocal: error: {e}", file=sys.stderr)
        status = 2
    except BaseException as e:
        _leave_job_after_traceback(e)
        raise
    if _in_job():
        from glocal.train.distributed import finish, leave

        if status:
            leave(status)  # not through JAX's shutdown barrier, which waits for every process
        finish()
    return status


def _in_job() -> bool:
    if "jax" not in sys.modules:
        return False
    from glocal.train.distributed import in_job

    return in_job()


def _leave_job_after_traceback(error: BaseException) -> None:
    """In a multi-process job a failure must end this process now (a normal exit waits for
    the others at JAX's shutdown barrier, and they may be waiting for this one): a lost
    peer as one line, anything else (a bug) with its traceback; exit status 3 and 1."""
    if not _in_job():
        return
    import traceback

    from glocal.train import distributed

    if distributed.is_peer_loss(error):
        print(f"glocal: error: {distributed.peer_loss_message(error)}", file=sys.stderr)
        distributed.leave(distributed.PEER_LOST_EXIT)
    traceback.print_exception(error)
    distributed.leave(130 if isinstance(error, KeyboardInterrupt) else 1)


if __name__ == "__main__":
    raise SystemExit(main())
