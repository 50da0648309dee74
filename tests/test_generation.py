"""glocal.generate: greedy equals arg-max by full forwards; sampling filters; stop tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import glocal
import glocal.models as gm
from glocal.generation import sample_logits
from glocal.tokenizers import ByteTokenizer, get_tokenizer
from tests.lm_checks import argmax_by_full_forwards


@pytest.fixture(scope="module")
def model():
    # Sliding-window layers too, so generation crosses the ring buffers' wrap-around.
    return gm.build("transformer", "tiny", num_layers=2, layer_pattern="sg", sliding_window=5,
                    max_seq_len=64, seed=3)


def test_greedy_equals_repeated_full_forwards_for_ragged_batch(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [42], [1, 2, 3]]
    got = glocal.generate(model, prompts, max_new_tokens=12)
    for p, g in zip(prompts, got):
        assert g == argmax_by_full_forwards(model, p, 12)


def test_stop_token_ends_each_row_separately(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [42]]
    full = glocal.generate(model, prompts, max_new_tokens=12)
    stop = full[0][4]
    got = glocal.generate(model, prompts, max_new_tokens=12, stop_tokens=[stop])
    for f, g in zip(full, got):
        cut = f.index(stop) if stop in f else len(f)
        assert g == f[:cut]


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    prompts = [[1, 2, 3], [9, 9]]
    a = glocal.generate(model, prompts, 10, temperature=1.0, seed=7)
    b = glocal.generate(model, prompts, 10, temperature=1.0, seed=7)
    c = glocal.generate(model, prompts, 10, temperature=1.0, seed=8)
    assert a == b and a != c
    assert glocal.generate(model, prompts, 10, temperature=0.7, top_k=1) == glocal.generate(model, prompts, 10)
    assert glocal.generate(model, prompts, 10, temperature=2.0, top_p=1e-6) == glocal.generate(model, prompts, 10)


def test_sample_logits_follows_filtered_softmax():
    logits = jnp.log(jnp.asarray([[0.05, 0.1, 0.15, 0.3, 0.4]]))
    keys = jax.random.split(jax.random.key(0), 20000)

    def freqs(**kw):
        s = jax.vmap(lambda k: sample_logits(logits, k, **kw)[0])(keys)
        return np.bincount(np.asarray(s), minlength=5) / len(keys)

    np.testing.assert_allclose(freqs(temperature=1.0, top_k=None, top_p=None),
                               [0.05, 0.1, 0.15, 0.3, 0.4], atol=0.015)
    # top_k=2 keeps {0.3, 0.4} renormalised.
    np.testing.assert_allclose(freqs(temperature=1.0, top_k=2, top_p=None),
                               [0, 0, 0, 3 / 7, 4 / 7], atol=0.015)
    # top_p=0.65: 0.4 alone < 0.65, 0.4+0.3 reaches it -> keep {0.3, 0.4}.
    np.testing.assert_allclose(freqs(temperature=1.0, top_k=None, top_p=0.65),
                               [0, 0, 0, 3 / 7, 4 / 7], atol=0.015)
    # Temperature 0.5 squares the probabilities (before renormalising).
    p2 = np.array([0.05, 0.1, 0.15, 0.3, 0.4]) ** 2
    np.testing.assert_allclose(freqs(temperature=0.5, top_k=None, top_p=None), p2 / p2.sum(), atol=0.015)


def test_generate_rejects_bad_input(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        glocal.generate(model, [[1, 999]], 3)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        glocal.generate(model, [[]], 3)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=64"):
        glocal.generate(model, [[1] * 60], 10)
    with pytest.raises(ValueError, match="top_p must be in"):
        glocal.generate(model, [[1]], 3, temperature=1.0, top_p=0.0)
    assert glocal.generate(model, [[1], [2]], 0) == [[], []]


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("wordpiece:vocab.txt")
