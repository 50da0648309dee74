"""Multi-host start-up and run control (preemption signals)."""

from __future__ import annotations

import os
import signal
import threading


def wants_distributed(env=os.environ) -> bool:
    """True when the environment describes a multi-process job: set explicitly
    (GLOCAL_DISTRIBUTED=1 / JAX_COORDINATOR_ADDRESS), a multi-task SLURM step, or a
    multi-worker Cloud TPU slice. GLOCAL_DISTRIBUTED=0 turns it off."""
    flag = env.get("GLOCAL_DISTRIBUTED")
    if flag is not None:
        return flag not in ("0", "false", "")
    return ("JAX_COORDINATOR_ADDRESS" in env
            or int(env.get("SLURM_NTASKS", "1") or 1) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def maybe_initialize() -> None:
    """``jax.distributed.initialize()`` (which auto-detects TPU pods and SLURM) when the
    environment asks for it. Must run before anything touches the JAX backend."""
    import jax

    if wants_distributed() and not jax.distributed.is_initialized():
        jax.distributed.initialize()


class StopRequest:
    """Turns SIGTERM/SIGINT (preemption, Ctrl-C) into a flag the training loop checks after
    each step, so it can save a checkpoint and exit cleanly. A second Ctrl-C interrupts."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False

    @property
    def requested(self) -> bool:
        return self.signal is not None
