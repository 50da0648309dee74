"""``import glocal.hf`` stays light: the safetensors interop needs numpy (and the model code),
not the training stack. Each check runs in a fresh interpreter, since this one has long
imported everything."""

import json
import subprocess
import sys

HEAVY = {"orbax", "grain", "optax"}


def imported_by(statements: str) -> tuple[set[str], set[str]]:
    """Top-level packages in ``sys.modules`` after ``import glocal`` alone, and those that
    ``statements`` (run after it) add; ``glocal.*`` modules are listed by their full name."""
    code = (f"import json, sys\nimport glocal\nbase = set(sys.modules)\n{statements}\n"
            "top = lambda names: sorted({n if n.startswith('glocal.') else n.partition('.')[0] for n in names})\n"
            "print(json.dumps([top(base), top(set(sys.modules) - base)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    base, added = json.loads(out.stdout.strip().splitlines()[-1])
    return set(base), set(added)


def test_import_glocal_hf_loads_no_training_stack():
    base, added = imported_by("import glocal.hf\nfrom glocal.hf import *\n"
                              "from glocal.hf import checkpoint, configs, safetensors, tokenizer, weights, workdirs\n"
                              "[getattr(glocal.hf, name) for name in glocal.hf.__all__]")
    assert not added & HEAVY, f"import glocal.hf imports {sorted(added & HEAVY)}"
    # flax.nnx imports optax itself, so `import glocal` already holds it; orbax and grain never.
    assert not base & {"orbax", "grain"}, f"import glocal imports {sorted(base & {'orbax', 'grain'})}"
    assert "glocal.workdir" not in added and "glocal.train.checkpoints" not in added
    assert "tokenizers" not in added  # the library: only once an hf: tokenizer is built


def test_glocal_tokenizers_does_not_import_glocal_hf():
    """glocal.hf.tokenizer imports glocal.tokenizers; the reverse only inside get_tokenizer("hf:...")."""
    _, added = imported_by("import glocal.tokenizers")
    assert not {name for name in added if name.startswith("glocal.hf")}
    assert not added & (HEAVY | {"tokenizers"})
