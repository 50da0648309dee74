"""Logit parity with transformers, per architecture and direction (the numbers behind
tests/test_hf.py, printed).

    python benchmarks/hf_parity.py

Import: a tiny random model built with transformers (2 layers, GQA 4/2, rope theta 5000,
vocabulary 97, randomised norm scales and biases; the same models as the tests), saved, and
imported with ``glocal.hf.from_pretrained``. Export: a random glocal model saved with
``glocal.hf.save_pretrained`` and loaded with ``AutoModelForCausalLM``. Both compare float32
logits on 2 x 24 random tokens and 32-token greedy continuations.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import transformers  # noqa: E402

import glocal  # noqa: E402
import glocal.hf  # noqa: E402
import glocal.models as gm  # noqa: E402
from tests.test_hf import (  # noqa: E402
    ARCHS, CONTEXT, EXPORTS, V, glocal_logits, hf_greedy, hf_logits, hf_model, tokens,
)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            folder = pathlib.Path(tmp) / arch
            ref = hf_model(arch)
            ref.save_pretrained(folder)
            model = glocal.hf.from_pretrained(folder)
            x, prompt = tokens(1), tokens(2, (24,)).tolist()
            diff = np.abs(glocal_logits(model, x) - hf_logits(ref, x)).max()
            same = glocal.generate(model, [prompt], 32)[0] == hf_greedy(ref, prompt, 32)
            print(f"import {arch:8s} max |logit diff| {diff:.2e}  greedy 32 equal: {same}")
        for arch, (family, fields) in EXPORTS.items():
            folder = pathlib.Path(tmp) / f"{arch}_export"
            model = gm.build(family, "tiny", seed=3, vocab_size=V, num_kv_heads=2, rope_theta=5000.0,
                             norm_eps=1e-5, max_seq_len=CONTEXT, **fields)
            glocal.hf.save_pretrained(model, folder)
            ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
            x, prompt = tokens(4), tokens(5, (24,)).tolist()
            diff = np.abs(glocal_logits(model, x) - hf_logits(ref, x)).max()
            same = glocal.generate(model, [prompt], 32)[0] == hf_greedy(ref, prompt, 32)
            print(f"export {arch:8s} ({type(ref).__name__}) max |logit diff| {diff:.2e}  greedy 32 equal: {same}")


if __name__ == "__main__":
    main()
