"""Loading a Hugging Face checkpoint folder into a glocal model, and writing one back.

Loading builds the model abstractly (no random initialisation), then fills one glocal
parameter at a time: a host buffer of its stacked shape is filled layer by layer from the
memory-mapped safetensors (converted to the parameter dtype as it is copied), placed on
device, and dropped, so host memory holds the model once plus one parameter. Under an
active mesh and rule table (``jax.set_mesh`` + ``glocal.sharding.use_rules``) each parameter
is placed with the sharding its logical axes name, every device receiving only its slice.

Saving walks the same rules the other way, producing one Hugging Face tensor at a time
while the safetensors shards are written.
"""

from __future__ import annotations

import collections
import functools
import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

import glocal.models as gm
from glocal.pytree import path_name
from glocal import sharding as shd
from glocal.errors import UserError
from glocal.hf import configs, gpt_oss, qwen3_next, safetensors as st, weights

CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"


class HFFolderError(UserError, ValueError):
    """A model folder that is missing, incomplete, or would overwrite saved files."""


def read_config(folder) -> dict:
    folder = pathlib.Path(folder).expanduser()
    if not folder.is_dir():
        raise HFFolderError(f"{folder} is not a folder; pass a local Hugging Face model folder (config.json + "
                            f"model.safetensors or model.safetensors.index.json). Nothing is downloaded.")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise HFFolderError(f"{folder} has no {CONFIG_FILE}; a Hugging Face model folder needs one beside its "
                            f"safetensors.")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFFolderError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(hf, dict):
        raise HFFolderError(f"{path} must hold a JSON object.")
    return hf


# -- loading ----------------------------------------------------------------------------------
def from_pretrained(path, dtype: str = "float32", *, mesh=None, rules=None):
    """A glocal model (what ``glocal.models.build`` returns) with the weights of the local
    Hugging Face folder ``path``: Llama, Mistral, Qwen2, Qwen3 -> ``transformer``, Mixtral,
    Qwen3-Next, GPT-OSS -> ``moe``; also folders written by ``save_pretrained(..., format="glocal")`` (any family).
    ``dtype`` is the parameter and compute dtype. Sharded placement: pass ``mesh`` and
    ``rules`` (a ``glocal.sharding`` rule table), or call inside ``jax.set_mesh`` +
    ``use_rules``."""
    hf = read_config(path)
    reader = st.CheckpointReader(pathlib.Path(path).expanduser())
    if hf.get("format") == "glocal":
        config = gm.config_class(hf["model"]).from_dict(hf["config"])
        config = config.replace(dtype=dtype, param_dtype=dtype)
        return _assemble(config, _glocal_plan(config, reader), reader, mesh, rules)
    _, config = configs.to_glocal(hf, dtype)
    return _assemble(config, _hf_plan(config, reader), reader, mesh, rules)


def _hf_plan(config, reader) -> list:
    """``(variable path, layer index or None, rule)`` for every parameter of ``config``."""
    if gpt_oss.is_gpt_oss(config):
        gpt_oss.check_tensor_names(reader.keys(), reader.folder)
    fused = any(n.endswith(".mlp.experts.gate_up_proj") for n in reader.keys())
    plan = [(rule.path, None, rule) for rule in weights.top_rules(config)]
    for i in range(config.num_layers):
        plan += [(view.path, i, view) for rule in _layer_rules(config, i, fused)
                 for view in rule.views()]
    return plan


def _layer_rules(config, i: int, fused_experts: bool = False) -> list:
    if qwen3_next.is_qwen3_next(config):
        rules = qwen3_next.layer_rules
    elif gpt_oss.is_gpt_oss(config):
        rules = gpt_oss.layer_rules
    else:
        rules = weights.layer_rules
    return rules(config, i, fused_experts=fused_experts)


def _glocal_plan(config, reader) -> list:
    abstract = nnx.eval_shape(lambda: gm.build_from_config(config))
    plan = []
    for path, value in jax.tree_util.tree_flatten_with_path(nnx.state(abstract, nnx.Param))[0]:
        name = _glocal_name(path)
        plan.append((name, None, weights.Rule(name, (name,), (tuple(value.shape),), lambda w: w, lambda w: (w,))))
    return plan


def _glocal_name(path) -> str:
    """A parameter's name in the glocal format (``embed.table_VD``): its training-checkpoint
    path joined with dots."""
    return path_name(path, ".")


