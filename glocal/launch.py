"""``glocal launch``: run one glocal command as N cooperating processes on this machine.

    glocal launch --processes 2 --devices-per-process 4 -- train --config transformer_tiny --workdir runs/mh

starts N ``glocal`` processes joined into one JAX job (a free local port for the
coordinator; the environment of ``glocal.train.distributed``), the same way the hosts of a
pod slice or a SLURM job run: one process per host, the same command on each. It is how a
multi-host job is rehearsed on a workstation (``--devices-per-process`` gives each process
that many CPU devices) and how the multi-process tests run.

Process 0's output is shown as it comes; the others' goes to ``--log-dir`` (the last lines
of a process that failed differently from process 0 are shown at the end). SIGTERM and
SIGINT are passed to every process, which stop after one agreed step with a checkpoint. If
a process exits with an error or dies, the others get ``--grace`` seconds to end on their
own (they notice at once, or within the heartbeat timeout) and are then terminated. A second
SIGTERM/SIGINT kills every process; SIGHUP counts as SIGTERM; if the launcher itself is killed,
the processes get SIGTERM (Linux). The exit status is the worst of the processes' (a death
by signal S counts as 128 + S).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from glocal.train.distributed import HEARTBEAT_TIMEOUT_S

TAIL_LINES = 6


def free_port() -> int:
    """A TCP port nothing listens on now (the coordinator binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, *, index: int, processes: int, port: int, devices: int | None,
                heartbeat: int) -> dict:
    """The environment of process ``index``: the contract ``glocal.train.distributed`` reads."""
    env = dict(base)
    for name in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_ID"):  # our variables, not an outer job's
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    if processes > 1:  # (one process is a plain run: no coordinator to start)
        env.update({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "GLOCAL_NUM_PROCESSES": str(processes),
                    "GLOCAL_PROCESS_ID": str(index), "GLOCAL_DISTRIBUTED": "1",
                    "GLOCAL_HEARTBEAT_TIMEOUT": str(heartbeat)})
    else:
        env["GLOCAL_DISTRIBUTED"] = "0"
    if devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def exit_status(returncode: int) -> int:
    """A shell-style status: a death by signal S is 128 + S."""
    return 128 - returncode if returncode < 0 else returncode


# gloo's chatter on every collective's first use (anywhere in a line: it lands mid progress bar).
NOISE = re.compile(rb"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number of connected peer ranks "
                   rb"is : \d+\n?")


NOISE_PARTS = (b"[Gloo]", b"connected peer ranks")  # two threads' chatter interleaved


def _strip_noise(text: bytes) -> bytes:
    text = NOISE.sub(b"", text)
    if b"[Gloo]" not in text and b"connected peer ranks" not in text:
        return text
    return b"".join(ln for ln in text.splitlines(keepends=True) if not any(p in ln for p in NOISE_PARTS))


def _quiet(lines: list[str]) -> list[str]:
    return [ln for ln in lines if _strip_noise(ln.encode()).strip()]


class _Echo(threading.Thread):
    """Copies a child's stream to ours as it comes (less gloo's chatter) and keeps its end."""

    def __init__(self, src, dst):
        super().__init__(daemon=True)
        self.src, self.dst, self.tail, self.pending = src, dst, b"", b""

    def run(self):
        for chunk in iter(lambda: os.read(self.src.fileno(), 65536), b""):
            text = self.pending + chunk
            cut = max(text.rfind(b"\n"), text.rfind(b"\r")) + 1  # hold a part line back: it may be chatter
            self._show(text[:cut])
            self.pending = text[cut:]
        self._show(self.pending)

    def _show(self, text: bytes) -> None:
        shown = _strip_noise(text)
        self.dst.buffer.write(shown)
        self.dst.flush()
        self.tail = (self.tail + shown)[-8192:]

    def last_lines(self) -> list[str]:
        return [ln.strip() for ln in self.tail.decode(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]


def _tail(path: str) -> list[str]:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 8192))
        text = f.read().decode(errors="replace").replace("\r", "\n")
    return _quiet([ln.strip() for ln in text.splitlines() if ln.strip()])[-TAIL_LINES:]


