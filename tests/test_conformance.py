"""Conformance: every family in ``glocal.models.list_models()``, built from its ``tiny``
preset, is checked against the model contract (glocal/models/base.py). A new family is
covered the moment it registers, for:

* causality: perturbing token i changes no logits before i and some at or after i (for
  positions on both sides of group / block boundaries);
* cached decoding: ``prefill`` of ragged prompts (ending before, on and after boundaries)
  then ``decode`` token by token gives the teacher-forced logits at every position;
* greedy ``glocal.generate`` equals arg-max over repeated full forwards (ragged prompts);
* ``cache_nbytes(B, L)`` equals the bytes of the ``init_cache(B, L)`` pytree;
* ``flops_per_token`` is within 0.85-1.15 of XLA's count of an unrolled forward (tiny;
  also the ``small`` preset, within 0.85-1.1, where the family has one);
* packed documents: with ``packed_documents`` true ``segment_ids_BT`` keeps attention
  inside each document (a packed row equals each document run alone); otherwise passing
  ``segment_ids_BT`` or ``positions_BT`` raises a ValueError that says "packed";
* input errors: token ids outside the vocabulary, inputs or caches longer than
  ``max_seq_len``, ``prefill`` into a cache that already holds tokens;
* training through ``glocal.train.trainer.train`` (finite losses, evaluation, checkpoint);
* 8 fake CPU devices (fsdp_tp rules) train like 1 device (tests/sharded_check.py, run once
  per session by the ``sharded`` fixture in tests/conftest.py).

``FAMILY_VARIANTS`` adds configurations (sliding windows, GQA, odd group/block sizes, tied
heads, ...) on which the model-level checks (causality, cached decoding, cache size) run
too. Family-specific properties stay in the family's own test file.

Cost: every check of a model reuses its jitted forward / prefill / decode
(``tests.lm_checks.harness``), at the same shapes where possible (``B`` x ``T`` tokens).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glocal
import glocal.models as gm
from tests.lm_checks import (
    assert_cache_nbytes, assert_causal, assert_decode_matches, build, flops_ratio, greedy_by_full_forwards, harness,
    pad_prompts,
)

FAMILIES = gm.list_models()

# Extra configurations per family for the model-level checks: {family: {variant: overrides}}
# ("seed" is passed to the builder). Keep them tiny: each costs a few compiles.
FAMILY_VARIANTS = {
    # Sliding window 6 < sequence length: the ring buffers wrap many times.
    # Checkpoint-import options: q/k/v biases, qk-norm and llama3 rope scaling (all regimes at E 16).
    "transformer": {"window": dict(num_layers=3, layer_pattern="ssg", sliding_window=6, max_seq_len=64),
                    # A dense delta-rule hybrid: Gated DeltaNet (chunks of 8, GVA 1:2) with a window layer.
                    "delta": dict(num_layers=3, layer_pattern="dds", sliding_window=6, max_seq_len=64, seed=11,
                                  **{"gated_delta.chunk_size": 8, "gated_delta.key_heads": 1}),
                    # StreamingLLM: window + 2 sinks with RoPE re-positioned in the cache, next to a global
                    # layer; both with learned per-head sinks (GPT-OSS) in the softmax.
                    "sinks": dict(num_layers=2, layer_pattern="sg", sliding_window=6, max_seq_len=64, seed=5,
                                  attn_sinks=True, **{"window.sinks": 2, "window.rope_positions": "cache"}),
                    "imported": dict(qkv_bias=True, qk_norm=True, rope_scaling="llama3", rope_factor=4.0,
                                     rope_original_context=64, num_kv_heads=2, max_seq_len=64, seed=9)},
    # Latents wider than tokens, GQA in the local layers, 3 latents per group of 6, tied
    # head, LayerNorm (its bias makes the zero latents of group 0 project to non-zero keys).
    "fit": {"wide": dict(d_latent=48, latent_heads=2, num_heads=4, num_kv_heads=2, num_latents=3, group_size=6,
                         max_seq_len=48, layer_spec="(2)1(1)2(1)", tie_embeddings=True, norm="layer", seed=2)},
    # Blocks of 3 with a 3-vector prefix and GQA in both decoders.
    "block": {"odd": dict(block_size=3, prefix_len=3, d_block=48, block_heads=4, block_kv_heads=2, token_heads=2,
                          token_kv_heads=1, max_seq_len=48, seed=4)},
    # Qwen3-Next's layout (its own preset): Gated DeltaNet 3:1 with gated attention, chunks of
    # 16 (prompts cross them), zero-centred norms, partial RoPE, MoE with a gated shared expert.
    # GPT-OSS's layout (its own preset): window 8 / global alternating, learned sinks, q/k/v/o
    # biases, YaRN, router and expert biases, clamped SwiGLU; 2 layers keep it cheap.
    "moe": {"qwen3_next": dict(preset="qwen3_next_tiny", seed=10),
            "gpt_oss": dict(preset="gpt_oss_tiny", num_layers=2, seed=12)},
    # Three recursions with plain cycle sharing (capacities 1, 2/3, 1/3), and full recursion.
    "mor": {"cycle3": dict(sharing="cycle", num_layers=3, num_recursions=3, seed=5),
            "full": dict(recursion_router="none", seed=6),
            "tokens": dict(recursion_router="token_choice", num_layers=5, num_recursions=3, seed=7),
            "kvshare": dict(kv_sharing=True, num_layers=5, num_recursions=3, seed=8)},
}
CASES = [(f, None) for f in FAMILIES] + [(f, v) for f in FAMILIES for v in FAMILY_VARIANTS.get(f, {})]
CASE_IDS = [f if v is None else f"{f}-{v}" for f, v in CASES]

B, T = 5, 40  # tiny presets: FIT groups of 8 (5 groups), blocks of 4 (10 blocks)
# Prompt lengths ending before, on and after group / block boundaries: for groups of 8
# (blocks of 4) 7 ends just before one, 8 and 24 on one, 1 and 17 after one; for groups of
# 6 (blocks of 3) 17 (8, 17) before, 24 on, 7 (1, 7) after.
PROMPTS = (1, 7, 8, 17, 24)
# First token, around boundaries of 3, 4, 6 and 8, mid-sequence, last.
CAUSAL_POSITIONS = (0, 3, 4, 5, 6, 7, 8, 21, T - 1)
NEW_TOKENS = 14  # greedy generation: longest prompt + 14 <= T, so the reference reuses [B, T]


def model_for(family, variant=None):
    """The family's tiny model (or a variant). A router that is non-causal in training
    (``routing_modes()``: expert choice) is checked in its causal mode, the one that
    evaluation and decoding use."""
    kw = dict(FAMILY_VARIANTS[family][variant]) if variant else {}
    preset = kw.pop("preset", "tiny")
    cfg = gm.get_config(family, preset, **{k: v for k, v in kw.items() if k != "seed"})
    if cfg.routing_modes():
        kw["routing_mode"] = "threshold"
    return build(family, preset, **kw)


def tokens_for(model, seed=0):
    """Fixed ``[B, T]`` tokens (ids < 256: bytes) for ``model``."""
    vocab = min(256, model.config.vocab_size)
    assert model.config.max_seq_len >= T, "tiny presets must allow T tokens"
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=(B, T)), jnp.int32)


# -- model-level checks (tiny presets and FAMILY_VARIANTS) ---------------------------------------

@pytest.mark.parametrize("family,variant", CASES, ids=CASE_IDS)
def test_causality(family, variant):
    model = model_for(family, variant)
    assert_causal(model, tokens_for(model), CAUSAL_POSITIONS, vocab=min(256, model.config.vocab_size))


@pytest.mark.parametrize("family,variant", CASES, ids=CASE_IDS)
def test_prefill_and_decode_equal_teacher_forcing(family, variant):
    model = model_for(family, variant)
    # A delta-rule layer's state passes every token through L2-normalised keys and a decayed sum,
    # so float32 reassociation between the parallel and the one-token forms reaches ~3e-5 on
    # logits of ~4 after three layers (the recurrent form alone gives the same; the kernel's own
    # tests bound the forms against float64).
    tol = 1e-4 if "d" in getattr(model.config, "layer_pattern", "") else 2e-5
    assert_decode_matches(model, tokens_for(model), PROMPTS, tol=tol)


@pytest.mark.parametrize("family,variant", CASES, ids=CASE_IDS)
def test_cache_nbytes_equals_the_cache_pytree(family, variant):
    model = model_for(family, variant)
    lengths = sorted({L for L in (1, 7, 8, 17, 24, T, model.config.max_seq_len) if L <= model.config.max_seq_len})
    assert_cache_nbytes(model, 3, lengths)


# -- family-level checks (tiny presets) ----------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_equals_repeated_full_forwards(family):
    model = model_for(family)
    x = tokens_for(model, seed=1)
    prompts = [[int(t) for t in x[b, :L]] for b, L in enumerate(PROMPTS)]
    got = glocal.generate(model, prompts, max_new_tokens=NEW_TOKENS)
    assert got == greedy_by_full_forwards(model, prompts, NEW_TOKENS, width=T)


FLOPS_BOUNDS = {"tiny": (0.85, 1.15), "small": (0.85, 1.1)}


@pytest.mark.parametrize("preset", sorted(FLOPS_BOUNDS))
@pytest.mark.parametrize("family", FAMILIES)
def test_flops_per_token_matches_xla_cost_analysis(family, preset):
    """The analytic training FLOPs (used for MFU) agree with XLA's count of the forward
    (XLA also counts norms, softmax and activations, a larger share at tiny widths)."""
    if preset not in gm.list_presets(family):
        pytest.skip(f"{family} has no {preset} preset")
    overrides = {}
    if "scan_layers" in {f.name for f in dataclasses.fields(gm.config_class(family))}:
        overrides["scan_layers"] = False  # XLA counts a scanned body once
    if family == "moe":
        # The analytic count is the active experts'. XLA:CPU counts ragged_dot as every group on
        # every row; capacity dispatch with factor 1 computes exactly k T expert rows.
        overrides.update(moe_impl="capacity", capacity_factor=1.0)
    model = nnx.eval_shape(lambda: gm.build(family, preset, **overrides))  # shapes suffice
    ratio = flops_ratio(model, min(model.config.max_seq_len, 256))
    lo, hi = FLOPS_BOUNDS[preset]
    assert lo < ratio < hi, ratio


def _packed(x, docs_per_row):
    """Rows of ``x`` cut into documents: ``(positions_BT, segment_ids_BT, [(row, start, len)])``."""
    pos, seg, docs = np.zeros(x.shape, np.int32), np.zeros(x.shape, np.int32), []
    for b, lengths in enumerate(docs_per_row):
        assert sum(lengths) == x.shape[1]
        start = 0
        for s, n in enumerate(lengths):
            pos[b, start:start + n] = np.arange(n)
            seg[b, start:start + n] = s + 1  # as the data pipeline numbers them
            docs.append((b, start, n))
            start += n
    return jnp.asarray(pos), jnp.asarray(seg), docs


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents(family):
    model = model_for(family)
    x = tokens_for(model, seed=2)
    pos, seg, docs = _packed(x, [(17, 23), (5, 8, 27), (T,), (1, T - 2, 1), (20, 20)])
    if not model.packed_documents:
        # The trainer passes neither to such a model; a caller who does must hear so.
        with pytest.raises(ValueError, match="packed"):
            model(x[:1, :8], segment_ids_BT=seg[:1, :8])
        with pytest.raises(ValueError, match="packed"):
            model(x[:1, :8], positions_BT=pos[:1, :8])
        return
    h = harness(model)
    got = h.forward(x, positions_BT=pos, segment_ids_BT=seg)
    # Each document alone, right-padded to [B, T] (causality makes the padding harmless).
    for i in range(0, len(docs), B):
        chunk = docs[i:i + B]
        alone = np.zeros((B, T), np.int32)
        for r, (b, start, n) in enumerate(chunk):
            alone[r, :n] = x[b, start:start + n]
        want = h.forward(jnp.asarray(alone))
        for r, (b, start, n) in enumerate(chunk):
            np.testing.assert_allclose(got[b, start:start + n], want[r, :n], rtol=1e-5, atol=1e-5,
                                       err_msg=f"row {b} document at {start}")


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_inputs_are_rejected(family):
    model = model_for(family)
    cfg = model.config
    for bad in (cfg.vocab_size, -1):
        with pytest.raises(ValueError, match="outside the vocabulary") as err:
            model(jnp.asarray([[1, 2, bad]], jnp.int32))
        assert str(bad) in str(err.value)  # names the offending id
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(jnp.zeros((1, cfg.max_seq_len + 1), jnp.int32))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.init_cache(1, cfg.max_seq_len + 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_needs_an_empty_cache(family):
    model = model_for(family)
    padded, lengths = pad_prompts(tokens_for(model), PROMPTS)  # the shapes decoding compiled
    _, used = harness(model).prefill(padded, lengths, model.init_cache(B, T))
    with pytest.raises(ValueError, match="prefill needs an empty cache"):
        model.prefill(padded, lengths, used)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tests.test_data import make_folder

    return make_folder(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_through_the_trainer(family, corpus, tmp_path):
    from glocal import workdir as workdirs
    from glocal.train.trainer import train

    # Compiling the step is the cost; 6 tiny steps instead of 2 add ~1 s and show learning.
    run = {"batch_size": "4", "seq_len": "32", "steps": "6", "eval_batches": "1", "log_every": "1",
           "sample_tokens": "0", "warmup_steps": "1", "checkpoint_every": "0", "data": str(corpus),
           "tensorboard": "false"}
    out = train(f"{family}_tiny", tmp_path / "wd", run)
    losses = [h["loss"] for h in out["history"]]
    assert len(losses) == 6 and np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
    assert np.isfinite(out["eval_loss"])
    # (Resuming is model-agnostic trainer code, tested bitwise on the baseline.)
    model, step = workdirs.load_model(tmp_path / "wd")
    assert step == 6 and type(model) is type(model_for(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_eight_devices_train_like_one(sharded, family):
    r = sharded["models"][f"{family}_tiny"]
    np.testing.assert_allclose(r["fsdp_tp"], r["one"], rtol=1e-5)
    assert r["param_rel_diff"] < 1e-5