def _assemble(config, plan, reader, mesh, rules):
    abstract = nnx.eval_shape(lambda: gm.build_from_config(config))
    layers = weights.decoder_layers(abstract) if any(i is not None for _, i, _ in plan) else []
    mesh = mesh if mesh is not None else _active_mesh()
    rules = rules if rules is not None else shd.active_rules()
    groups = collections.defaultdict(list)  # one host buffer per glocal variable
    for path, i, rule in plan:
        owner, r = (abstract, None) if i is None else layers[i]
        groups[(id(owner), path)].append((owner, r, i, rule))
    _check_tensors(config, plan, reader)  # every name and shape before any is loaded
    for entries in groups.values():
        owner, _, _, rule = entries[0]
        var = weights.variable(owner, rule.path)
        sharding = _sharding(var, mesh, rules)
        # A stacked parameter is filled one layer at a time in place on the device, so host
        # memory never holds a second copy of it (and, sharded, each device gets its slice).
        stacked = _zeros(var.shape, var.dtype, sharding) if entries[0][1] is not None else None
        row_sharding = None if sharding is None else jax.sharding.NamedSharding(mesh, P(*sharding.spec[1:]))
        for _, r, i, rule in entries:
            value = np.asarray(rule.load(*[reader.get(n) for n in rule.names]), dtype=var.dtype)
            want = var.shape if r is None else var.shape[1:]
            if value.shape != tuple(want):  # a rule/config bug, not a user error
                raise AssertionError(f"{rule.path}: built {value.shape}, expected {want}")
            if r is None:
                stacked = _put(value, sharding)
            else:
                stacked = _set_row(sharding)(stacked, _put(value, row_sharding), r)
            del value
            for n in rule.names:
                reader.release(n)
        var.set_value(stacked)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    missing = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
               if isinstance(v, jax.ShapeDtypeStruct)]
    if missing:  # every parameter must have a rule
        raise AssertionError(f"no import rule filled {missing[:3]}")
    if jax.tree.leaves(rest):  # non-trained state is rebuilt from the config
        rest = jax.jit(lambda: nnx.split(gm.build_from_config(config), nnx.Param, ...)[2])()
    return nnx.merge(graphdef, params, rest)


def _check_tensors(config, plan, reader) -> None:
    """Missing tensors, wrong shapes and tensors the config does not explain, from the
    headers alone (a large import fails in a second, not after minutes)."""
    used = set()
    for path, layer, rule in plan:
        for name, shape in zip(rule.names, rule.shapes):
            where = f"glocal parameter {path}" + ("" if layer is None else f" of layer {layer}")
            if name not in reader:
                raise weights.HFWeightsError(
                    f"{reader.folder} has no tensor {name!r} (needed for the {where}); the checkpoint is incomplete "
                    f"or belongs to another architecture than config.json says.")
            found, _ = reader.info(name)
            if tuple(found) != tuple(shape):
                raise weights.HFWeightsError(
                    f"tensor {name!r} in {reader.folder} has shape {list(found)}, but config.json implies "
                    f"{list(shape)} (from hidden_size, num_attention_heads, num_key_value_heads, head_dim, "
                    f"intermediate_size, vocab_size); the config and the weights disagree.")
            used.add(name)
    extra = [n for n in reader.keys() if n not in used and not n.endswith(weights.IGNORED_SUFFIXES)
             and not n.startswith(weights.IGNORED_PREFIXES)
             and not (config.tie_embeddings and n == "lm_head.weight")]
    if extra:
        raise weights.HFWeightsError(
            f"{reader.folder} holds {len(extra)} tensors this {gm.model_name(config)} model does not use, e.g. "
            f"{', '.join(sorted(extra)[:3])}: the checkpoint has parts (biases, extra layers, another architecture) "
            f"its config.json does not describe; importing without them would give a different model.")


def _active_mesh():
    mesh = jax.sharding.get_mesh() if hasattr(jax.sharding, "get_mesh") else None
    return None if mesh is None or getattr(mesh, "empty", True) else mesh


def _sharding(var, mesh, rules):
    if mesh is None or rules is None:
        return None
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return jax.sharding.NamedSharding(mesh, shd.logical_to_spec(names, var.shape, mesh, rules))


