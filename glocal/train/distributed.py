"""Multi-process start-up and run control: the environment contract, the coordination
service's timeouts, a clear exit when a peer dies, and stop requests that every process
agrees on.

The environment a process reads (``glocal launch`` sets it; on a pod or cluster JAX's own
detection fills what is missing):

    JAX_COORDINATOR_ADDRESS   host:port of process 0's coordination service
    GLOCAL_NUM_PROCESSES      how many processes take part
    GLOCAL_PROCESS_ID         this process's index, 0 .. N-1
    GLOCAL_HEARTBEAT_TIMEOUT  seconds without a sign of life before a process counts as dead
                              (default 30): the bound on how long the survivors wait (JAX's
                              own heartbeat check, which aborts, is set to 2x + 10 s)
    GLOCAL_INIT_TIMEOUT       seconds process 0 waits for all processes to join (default 300)
    GLOCAL_DISTRIBUTED        1 forces jax.distributed on, 0 off (default: on when the
                              variables above, a multi-task SLURM step or a multi-worker TPU
                              slice say so)
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time

import numpy as np

HEARTBEAT_TIMEOUT_S = 30
INIT_TIMEOUT_S = 300
PEER_LOST_EXIT = 3  # exit status of a process whose peer died (2 is a user error)


def wants_distributed(env=os.environ) -> bool:
    """True when the environment describes a multi-process job: set explicitly
    (GLOCAL_DISTRIBUTED=1 / JAX_COORDINATOR_ADDRESS), a multi-task SLURM step, or a
    multi-worker Cloud TPU slice. GLOCAL_DISTRIBUTED=0 turns it off."""
    flag = env.get("GLOCAL_DISTRIBUTED")
    if flag is not None:
        return flag not in ("0", "false", "")
    return ("JAX_COORDINATOR_ADDRESS" in env
            or int(env.get("GLOCAL_NUM_PROCESSES", "1") or 1) > 1
            or int(env.get("SLURM_NTASKS", "1") or 1) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def _int_env(env, name: str, default: int | None) -> int | None:
    text = env.get(name)
    if text in (None, ""):
        return default
    try:
        return int(text)
    except ValueError:
        from glocal.errors import UserError
        raise UserError(f"{name}={text!r} is not a whole number; unset it or set e.g. {name}={default or 1}.") from None


def initialize_args(env=os.environ) -> dict:
    """Keyword arguments of ``jax.distributed.initialize`` from the environment (None:
    left to JAX's cluster detection)."""
    return {"coordinator_address": env.get("JAX_COORDINATOR_ADDRESS") or None,
            "num_processes": _int_env(env, "GLOCAL_NUM_PROCESSES", None),
            "process_id": _int_env(env, "GLOCAL_PROCESS_ID", None),
            "heartbeat_timeout_seconds": _int_env(env, "GLOCAL_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT_S),
            "initialization_timeout": _int_env(env, "GLOCAL_INIT_TIMEOUT", INIT_TIMEOUT_S)}


def maybe_initialize() -> None:
    """Join the multi-process job the environment describes (nothing otherwise). Must run
    before anything touches the JAX backend. On CPU the processes' collectives go over
    gloo (TCP)."""
    import jax

    if not wants_distributed() or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # (only the CPU backend reads it)
    args = initialize_args()
    timeout = args.pop("heartbeat_timeout_seconds")
    # JAX's own heartbeat check aborts the process with a C++ stack dump; ours (below) fires first
    # and says what happened, so JAX's is only the backstop.
    jax.distributed.initialize(**args, heartbeat_timeout_seconds=2 * timeout + 10)
    _Watchdog(timeout).start()
    if jax.default_backend() == "cpu":
        # An executable read back from the persistent compile cache runs its cross-process
        # collectives without gloo and waits for ever (seen on jax 0.10 and 0.12): compile afresh.
        jax.config.update("jax_enable_compilation_cache", False)


class _Watchdog(threading.Thread):
    """Notices a process of the job that died or hung, and ends this one with one clear line.

    Every process bumps a counter in the coordination service's key-value store each second
    and reads the others'; a counter that has not moved for ``timeout`` seconds (of this
    machine's clock: no clock skew between hosts matters) means its process is gone. A thread,
    so it runs while the main thread is blocked in a collective or a checkpoint barrier (those
    release the GIL). At interpreter exit (an ``atexit`` hook, which runs before JAX's shutdown
    barrier) it is stopped and joined, and the counter is replaced by ``done`` so the others
    never count this process as lost while they finish. Stopped, not left running: Python's
    finalisation kills a daemon thread that is inside a C++ call (this one's key-value calls)
    with a forced unwind, which aborts the process ("FATAL: exception not rethrown")."""

    PREFIX = "glocal_alive/"
    DONE = "done"

    def __init__(self, timeout: float):
        super().__init__(daemon=True, name="glocal-watchdog")
        import jax
        from jax._src import distributed as jd

        self.client, self.timeout = jd.global_state.client, timeout
        self.index, self.count = jax.process_index(), jax.process_count()
        self.stopped = threading.Event()
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout=10.0)
        try:
            self.client.key_value_set(f"{self.PREFIX}{self.index}", self.DONE, allow_overwrite=True)
        except Exception:  # noqa: BLE001 (the service may be gone already; nothing to tell)
            pass

    def run(self) -> None:
        start, beat, heard = time.monotonic(), 0, {}  # peer -> (its counter, when it last moved)
        while not self.stopped.wait(1.0):
            beat += 1
            try:
                self.client.key_value_set(f"{self.PREFIX}{self.index}", str(beat), allow_overwrite=True)
                counters = dict(self.client.key_value_dir_get(self.PREFIX))
            except Exception as e:  # noqa: BLE001 (any failure means the service is gone)
                if not self.stopped.is_set():
                    _lost(f"the job's coordination service (process 0) stopped answering "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:160]})")
                return
            now = time.monotonic()
            for peer in range(self.count):
                if peer == self.index:
                    continue
                value = counters.get(f"{self.PREFIX}{peer}", counters.get(f"/{self.PREFIX}{peer}"))
                if value == self.DONE:
                    continue  # finished cleanly; it waits at JAX's shutdown barrier, not beating
                if peer not in heard or heard[peer][0] != value:
                    heard[peer] = (value, now if value is not None else start)
                if now - heard[peer][1] > self.timeout and not self.stopped.is_set():
                    _lost(f"process {peer} has not been heard from for {self.timeout} s "
                          f"(GLOCAL_HEARTBEAT_TIMEOUT): it was killed, crashed or hung")
                    return


