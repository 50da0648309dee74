"""Where numbers go: ``metrics.jsonl`` (one JSON object per line), TensorBoard event files
under ``DIR/tensorboard``, and the console. Only process 0 writes.

Every training line has ``step``, ``tokens`` (seen so far), ``elapsed_s`` (training
wall-clock summed over resumed runs), ``loss``, ``grad_norm``, ``lr``, ``tokens_per_s``
and ``mfu``; evaluation lines have ``eval_loss`` and ``eval_bpb``.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import time

import jax

# Dense bf16 peak FLOP/s per device by device_kind prefix (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
}


@functools.lru_cache(maxsize=None)
def peak_flops(dtype: str = "float32") -> float:
    """Per-device peak FLOP/s: the table above, or on CPU the measured best of a large
    matmul in ``dtype`` (so CPU MFU reads as a fraction of what this machine can do)."""
    dev = jax.devices()[0]
    for prefix, flops in PEAK_FLOPS.items():
        if dev.device_kind.startswith(prefix):
            return flops
    import jax.numpy as jnp

    n = 1024
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    # Fake CPU devices share the same cores: each gets an equal slice of the machine.
    return 2 * n**3 / best / jax.local_device_count()


class MetricsWriter:
    def __init__(self, workdir: pathlib.Path, *, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"), flush_secs=30)

    @property
    def abandoned_path(self) -> pathlib.Path:
        return self.path.with_name("metrics.abandoned.jsonl")

    def drop_after(self, step: int) -> int:
        """Move the records of steps after ``step`` (logged by a run that stopped before
        checkpointing them; the resumed run logs those steps again) to
        ``metrics.abandoned.jsonl``, so the curves never double back. Returns how many."""
        if not self.enabled or not self.path.exists():
            return 0
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep, drop = [], []
        for line in lines:
            (drop if json.loads(line).get("step", 0) > step else keep).append(line)
        if drop:
            with self.abandoned_path.open("a") as f:
                f.write("".join(line + "\n" for line in drop))
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(self.path)  # atomic: the metrics are never half written
        return len(drop)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                # (the first step's throughput is NaN by design: it holds the compilation)
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{workdir} has no metrics.jsonl; is it a glocal training workdir?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
