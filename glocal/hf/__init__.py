"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen3-Next and GPT-OSS.

    model = glocal.hf.from_pretrained("path/to/llama", dtype="bfloat16")   # local folder
    glocal.hf.save_pretrained(model, "path/to/out")                          # transformers loads it

    glocal convert --from-hf DIR --workdir W      # a workdir every glocal command accepts
    glocal export --workdir W --to-hf DIR [--step N]

``configs`` maps config.json fields, ``weights`` tensor names and layouts, ``safetensors``
reads and writes the files (numpy only: no torch needed), ``checkpoint`` loads and saves
models, ``workdirs`` converts folders to workdirs and back, ``tokenizer`` is the ``hf:DIR``
tokenizer kind (a folder's tokenizer.json, via the ``tokenizers`` library). Families without
a Hugging Face twin (FIT, Block Transformer, Based, MoR) save their parameters as safetensors
under glocal's names with glocal's own ``config.json``; ``from_pretrained`` reads those too.

Importing the package loads neither orbax nor grain (tests/test_hf_light.py): the functions
that need them (``convert``, ``export``, the glocal format's parameter names) import them.
"""

from glocal.hf.checkpoint import HFFolderError, from_pretrained, read_config, save_pretrained
from glocal.hf.configs import ARCHITECTURES, HFConfigError
from glocal.hf.safetensors import SafetensorsError
from glocal.hf.weights import HFWeightsError
from glocal.hf.workdirs import convert, export

__all__ = ["ARCHITECTURES", "HFConfigError", "HFFolderError", "HFWeightsError", "SafetensorsError", "convert",
           "export", "from_pretrained", "read_config", "save_pretrained"]
