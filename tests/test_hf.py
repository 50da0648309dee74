"""Hugging Face interop against transformers itself: tiny random Llama / Mistral / Qwen3 /
Mixtral models built with transformers (GQA, a non-default rope theta, an odd vocabulary)
are imported and must give the same logits (<= 1e-4, float32) and the same 32-token greedy
continuation; glocal models exported must load in transformers with the same numbers; import
-> export -> import is bitwise; bad folders give errors that name the problem."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import glocal  # noqa: E402
import glocal.hf  # noqa: E402
import glocal.models as gm  # noqa: E402
from glocal.hf import safetensors as st  # noqa: E402

torch.set_num_threads(1)  # the suite runs two workers on two cores
V, CONTEXT = 97, 96
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=CONTEXT, rope_theta=5000.0, rms_norm_eps=1e-5)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # A 6-token window: the 24-token prompts and 32-token continuations cross it many times.
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6}),
    # Sliding layers after the first (max_window_layers=1), q/k/v biases.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 6,
                                                  "max_window_layers": 1}),
    # head_dim 24 != hidden / heads = 16, as Qwen3 checkpoints do.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def hf_model(arch: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra = ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # norms start at 1: randomise them so a swapped scale cannot pass
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            if name.endswith("proj.bias"):  # (zero at init)
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One saved transformers model per architecture (saved once for the module)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for arch in ARCHS:
        hf_model(arch).save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def glocal_logits(model, tokens):
    out = model(jnp.asarray(tokens))
    return np.asarray(out[0])


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():  # (an explicit mask: left alone, generate masks every pad-id token)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def tokens(seed, shape=(2, 24)):
    return np.random.default_rng(seed).integers(0, V, shape)


def params_of(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_import_matches_transformers(arch, folders):
    ref = transformers.AutoModelForCausalLM.from_pretrained(folders[arch]).eval()
    model = glocal.hf.from_pretrained(folders[arch])
    assert gm.model_name(model.config) == ("moe" if arch == "mixtral" else "transformer")
    x = tokens(1)
    diff = np.abs(glocal_logits(model, x) - hf_logits(ref, x)).max()
    assert diff <= 1e-4, f"{arch}: max |logit difference| {diff}"
    prompt = tokens(2, (24,)).tolist()
    ours = glocal.generate(model, [prompt], 32)[0]
    assert ours == hf_greedy(ref, prompt, 32)


# Short original context so all three llama3 regimes (kept, blended, divided) occur at head_dim 16.
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 5000.0}


@pytest.mark.parametrize("scaling", [LLAMA3, {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}],
                         ids=["llama3", "linear"])
def test_rope_scaling_both_ways(scaling, tmp_path):
    ref = hf_model("llama", rope_parameters=scaling)
    ref.save_pretrained(tmp_path / "src")
    model = glocal.hf.from_pretrained(tmp_path / "src")
    assert model.config.rope_scaling == scaling["rope_type"] and model.config.rope_factor == scaling["factor"]
    x = tokens(9, (2, 80))
    assert np.abs(glocal_logits(model, x) - hf_logits(ref, x)).max() <= 1e-4
    unscaled = nnx.merge(nnx.graphdef(gm.build_from_config(model.config.replace(rope_scaling=None))),
                         nnx.state(model))
    assert np.abs(glocal_logits(unscaled, x) - hf_logits(ref, x)).max() > 1e-3  # the scaling matters here
    glocal.hf.save_pretrained(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert np.abs(hf_logits(back, x) - hf_logits(ref, x)).max() <= 1e-5
    assert glocal.hf.from_pretrained(tmp_path / "out").config == model.config


def test_mistral_window_is_exact(folders):
    """The window must be W tokens including the query (transformers: j > i - W): one token
    more or less changes the logits past the window."""
    model = glocal.hf.from_pretrained(folders["mistral"])
    assert model.config.layer_pattern == "s" and model.config.options["window"].size == 6
    ref = transformers.AutoModelForCausalLM.from_pretrained(folders["mistral"]).eval()
    x = tokens(3)
    want = hf_logits(ref, x)
    assert np.abs(glocal_logits(model, x) - want).max() <= 1e-4
    for other in (5, 7):
        shifted = nnx.merge(nnx.graphdef(gm.build_from_config(model.config.replace(sliding_window=other))),
                            nnx.state(model))
        assert np.abs(glocal_logits(shifted, x) - want).max() > 1e-3


EXPORTS = {  # a glocal model per target architecture (random init, odd vocabulary, GQA, theta 5000)
    "llama": ("transformer", dict(layer_pattern="g")),
    "mistral": ("transformer", dict(layer_pattern="s", sliding_window=6)),
    "qwen2": ("transformer", dict(qkv_bias=True, layer_pattern="gs", sliding_window=6)),
    "qwen3": ("transformer", dict(qk_norm=True, head_dim=24, layer_pattern="sg", sliding_window=6)),
    "mixtral": ("moe", dict(num_experts=4, top_k=2, d_expert=None, num_layers=2, first_dense_layers=0, moe_every=1,
                        router_z_weight=0.0)),
}


@pytest.mark.parametrize("arch", list(EXPORTS))
def test_export_loads_in_transformers(arch, tmp_path):
    family, fields = EXPORTS[arch]
    model = gm.build(family, "tiny", seed=3, vocab_size=V, num_kv_heads=2, rope_theta=5000.0, norm_eps=1e-5,
                     max_seq_len=CONTEXT, **fields)
    with jax.default_device(jax.devices("cpu")[0]):  # randomise the norm scales (all ones at init)
        state = nnx.state(model, nnx.Param)
        key = iter(jax.random.split(jax.random.key(0), 64))
        state = jax.tree_util.tree_map_with_path(
            lambda p, v: v * jax.random.uniform(next(key), v.shape, minval=0.5, maxval=1.5)
            if "scale" in jax.tree_util.keystr(p) else
            v + 0.5 * jax.random.normal(next(key), v.shape) if "_b_" in jax.tree_util.keystr(p) else v, state)
        nnx.update(model, state)
    assert glocal.hf.save_pretrained(model, tmp_path / "out", max_shard_bytes=60_000) == "hf"
    assert (tmp_path / "out" / st.INDEX_FILE).is_file()  # small shards: the index path
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(ref).__name__ == ARCHS[arch][1]
    x = tokens(4)
    diff = np.abs(glocal_logits(model, x) - hf_logits(ref, x)).max()
    assert diff <= 1e-4, f"{arch}: max |logit difference| {diff}"
    prompt = tokens(5, (24,)).tolist()
    assert glocal.generate(model, [prompt], 32)[0] == hf_greedy(ref, prompt, 32)
    back = glocal.hf.from_pretrained(tmp_path / "out")
    assert back.config == model.config
    assert all(np.array_equal(a, b) for a, b in zip(params_of(model), params_of(back)))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_import_export_import_is_bitwise(arch, folders, tmp_path):
    first = glocal.hf.from_pretrained(folders[arch])
    glocal.hf.save_pretrained(first, tmp_path / "again")
    second = glocal.hf.from_pretrained(tmp_path / "again")
    assert second.config == first.config
    a, b = params_of(first), params_of(second)
    assert len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))
    # and the files hold the original tensors bit for bit
    src, out = st.CheckpointReader(folders[arch]), st.CheckpointReader(tmp_path / "again")
    assert sorted(src.keys()) == sorted(out.keys())
    assert all(np.array_equal(src.get(n), out.get(n)) for n in src.keys())


def test_bfloat16_sharded_checkpoint(tmp_path):
    """A bf16 checkpoint split over several files imports exactly (float32 upcast or bf16)."""
    ref = hf_model("llama").to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "bf16", max_shard_size="40KB")
    assert (tmp_path / "bf16" / st.INDEX_FILE).is_file()
    assert st.CheckpointReader(tmp_path / "bf16").dtypes() == {"bfloat16"}
    f32 = glocal.hf.from_pretrained(tmp_path / "bf16")
    bf16 = glocal.hf.from_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert {x.dtype for x in params_of(bf16)} >= {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(params_of(f32), params_of(bf16)):
        assert np.array_equal(a, b.astype(np.float32))  # bf16 -> f32 is exact
    x = tokens(6)
    want = hf_logits(ref.float(), x)  # the same bf16 weights computed in float32
    assert np.abs(glocal_logits(f32, x) - want).max() <= 1e-4
    assert np.abs(glocal_logits(bf16, x) - want).max() < 0.5  # bf16 compute: close, not equal
    glocal.hf.save_pretrained(bf16, tmp_path / "out")
    assert st.CheckpointReader(tmp_path / "out").dtypes() == {"bfloat16"}
    src, out = st.CheckpointReader(tmp_path / "bf16"), st.CheckpointReader(tmp_path / "out")
    assert all(np.array_equal(src.get(n).view(np.uint16), out.get(n).view(np.uint16)) for n in src.keys())


def test_tied_embeddings(tmp_path):
    ref = hf_model("qwen3", tie_word_embeddings=True)
    ref.save_pretrained(tmp_path / "tied")
    model = glocal.hf.from_pretrained(tmp_path / "tied")
    assert model.config.tie_embeddings and model.head is None
    x = tokens(7)
    assert np.abs(glocal_logits(model, x) - hf_logits(ref, x)).max() <= 1e-4
    glocal.hf.save_pretrained(model, tmp_path / "out")
    assert "lm_head.weight" not in st.CheckpointReader(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert np.abs(hf_logits(back, x) - hf_logits(ref, x)).max() <= 1e-5


# -- bad folders ------------------------------------------------------------------------------
def _copy(folders, arch, tmp_path):
    out = tmp_path / arch
    shutil.copytree(folders[arch], out)
    return out


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(folder, edit):
    reader = st.CheckpointReader(folder)
    tensors = edit({n: np.array(reader.get(n)) for n in reader.keys()})
    del reader
    (folder / st.SINGLE_FILE).unlink()
    st.write_checkpoint(folder, [(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()])


def test_missing_tensor_is_named(folders, tmp_path):
    folder = _copy(folders, "llama", tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_tensors(folder, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(glocal.hf.HFWeightsError, match=r"no tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        glocal.hf.from_pretrained(folder)


def test_shape_mismatch_is_named(folders, tmp_path):
    folder = _copy(folders, "llama", tmp_path)
    _edit_config(folder, num_key_value_heads=4)  # the weights have 2 kv heads
    with pytest.raises(glocal.hf.HFWeightsError, match=r"k_proj\.weight.*shape \[32, 64\].*implies \[64, 64\]"):
        glocal.hf.from_pretrained(folder)


def test_unused_tensor_is_refused(folders, tmp_path):
    folder = _copy(folders, "llama", tmp_path)
    _rewrite_tensors(folder, lambda t: {**t, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
    with pytest.raises(glocal.hf.HFWeightsError, match=r"q_proj\.bias"):
        glocal.hf.from_pretrained(folder)


@pytest.mark.parametrize("changes,match", [
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}, "rope_parameters": None}, "rope scaling type 'longrope'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5000.0}}, "rope scaling type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 2.0, "rope_theta": 5000.0}}, "lacks the field"),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_unsupported_config_is_named(changes, match, folders, tmp_path):
    folder = _copy(folders, "llama", tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(glocal.hf.HFConfigError, match=match):
        glocal.hf.from_pretrained(folder)


def test_bad_folders(folders, tmp_path):
    with pytest.raises(glocal.hf.HFFolderError, match="not a folder"):
        glocal.hf.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(glocal.hf.HFFolderError, match="no config.json"):
        glocal.hf.from_pretrained(tmp_path / "empty")
    folder = _copy(folders, "llama", tmp_path)
    (folder / st.SINGLE_FILE).write_bytes((folder / st.SINGLE_FILE).read_bytes()[:5000])  # truncated
    with pytest.raises(glocal.hf.SafetensorsError, match="truncated"):
        glocal.hf.from_pretrained(folder)
    (folder / st.SINGLE_FILE).unlink()
    with pytest.raises(glocal.hf.SafetensorsError, match="neither model.safetensors"):
        glocal.hf.from_pretrained(folder)


def test_export_refusals(tmp_path):
    based = gm.build("based", "tiny")
    with pytest.raises(glocal.hf.HFConfigError, match="no Hugging Face twin"):
        glocal.hf.save_pretrained(based, tmp_path / "a", format="hf")
    moe = gm.build("moe", "tiny", router="expert_choice")
    with pytest.raises(glocal.hf.HFConfigError, match="router='expert_choice'"):
        glocal.hf.save_pretrained(moe, tmp_path / "b", format="hf")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(glocal.hf.HFFolderError, match="not empty"):
        glocal.hf.save_pretrained(gm.build("transformer", "tiny"), tmp_path / "c")
    assert (tmp_path / "c" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("family", ["fit", "block", "based", "mor"])
def test_other_families_round_trip_in_glocal_format(family, tmp_path):
    model = gm.build(family, "tiny", seed=1)
    assert glocal.hf.save_pretrained(model, tmp_path / family) == "glocal"
    record = json.loads((tmp_path / family / "config.json").read_text())
    assert record["format"] == "glocal" and record["model"] == family
    # readable by the safetensors library itself (what other tools use)
    from safetensors.numpy import load_file
    loaded = load_file(str(tmp_path / family / st.SINGLE_FILE))
    assert sum(a.size for a in loaded.values()) == sum(a.size for a in params_of(model))
    back = glocal.hf.from_pretrained(tmp_path / family)
    assert back.config == model.config
    assert all(np.array_equal(a, b) for a, b in zip(params_of(model), params_of(back)))


# -- the command line: convert, generate, fine-tune, export, load in transformers ----------------
def test_fine_tune_round_trip_through_the_cli(tmp_path, capsys):
    from glocal import workdir as workdirs
    from glocal.cli import main
    from tests.test_hf_tokenizer import SENTENCES, make_tokenizer

    src = tmp_path / "llama"
    tok = make_tokenizer(src, vocab_size=300)
    ref = hf_model("llama", vocab_size=301, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # (odd, > tokenizer)
    ref.save_pretrained(src)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(SENTENCES * 40))
    wd, out0, out = tmp_path / "wd", tmp_path / "step0", tmp_path / "tuned"

    assert main(["convert", "--from-hf", str(src), "--workdir", str(wd)]) == 0
    assert workdirs.read_model_file(wd)["tokenizer"] == "hf:tokenizer"
    assert main(["convert", "--from-hf", str(src), "--workdir", str(wd)]) == 2  # never over a workdir
    # generate from the imported weights == transformers' greedy continuation of the same prompt
    capsys.readouterr()
    assert main(["generate", "--workdir", str(wd), "--prompt", "the cat", "--max-new-tokens", "8"]) == 0
    prompt = tok.encode("the cat").ids
    want = tok.decode(prompt + hf_greedy(ref, prompt, 8), skip_special_tokens=True)
    assert capsys.readouterr().out.rstrip("\n") == want
    # step 0 exports the imported tensors bit for bit
    assert main(["export", "--workdir", str(wd), "--to-hf", str(out0)]) == 0
    a, b = st.CheckpointReader(src), st.CheckpointReader(out0)
    assert all(np.array_equal(a.get(n), b.get(n)) for n in a.keys())
    # fine-tune a few steps on a text file with the imported tokenizer, export, load in transformers
    run = ["batch_size=2", "seq_len=32", "steps=2", "eval_batches=1", "sample_tokens=0", "warmup_steps=1",
           "learning_rate=1e-4", "checkpoint_every=2", "tensorboard=false", f"data={text}"]
    assert main(["train", "--workdir", str(wd), *run]) == 0
    assert "starting from the imported weights" in capsys.readouterr().out
    assert main(["eval", "--workdir", str(wd)]) == 0  # the same data (runs.jsonl), through the tokenizer
    assert "bits-per-byte" in capsys.readouterr().out
    assert main(["export", "--workdir", str(wd), "--to-hf", str(out), "--max-shard-size", "100KB"]) == 0
    assert (out / st.INDEX_FILE).is_file() and (out / "tokenizer.json").is_file()
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = workdirs.load_model(wd)
    x = tokens(8)
    assert np.abs(glocal_logits(ours, x) - hf_logits(tuned, x)).max() <= 1e-4
    # the run started from the imported weights: every tensor moved a little, none was redrawn
    c = st.CheckpointReader(out)
    rel = [np.linalg.norm(c.get(n) - a.get(n)) / np.linalg.norm(a.get(n)) for n in a.keys()]
    assert 0 < max(rel) < 0.05, max(rel)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.decode(hf_tok("the cat sat")["input_ids"], skip_special_tokens=True) == "the cat sat"
    assert main(["export", "--workdir", str(wd), "--to-hf", str(out)]) == 2  # never over a folder


def test_sharded_import_places_each_tensor(sharded):
    """From tests/sharded_check.py (8 fake devices): a folder loaded onto a data 2 x fsdp 2 x
    tensor 2 mesh has every parameter sharded as its logical axes say, same logits."""
    r = sharded["hf_sharded"]
    assert r["wrong"] == [] and r["split_params"] >= 5
    assert r["logit_diff"] <= 1e-4  # (sharded matmuls sum in another order: ~4e-6 seen)


# -- review cases: folder hygiene, config rules that must match transformers' ------------------
def test_overwrite_removes_stale_shards(tmp_path):
    a = gm.build("transformer", "tiny", seed=1, vocab_size=V)
    b = gm.build("transformer", "tiny", seed=2, vocab_size=V)
    glocal.hf.save_pretrained(a, tmp_path / "out", max_shard_bytes=20_000)
    assert (tmp_path / "out" / st.INDEX_FILE).is_file()
    glocal.hf.save_pretrained(b, tmp_path / "out", overwrite=True)  # one file now: the old shards must go
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    assert all(np.array_equal(x, y) for x, y in zip(params_of(b), params_of(glocal.hf.from_pretrained(tmp_path / "out"))))
    # a folder holding both layouts is ambiguous (loaders disagree on which wins): refused
    glocal.hf.save_pretrained(a, tmp_path / "both", max_shard_bytes=20_000)
    shutil.copy(tmp_path / "out" / st.SINGLE_FILE, tmp_path / "both" / st.SINGLE_FILE)
    with pytest.raises(glocal.hf.SafetensorsError, match="both model.safetensors and"):
        glocal.hf.from_pretrained(tmp_path / "both")


def test_models_without_a_dense_mlp_are_not_exported_as_llama(tmp_path):
    routed = gm.build("transformer", "tiny", ffn="moe", num_experts=4)
    with pytest.raises(glocal.hf.HFConfigError, match="ffn='moe'"):
        glocal.hf.save_pretrained(routed, tmp_path / "a", format="hf")
    with pytest.warns(UserWarning, match="no Hugging Face twin"):
        assert glocal.hf.save_pretrained(routed, tmp_path / "b") == "glocal"
    assert glocal.hf.from_pretrained(tmp_path / "b").config == routed.config


def test_fused_mixtral_layout_reads_the_same(folders, tmp_path):
    """transformers 5 keeps experts fused in memory (mlp.experts.gate_up_proj [X, 2I, D], gate
    rows first; mlp.experts.down_proj [X, D, I]); a file in that layout imports identically."""
    src = st.CheckpointReader(folders["mixtral"])
    tensors = {}
    for name in src.keys():
        if ".block_sparse_moe.experts." in name:
            continue
        tensors[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = np.array(src.get(name))
    for i in range(2):
        e = lambda x, w: np.array(src.get(f"model.layers.{i}.block_sparse_moe.experts.{x}.{w}.weight"))
        tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([e(x, "w1"), e(x, "w3")]) for x in range(4)])
        tensors[f"model.layers.{i}.mlp.experts.down_proj"] = np.stack([e(x, "w2") for x in range(4)])
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(folders["mixtral"] / "config.json", fused / "config.json")
    st.write_checkpoint(fused, [(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()])
    a, b = params_of(glocal.hf.from_pretrained(folders["mixtral"])), params_of(glocal.hf.from_pretrained(fused))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def _config(arch, **changes):
    """A config.json dict as transformers writes it, with ``changes`` (None removes a key)."""
    config_cls, _, extra = ARCHS[arch]
    hf = getattr(transformers, config_cls)(**{**BASE, **extra}).to_dict()
    hf["architectures"] = [ARCHS[arch][1]]
    for k, v in changes.items():
        if v is None:
            hf.pop(k, None)
        else:
            hf[k] = v
    return hf


def test_qwen2_hub_configs_without_layer_types():
    from glocal.hf.configs import to_glocal

    # as Qwen2.5 configs on the hub: use_sliding_window + max_window_layers, no layer_types
    cfg = to_glocal(_config("qwen2", layer_types=None, use_sliding_window=True, max_window_layers=1))[1]
    assert (cfg.layer_pattern, cfg.options["window"].size, cfg.qkv_bias) == ("gs", 6, True)
    # max_window_layers left out: transformers' 28, so no layer of these 2 slides
    cfg = to_glocal(_config("qwen2", layer_types=None, use_sliding_window=True, max_window_layers=None))[1]
    assert cfg.layer_pattern == "g" and "window" not in cfg.options
    with pytest.raises(glocal.hf.HFConfigError, match="sliding_attention layers but no window"):
        to_glocal(_config("qwen2", use_sliding_window=False, layer_types=["full_attention", "sliding_attention"]))


def test_missing_config_keys_mean_what_transformers_assumes():
    from glocal.hf.configs import to_glocal

    cfg = to_glocal(_config("mixtral", rope_parameters=None, rms_norm_eps=None, num_key_value_heads=None,
                            num_attention_heads=8))[1]
    assert (cfg.rope_theta, cfg.norm_eps, cfg.num_kv_heads) == (1e6, 1e-5, 8)
    cfg = to_glocal(_config("mistral", sliding_window=None, max_position_embeddings=8192))[1]
    assert (cfg.layer_pattern, cfg.options["window"].size) == ("s", 4096)  # Mistral's default window
    assert to_glocal(_config("llama", sliding_window=12))[1].layer_pattern == "g"  # Llama ignores the key


def test_rope_scaling_spellings_and_precedence():
    from glocal.hf.configs import to_glocal

    v4 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    spelled4 = to_glocal(_config("llama", rope_parameters=None, rope_theta=5000.0, rope_scaling=v4))[1]
    spelled5 = to_glocal(_config("llama", rope_parameters={**v4, "rope_theta": 5000.0}))[1]
    assert spelled4 == spelled5 and spelled4.rope_scaling == "llama3"
    # both present: a non-empty rope_scaling wins, as in transformers 5
    both = to_glocal(_config("llama", rope_theta=5000.0, rope_scaling=v4,
                             rope_parameters={"rope_type": "default", "rope_theta": 5000.0}))[1]
    assert both == spelled4
    per_type = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    with pytest.raises(glocal.hf.HFConfigError, match="differ per layer type"):
        to_glocal(_config("qwen3", rope_parameters=per_type))


def test_convert_is_all_or_nothing(folders, tmp_path, monkeypatch):
    from glocal import workdir as workdirs
    from glocal.train.trainer import train

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(workdirs, "save_init_params", fail)
    with pytest.raises(OSError, match="disk full"):
        glocal.hf.convert(folders["llama"], tmp_path / "wd")
    assert list(tmp_path.iterdir()) == []  # neither the workdir nor a temporary folder is left
    monkeypatch.undo()
    glocal.hf.convert(folders["llama"], tmp_path / "wd", overrides={"remat": "full"})
    assert workdirs.read_model_file(tmp_path / "wd")["config"]["remat"] == "full"
    shutil.rmtree(tmp_path / "wd" / workdirs.INIT_DIR)  # weights lost afterwards: training must refuse
    np.save(tmp_path / "ids.npy", tokens(0, (4096,)).astype(np.int32))
    with pytest.raises(workdirs.WorkdirError, match="imported weights .* are missing"):
        train(None, tmp_path / "wd", {"steps": "1", "batch_size": "2", "seq_len": "16", "data": str(tmp_path / "ids.npy")})
    with pytest.raises(glocal.hf.HFConfigError, match="change the shapes"):
        glocal.hf.convert(folders["llama"], tmp_path / "wd2", overrides={"d_ff": "64"})
