"""Importing a ~125M-parameter Llama-shaped Hugging Face checkpoint: wall time and peak host
memory of ``glocal.hf.from_pretrained`` (and of transformers' own loader, for reference).

    python benchmarks/hf_import.py                      # float32 and bfloat16 checkpoints
    python benchmarks/hf_import.py --dtypes float32 --repeats 3 --transformers

The checkpoint is generated (random weights, written with glocal's safetensors writer in
Hugging Face's layout and names: d 768, 12 layers, 12 heads, ffn 2048, vocab 32000 = 134M
parameters; --shard-mb splits it like a hub checkpoint). Each load runs in a fresh process
that first imports JAX and glocal, so the memory it reports is the loader's own: peak RSS
(``ru_maxrss``) minus RSS just before ``from_pretrained``, against the checkpoint's size.
The timed part ends when every parameter is on the device (``block_until_ready``).

Lines starting with RESULT are machine-readable.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_checkpoint(folder: pathlib.Path, dtype: str, shard_mb: int) -> int:
    import ml_dtypes
    import numpy as np

    from glocal.hf import safetensors as st

    D, I, V, L = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"], SHAPE["num_hidden_layers"]
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    shapes = [("model.embed_tokens.weight", (V, D))]
    for i in range(L):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{n}_proj.weight", (D, D)) for n in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (I, D)), (p + "mlp.up_proj.weight", (I, D)),
                   (p + "mlp.down_proj.weight", (D, I)), (p + "input_layernorm.weight", (D,)),
                   (p + "post_attention_layernorm.weight", (D,))]
    shapes += [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]
    rng = np.random.default_rng(0)
    tensors = [(n, s, np_dtype, lambda s=s: (0.02 * rng.standard_normal(s, np.float32)).astype(np_dtype))
               for n, s in shapes]
    folder.mkdir(parents=True, exist_ok=True)
    st.write_checkpoint(folder, tensors, max_shard_bytes=shard_mb << 20)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": dtype, **SHAPE}
    (folder / "config.json").write_text(json.dumps(config))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def child(folder: str, dtype: str, loader: str) -> None:
    """One load in this (fresh) process; prints a JSON line."""
    if loader == "glocal":
        import jax
        from flax import nnx

        import glocal.hf
    else:
        import torch
        import transformers
    before = rss_mb()
    t0 = time.perf_counter()
    if loader == "glocal":
        model = glocal.hf.from_pretrained(folder, dtype=dtype)
        jax.block_until_ready(nnx.state(model, nnx.Param))
        n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
        n = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak, "params": n}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="float32,bfloat16", help="checkpoint dtypes (each imported as itself)")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process loads per case (median reported)")
    p.add_argument("--shard-mb", type=int, default=200, help="safetensors shard size")
    p.add_argument("--transformers", action="store_true", help="also time transformers' from_pretrained")
    args = p.parse_args()
    loaders = ["glocal"] + (["transformers"] if args.transformers else [])
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            folder = pathlib.Path(tmp) / dtype
            size = write_checkpoint(folder, dtype, args.shard_mb)
            files = len(list(folder.glob("*.safetensors")))
            for loader in loaders:
                runs = []
                for _ in range(args.repeats):
                    out = subprocess.run([sys.executable, __file__, "--child", str(folder), dtype, loader],
                                         capture_output=True, text=True, check=True)
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                runs.sort(key=lambda r: r["seconds"])
                mid = runs[len(runs) // 2]
                delta = max(r["peak_rss_mb"] - r["rss_before_mb"] for r in runs)
                size_mb = size / 2**20
                print(f"{loader:12s} {dtype:8s} {mid['params'] / 1e6:.1f}M params, {size_mb:.0f} MiB in {files} files: "
                      f"{mid['seconds']:.2f} s (median of {len(runs)}; min {runs[0]['seconds']:.2f}), "
                      f"peak RSS +{delta:.0f} MiB over the {mid['rss_before_mb']:.0f} MiB before loading "
                      f"= {delta / size_mb:.2f}x the checkpoint (absolute peak {mid['peak_rss_mb']:.0f} MiB)")
                print("RESULT " + json.dumps({"loader": loader, "dtype": dtype, "checkpoint_mib": size_mb,
                                              "files": files, "seconds": [r["seconds"] for r in runs],
                                              "peak_delta_mib": delta, "ratio": delta / size_mb,
                                              "peak_rss_mib": mid["peak_rss_mb"]}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
    else:
        main()