def _lost(why: str) -> None:
    sys.stderr.write(f"\nglocal: error: process {_process_label()} stops: {why}. Run the same command again to "
                     f"resume from the last checkpoint.\n")
    leave(PEER_LOST_EXIT)


def in_job() -> bool:
    """True inside a multi-process JAX job (after ``maybe_initialize`` joined one)."""
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


# Words of the runtime errors a collective raises when a peer process has gone away.
_PEER_LOSS_SIGNS = ("gloo", "connection reset", "connection closed", "connection refused", "heartbeat",
                    "unavailable", "deadline_exceeded", "socket closed", "broken pipe")


def is_peer_loss(error: BaseException) -> bool:
    """Whether ``error`` is a failed collective or coordination call (another process of
    the job died), not a fault of this process."""
    text = f"{type(error).__name__} {error}".lower()
    return "runtimeerror" in text and any(sign in text for sign in _PEER_LOSS_SIGNS)


def peer_loss_message(error: BaseException) -> str:
    detail = " ".join(str(error).split())[:240]
    return (f"process {_process_label()} lost contact with another process of this job (it was killed, crashed "
            f"or hung), so this one stops too. Run the same command again to resume from the last checkpoint. "
            f"[{type(error).__name__}: {detail}]")


def leave(status: int) -> None:
    """End a process of a multi-process job now, with ``status``. A normal interpreter exit
    would first wait at JAX's shutdown barrier for every other process (minutes, or for
    ever when one is stuck in a collective); the others notice this one's exit at their
    next collective, or within the heartbeat timeout, and leave the same way. Checkpoint
    writes were already finished or abandoned by the trainer; orbax commits a step only
    once it is complete, so the last complete checkpoint stays valid."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def finish() -> None:
    """End a process of a multi-process job that succeeded: run the exit hooks (the
    watchdog's stop, then JAX's shutdown barrier, where the processes wait for each other)
    and leave with status 0 without Python's finalisation, which kills the daemon threads
    libraries leave behind and aborts the process when one of them is inside C++ code."""
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    leave(0)


def _process_label() -> str:
    try:
        import jax

        return f"{jax.process_index()} of {jax.process_count()}"
    except Exception:  # noqa: BLE001 (only a label)
        return os.environ.get("GLOCAL_PROCESS_ID", "?")


def agree(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (one small all-gather; a plain
    value with one process)."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array(bool(flag)))))


class StopRequest:
    """Turns SIGTERM/SIGINT (preemption, Ctrl-C) into a flag the training loop checks after
    each step, so it can save a checkpoint and exit cleanly. A second Ctrl-C interrupts.
    With several processes the signal reaches them at different moments; ``agreed()``
    makes all of them see the stop at the same step."""

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

    def agreed(self) -> bool:
        """Whether any process was asked to stop (the same answer on all of them)."""
        return agree(self.requested)