def launch(command: list[str], *, processes: int, devices: int | None = None, log_dir: str | None = None,
           heartbeat: int = HEARTBEAT_TIMEOUT_S, grace: float | None = None, port: int | None = None,
           out=sys.stdout, err=sys.stderr) -> int:
    """Run ``glocal <command>`` as ``processes`` processes; the worst exit status."""
    port = port or free_port()
    log_dir = log_dir or tempfile.mkdtemp(prefix="glocal-launch-")
    os.makedirs(log_dir, exist_ok=True)
    grace = heartbeat + 15 if grace is None else grace
    argv = [sys.executable, "-m", "glocal.cli", *command]
    procs, logs, signals = [], [], []

    def forward(signum, frame):  # the first signal asks for a clean stop; a second one kills
        signals.append(signum)
        for q in procs:
            if q.poll() is None:
                q.send_signal(signal.SIGTERM if len(signals) == 1 else signal.SIGKILL)

    # (SIGHUP too: a closed terminal must not leave the processes running without us)
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    for i in range(processes):
        env = process_env(os.environ, index=i, processes=processes, port=port, devices=devices, heartbeat=heartbeat)
        # Own sessions: a terminal's Ctrl-C reaches them once, through us. If we die, they get SIGTERM.
        kw = dict(env=env, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_term_with_parent)
        if i == 0:
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw))
        else:
            logs.append(os.path.join(log_dir, f"process_{i}.log"))
            with open(logs[-1], "wb") as f:
                procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, **kw))
    echoes = [_Echo(procs[0].stdout, out), _Echo(procs[0].stderr, err)]  # (threads only after the forks)
    for e in echoes:
        e.start()
    try:
        failed_at = None
        while any(q.poll() is None for q in procs):
            if failed_at is None and any(q.poll() not in (None, 0) for q in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace:
                _stop_all(procs)
                break
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for e in echoes:
        e.join(timeout=5)
    codes = [exit_status(q.wait()) for q in procs]
    _report(codes, echoes, logs, log_dir, err)
    return max(codes)


def _term_with_parent() -> None:
    """In the child before exec: SIGTERM it when the launcher dies (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop_all(procs) -> None:
    """SIGTERM what is still running, then SIGKILL what ignores it."""
    for q in procs:
        if q.poll() is None:
            q.terminate()
    deadline = time.monotonic() + 10
    while any(q.poll() is None for q in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    for q in procs:
        if q.poll() is None:
            q.kill()


def _report(codes: list[int], echoes, logs: list[str], log_dir: str, err) -> None:
    """Show how the other processes ended when that adds to what process 0 printed."""
    seen = set(echoes[1].last_lines()[-TAIL_LINES:]) if echoes else set()
    for i, (code, path) in enumerate(zip(codes[1:], logs), start=1):
        lines = _tail(path)
        if code == 0 or (code == codes[0] and (code == 143 or (lines and lines[-1] in seen))):
            continue  # a clean end, a stop on request, or the error process 0 already printed
        how = f"was killed by signal {code - 128}" if code > 128 else f"exited with status {code}"
        err.write(f"glocal launch: process {i} {how}; the end of {path}:\n")
        err.write("".join(f"  | {ln}\n" for ln in lines) or "  | (no output)\n")
    if any(codes):
        err.write(f"glocal launch: exit statuses {codes}; logs of processes 1..{len(codes) - 1} in {log_dir}\n")
    err.flush()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glocal launch", description="Run a glocal command as N processes of one JAX job on this machine.",
        epilog="example: glocal launch --processes 2 --devices-per-process 4 -- train --config transformer_tiny "
               "--workdir runs/mh steps=20")
    p.add_argument("--processes", "-n", type=int, required=True, help="how many processes (hosts to rehearse)")
    p.add_argument("--devices-per-process", type=int, default=None, metavar="M",
                   help="give each process M CPU devices (a CPU rehearsal); default: the devices JAX finds")
    p.add_argument("--log-dir", default=None, help="where processes 1..N-1 write their output (default: a new "
                                                    "temporary folder)")
    p.add_argument("--heartbeat-timeout", type=int, default=HEARTBEAT_TIMEOUT_S, metavar="S",
                   help=f"seconds before a silent process counts as dead (default {HEARTBEAT_TIMEOUT_S})")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then a glocal command, e.g. -- train ...")
    return p


def main(argv: list[str]) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("name the glocal command to run after --, e.g. -- train --config transformer_tiny --workdir runs/mh")
    if command[0] in ("launch", "glocal"):
        p.error(f"the command after -- is a glocal subcommand (train, eval, ...), not {command[0]!r}")
    if args.processes < 1:
        p.error(f"--processes must be at least 1, got {args.processes}")
    if args.devices_per_process is not None and args.devices_per_process < 1:
        p.error(f"--devices-per-process must be at least 1, got {args.devices_per_process}")
    if args.heartbeat_timeout < 1:
        p.error(f"--heartbeat-timeout must be at least 1 second, got {args.heartbeat_timeout}")
    return launch(command, processes=args.processes, devices=args.devices_per_process, log_dir=args.log_dir,
                  heartbeat=args.heartbeat_timeout, port=args.port)
