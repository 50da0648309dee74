"""Where a Pallas kernel runs natively is decided when the program is *lowered*, not when it
is traced.

A jitted function that calls ``impl="pallas_tpu"`` and is lowered for ``tpu`` must contain
the Mosaic kernel even when it was traced on a CPU host (ahead-of-time compilation, export,
the cross-lowering tests); run on a CPU it must interpret the same kernel. Deciding from
``jax.default_backend()`` at trace time gets the first case wrong, so the kernels go through
``native_or_interpreted``, which puts both forms under ``jax.lax.platform_dependent``: XLA
keeps the branch of the platform it lowers for and drops the other.

Platforms (JAX's lowering names): our TPU kernels are native on ``tpu``; our GPU (Triton)
kernels on ``cuda``. Any other platform (e.g. a TPU kernel lowered for ``cuda``) is an error
at lowering time: a kernel never silently falls back to the interpreter on an accelerator.
"""

from __future__ import annotations

import contextlib

import jax

from glocal.compat import has_tokamax

# Our kernel backends -> the JAX lowering platforms their native form is written for.
NATIVE_PLATFORMS = {"tpu": ("tpu",), "gpu": ("cuda",)}


def native_or_interpreted(backend: str, run, *args, interpret=None):
    """``run(interpret, *args)`` natively on ``backend``'s platforms and interpreted on CPU.

    ``interpret`` given (``True``/``False`` or Pallas ``InterpretParams``) is used as is.
    Lowering for any other platform fails in JAX's ``platform_dependent`` (its message names
    the platform): a kernel never falls back to the interpreter on an accelerator."""
    if interpret is not None:
        return run(interpret, *args)
    native = {p: (lambda *a: run(False, *a)) for p in NATIVE_PLATFORMS[backend]}
    return jax.lax.platform_dependent(*args, cpu=lambda *a: run(True, *a), **native)


# Device kinds cross_lowering describes by default (JAX needs one to lower Mosaic TPU kernels,
# tokamax's, and on jax >= 0.12 Pallas Triton kernels, on a host without that device).
DEFAULT_DEVICE_KINDS = {"tpu": ("TPU v5 lite", 1), "cuda": ("NVIDIA H100 80GB HBM3", 132)}


def cross_lowering(platform: str, device_kind: str | None = None, num_cores: int | None = None,
                   mesh=None):
    """A context for tracing on this host a program meant for ``platform`` (``"tpu"`` or
    ``"cuda"``), then ``.lower(lowering_platforms=(platform,))``: an abstract mesh whose
    device is the target (default a TPU v5e core / an H100), and tokamax's cross-compilation
    switch if tokamax is installed. ``mesh``: the concrete mesh the program is sharded over,
    whose axes the abstract mesh copies (default one device)."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    kind, cores = DEFAULT_DEVICE_KINDS[platform]
    device = AbstractDevice(device_kind=device_kind or kind, num_cores=num_cores or cores,
                            platform="gpu" if platform == "cuda" else platform)
    sizes, names = ((1,), ("x",)) if mesh is None else (tuple(mesh.shape.values()), tuple(mesh.axis_names))
    stack = contextlib.ExitStack()
    stack.enter_context(jax.sharding.use_abstract_mesh(
        AbstractMesh(sizes, names, (AxisType.Auto,) * len(names), abstract_device=device)))
    if has_tokamax():  # its device check must not look at this host (gradients included)
        import tokamax

        stack.enter_context(tokamax.config.cross_compile(True))
    return stack