def _put(value: np.ndarray, sharding):
    if sharding is None:
        return jnp.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _zeros(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


@functools.cache
def _set_row(sharding):
    """``x[r] = v`` with ``x`` donated (updated in place), keeping ``sharding``."""
    return jax.jit(lambda x, v, r: jax.lax.dynamic_update_index_in_dim(x, v.astype(x.dtype), r, 0),
                   donate_argnums=0, out_shardings=sharding)


# -- saving -----------------------------------------------------------------------------------
def save_pretrained(model, path, *, format: str = "auto", architecture: str | None = None,
                    config_extra: dict | None = None, max_shard_bytes: int = 2 << 30, dtype: str | None = None,
                    overwrite: bool = False) -> str:
    """Write ``model`` to the folder ``path`` and return the format written.

    ``format="hf"``: a Hugging Face folder (``config.json``, ``generation_config.json``,
    ``model.safetensors`` or shards above ``max_shard_bytes`` + index) that transformers loads
    as Llama / Mistral / Qwen2 / Qwen3 / Mixtral / Qwen3-Next / GPT-OSS; an error if the model has no such twin.
    ``format="glocal"``: the parameters under their glocal names + glocal's ``config.json``
    (any family; ``from_pretrained`` reads it back). ``"auto"``: hf when possible.
    ``architecture`` prefers an HF class the config fits (e.g. Mistral for a model
    imported from one); ``config_extra`` adds config fields (token ids); ``dtype`` casts
    the tensors (default: the model's ``param_dtype``). Refuses a non-empty ``path`` unless
    ``overwrite``, which first removes the model files there (stale shards would otherwise
    shadow the new ones): nothing saved is replaced silently."""
    if format not in ("auto", "hf", "glocal"):
        raise ValueError(f"format={format!r}: choose 'auto', 'hf' or 'glocal'.")
    config = model.config
    folder = pathlib.Path(path).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise HFFolderError(f"{folder} already exists and is not empty; export into a new folder (from Python, "
                            f"overwrite=True replaces the files in it).")
    arch = None
    if format != "glocal":
        try:
            arch = configs.export_architecture(config, prefer=architecture)
        except configs.HFConfigError as e:
            if format == "hf":
                raise
            if gm.model_name(config) in ("transformer", "moe"):  # a user may have expected a twin
                warnings.warn(f"{e} Writing the glocal format.", stacklevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in [*folder.glob("model*.safetensors"), folder / st.INDEX_FILE, folder / CONFIG_FILE,
                    folder / GENERATION_FILE]:
            old.unlink(missing_ok=True)
    requested, dtype = dtype, str(np.dtype(dtype or config.param_dtype))
    extra = dict(config_extra or {})
    if arch is None:
        tensors = _glocal_tensors(model, requested)
        record = configs.glocal_config_record(config)
    else:
        tensors = _hf_tensors(model, config, dtype)
        record = configs.to_hf(config, arch, dtype, extra)
    st.write_checkpoint(folder, tensors, max_shard_bytes=max_shard_bytes)
    (folder / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if arch is not None:
        generation = {"_from_model_config": True, **configs.bos_eos(extra)}
        (folder / GENERATION_FILE).write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    return "glocal" if arch is None else "hf"


def _hf_tensors(model, config, dtype: str) -> list:
    """``(name, shape, dtype, make)`` in Hugging Face order; ``make`` converts on demand."""
    layers = weights.decoder_layers(model)
    top = {rule.path: rule for rule in weights.top_rules(config)}
    plan = [(model, None, top.pop("embed.table_VD"))]
    for i, (owner, r) in enumerate(layers):
        plan += [(owner, r, rule) for rule in _layer_rules(config, i)]
    plan += [(model, None, rule) for rule in top.values()]
    cache = {}

    def make(owner, r, rule, j):
        key = (id(owner), r, rule.path)
        if key not in cache:
            cache.clear()  # one rule's outputs at a time (q, k, v come from one slice)
            values = [weights.variable(owner, p)[...] for p in rule.paths]
            cache[key] = rule.save(*[np.asarray(jax.device_get(v if r is None else v[r])) for v in values])
        return cache[key][j]

    # One dtype per checkpoint, as Hugging Face models expect: glocal keeps norm scales and the
    # router in float32 whatever param_dtype is (an imported bf16 value converts back exactly).
    dtype = np.dtype(dtype)
    out = []
    for owner, r, rule in plan:
        for j, (name, shape) in enumerate(zip(rule.names, rule.shapes)):
            out.append((name, shape, dtype, lambda o=owner, r=r, rule=rule, j=j: make(o, r, rule, j)))
    return out


def _glocal_tensors(model, dtype=None) -> list:
    """Every parameter under its glocal name, in its own dtype (or ``dtype``)."""
    out = []
    for path, var in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        out.append((_glocal_name(path), tuple(var.shape), np.dtype(dtype or var.dtype),
                    lambda v=var: np.asarray(jax.device_get(v))))
    return out
