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
"""

from __future__ import annotations

import json
import pathlib
import shutil

from flax import nnx

from glocal import workdir as workdirs
from glocal.hf import checkpoint, configs
from glocal.hf.configs import HFConfigError
from glocal.hf_tokenizer import TOKENIZER_FILE, HFTokenizer

SOURCE_DIR = "hf_source"
# The tokenizer's own copy of config.json (it may hold the token ids) stays out of an export.
_NOT_EXPORTED = (checkpoint.CONFIG_FILE, checkpoint.GENERATION_FILE)


def convert(hf_dir, workdir, dtype: str = "float32", log=print) -> dict:
    """Import the Hugging Face folder ``hf_dir`` into a new workdir; returns a summary."""
    hf_dir, workdir = pathlib.Path(hf_dir).expanduser(), pathlib.Path(workdir).expanduser()
    workdirs.check_workdir(workdir, writable=True)
    if workdir.exists() and any(workdir.iterdir()):
        raise workdirs.WorkdirError(f"workdir {workdir} already exists and is not empty; convert into a new "
                                    f"--workdir (nothing in an existing one is replaced).")
    hf = checkpoint.read_config(hf_dir)
    model = checkpoint.from_pretrained(hf_dir, dtype=dtype)
    tokenizer = HFTokenizer(hf_dir) if (hf_dir / TOKENIZER_FILE).is_file() else None
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise HFConfigError(f"{hf_dir}/{TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but the model's "
                            f"vocab_size is {model.config.vocab_size}: they do not belong together.")
    workdirs.write_model_file(workdir, model.config, f"hf:{workdirs.TOKENIZER_DIR}" if tokenizer else "byte")
    copied = []
    if tokenizer is not None:
        tokenizer.save(workdir / workdirs.TOKENIZER_DIR)
        copied = [f.name for f in tokenizer.files()]
    (workdir / SOURCE_DIR).mkdir()
    for name in (checkpoint.CONFIG_FILE, checkpoint.GENERATION_FILE):
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, workdir / SOURCE_DIR / name)
    workdirs.save_init_params(workdir, nnx.state(model, nnx.Param))
    arch = hf.get("architectures", ["?"])[0] if hf.get("format") != "glocal" else hf.get("model")
    log(f"imported {hf_dir} ({arch}) as {workdirs.read_model_file(workdir)['model']} into {workdir}"
        + (f"; tokenizer files: {', '.join(copied)}" if copied else "; no tokenizer.json: byte tokenizer recorded"))
    return {"workdir": str(workdir), "architecture": arch, "tokenizer_files": copied}


def export(workdir, hf_dir, step: int | None = None, *, format: str = "auto", max_shard_bytes: int = 2 << 30,
           log=print) -> dict:
    """Write the workdir's model at ``step`` (default: latest) to the new folder ``hf_dir``."""
    workdir, hf_dir = pathlib.Path(workdir).expanduser(), pathlib.Path(hf_dir).expanduser()
    workdirs.check_workdir(workdir, writable=False)
    model, step = workdirs.load_model(workdir, step)
    source = _read_json(workdir / SOURCE_DIR / checkpoint.CONFIG_FILE)
    extra = configs.bos_eos(source)
    tokenizer = workdirs.load_tokenizer(workdir)
    hf_tokenizer = tokenizer if isinstance(tokenizer, HFTokenizer) else None
    if hf_tokenizer is not None and not extra:  # a model trained here with that tokenizer
        extra = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.eos_ids) if
                 len(tokenizer.eos_ids) > 1 else tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    prefer = (source.get("architectures") or [None])[0]
    written = checkpoint.save_pretrained(model, hf_dir, format=format, architecture=prefer, config_extra=extra,
                                         max_shard_bytes=max_shard_bytes)
    copied = []
    for src in hf_tokenizer.files() if hf_tokenizer is not None else ():
        if src.name not in _NOT_EXPORTED:
            shutil.copy2(src, hf_dir / (TOKENIZER_FILE if src == hf_tokenizer.file else src.name))
            copied.append(src.name)
    generation = workdir / SOURCE_DIR / checkpoint.GENERATION_FILE
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
