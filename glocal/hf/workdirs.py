"""``glocal convert --from-hf DIR --workdir W`` and ``glocal export --workdir W --to-hf DIR``.

An imported workdir holds:

    W/model.json        the glocal model (as after training), tokenizer "hf:tokenizer" when
                        the folder had a tokenizer.json, else "byte"
    W/init/params       the imported weights (orbax), the step-0 model: ``generate`` and
                        ``eval`` read it while there is no checkpoint, ``train`` starts from it
    W/tokenizer/        the folder's tokenizer files (tokenizer.json, tokenizer_config.json...)
    W/hf_source/        its config.json and generation_config.json (token ids and the
                        architecture name, reused by ``export``)

Export writes a Hugging Face folder of the workdir's latest (or ``step``) parameters, with
the tokenizer files when the run used a Hugging Face tokenizer.

``glocal.workdir`` (orbax) is imported inside ``convert`` and ``export``, the two functions
that write and read orbax checkpoints, so ``import glocal.hf`` stays free of it.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import jax
from flax import nnx

import glocal.models as gm
from glocal.hf import checkpoint, configs
from glocal.hf.configs import HFConfigError
from glocal.hf.tokenizer import TOKENIZER_FILE, HFTokenizer

# The tokenizer's own copy of config.json (it may hold the token ids) stays out of an export.
_NOT_EXPORTED = (checkpoint.CONFIG_FILE, checkpoint.GENERATION_FILE)


def convert(hf_dir, workdir, dtype: str = "float32", *, tokenizer: str | None = None,
            overrides: dict | None = None, log=print) -> dict:
    """Import the Hugging Face folder ``hf_dir`` into a new workdir; returns a summary.

    ``tokenizer`` (``"hf:DIR"``) names a tokenizer when the folder has no tokenizer.json;
    ``overrides`` sets model fields that do not change the weights' meaning (``remat``,
    ``attention_impl``, ``max_seq_len``, ``scan_layers``...), e.g. for fine-tuning a large
    model. Everything is written into a temporary folder that becomes ``workdir`` only when
    complete, so an interrupted import leaves no half-made workdir behind."""
    from glocal import workdir as workdirs

    hf_dir, workdir = pathlib.Path(hf_dir).expanduser(), pathlib.Path(workdir).expanduser()
    workdirs.check_workdir(workdir, writable=True)
    if workdir.exists() and any(workdir.iterdir()):
        raise workdirs.WorkdirError(f"workdir {workdir} already exists and is not empty; convert into a new "
                                    f"--workdir (nothing in an existing one is replaced).")
    hf = checkpoint.read_config(hf_dir)
    model = checkpoint.from_pretrained(hf_dir, dtype=dtype)
    if overrides:
        config = model.config.replace(**overrides)
        abstract = nnx.eval_shape(lambda: gm.build_from_config(config))
        shapes = lambda m: [(x.shape, x.dtype) for x in jax.tree.leaves(nnx.state(m, nnx.Param))]
        if shapes(abstract) != shapes(model):
            raise HFConfigError(f"the overrides {sorted(overrides)} change the shapes or dtypes of the imported "
                                f"weights; only options such as remat, attention_impl, max_seq_len or scan_layers "
                                f"can be set at import (convert with --dtype for another dtype).")
        model = nnx.merge(nnx.graphdef(abstract), nnx.state(model))
    if tokenizer is not None:
        tok = HFTokenizer(tokenizer[3:] if tokenizer.startswith("hf:") else tokenizer)
    else:
        tok = HFTokenizer(hf_dir) if (hf_dir / TOKENIZER_FILE).is_file() else None
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise HFConfigError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                            f"{model.config.vocab_size}: they do not belong together.")
    workdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{workdir.name}.converting-", dir=workdir.parent.absolute()))
    try:
        workdirs.write_model_file(tmp, model.config, f"hf:{workdirs.TOKENIZER_DIR}" if tok else "byte")
        if tok is not None:
            tok.save(tmp / workdirs.TOKENIZER_DIR)
        (tmp / workdirs.HF_SOURCE_DIR).mkdir()
        for name in (checkpoint.CONFIG_FILE, checkpoint.GENERATION_FILE):
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, tmp / workdirs.HF_SOURCE_DIR / name)
        workdirs.save_init_params(tmp, nnx.state(model, nnx.Param))
        if workdir.exists():
            workdir.rmdir()  # (empty: checked above)
        tmp.rename(workdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    arch = (hf.get("architectures") or [hf.get("model_type", "?")])[0] if hf.get("format") != "glocal" \
        else hf.get("model")
    copied = [f.name for f in tok.files()] if tok is not None else []
    log(f"imported {hf_dir} ({arch}) as {gm.model_name(model.config)} into {workdir}"
        + (f"; tokenizer files: {', '.join(copied)}" if copied else "; no tokenizer.json: byte tokenizer recorded "
           "(pass --tokenizer hf:DIR to use one)"))
    return {"workdir": str(workdir), "architecture": arch, "tokenizer_files": copied}


def export(workdir, hf_dir, step: int | None = None, *, format: str = "auto", max_shard_bytes: int = 2 << 30,
           dtype: str | None = None, log=print) -> dict:
    """Write the workdir's model at ``step`` (default: latest) to the new folder ``hf_dir``."""
    from glocal import workdir as workdirs

    workdir, hf_dir = pathlib.Path(workdir).expanduser(), pathlib.Path(hf_dir).expanduser()
    workdirs.check_workdir(workdir, writable=False)
    model, step = workdirs.load_model(workdir, step)
    source = _read_json(workdir / workdirs.HF_SOURCE_DIR / checkpoint.CONFIG_FILE)
    extra = configs.bos_eos(source)
    tokenizer = workdirs.load_tokenizer(workdir)
    hf_tokenizer = tokenizer if isinstance(tokenizer, HFTokenizer) else None
    if hf_tokenizer is not None and not extra:  # a model trained here with that tokenizer
        extra = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.eos_ids) if
                 len(tokenizer.eos_ids) > 1 else tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    prefer = (source.get("architectures") or [None])[0]
    written = checkpoint.save_pretrained(model, hf_dir, format=format, architecture=prefer, config_extra=extra,
                                         max_shard_bytes=max_shard_bytes, dtype=dtype)
    copied = []
    for src in hf_tokenizer.files() if hf_tokenizer is not None else ():
        if src.name not in _NOT_EXPORTED:
            shutil.copy2(src, hf_dir / (TOKENIZER_FILE if src == hf_tokenizer.file else src.name))
            copied.append(src.name)
    generation = workdir / workdirs.HF_SOURCE_DIR / checkpoint.GENERATION_FILE
    if written == "hf" and generation.is_file():  # the original sampling defaults, not just token ids
        shutil.copy2(generation, hf_dir / checkpoint.GENERATION_FILE)
    what = "Hugging Face" if written == "hf" else "glocal-format (no Hugging Face twin)"
    log(f"exported {workdir} step {step} as a {what} folder {hf_dir}"
        + (f" with tokenizer files {', '.join(copied)}" if copied else ""))
    return {"step": step, "format": written, "tokenizer_files": copied}


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}
