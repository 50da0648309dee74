"""The training config: every ``key=value`` of ``glocal train`` that is not a model field.

Dotted names on the command line map to underscores: ``mesh.data=2`` sets ``mesh_data``.
The same names work for every model family.
"""

from __future__ import annotations

import dataclasses

from glocal.configs.base import Config, ConfigError, did_you_mean
from glocal.sharding import MESH_AXES, RULE_TABLES

SCHEDULES = ("cosine", "linear", "constant")
NO_DECAY_KINDS = ("norm", "bias", "embedding")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    # length and batch
    steps: int = 450
    batch_size: int = 16  # global sequences per optimizer step
    seq_len: int = 256
    grad_accum: int = 1  # microbatches per step (batch_size must divide by it)
    # optimizer
    learning_rate: float = 3e-3
    lr_schedule: str = "cosine"  # after warmup: cosine | linear | constant
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # final learning rate = ratio * learning_rate
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay: str = "norm,bias"  # comma list from NO_DECAY_KINDS kept out of weight decay
    grad_clip: float = 1.0  # global-norm clipping; 0 = off
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2)
    seed: int = 0
    # data
    data: str = "default"  # "default" corpus, a text file/folder, .npy/.bin tokens, .array_record
    val_data: str = ""  # separate validation source; default: held out from `data`
    data_dtype: str = "uint16"  # element type of raw .bin token files
    eos_id: int = -1  # document separator inside token arrays; -1 = none (text sources use EOS)
    val_fraction: float = 0.02  # tail held out when the source is one stream
    pack: bool = True  # segment ids + positions reset at document boundaries
    data_threads: int = 2
    # "" = the workdir's (its model.json), byte on a new one; hf:DIR = a Hugging Face
    # tokenizer.json, copied into the new workdir. Never inherited by a resume.
    tokenizer: str = ""
    # evaluation and logging
    eval_every: int = 150  # 0 = only at the end
    eval_batches: int = 8
    log_every: int = 10
    tensorboard: bool = True
    peak_flops: float = 0.0  # per device, for MFU; 0 = look up / measure
    sample_tokens: int = 200
    sample_prompt: str = "def "
    # checkpoints
    checkpoint_every: int = 150  # 0 = only at the end (and on SIGTERM/SIGINT)
    keep_last: int = 3
    keep_every: int = 0  # also keep every K-th step forever; 0 = off
    async_checkpoint: bool = True
    # parallelism
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_expert: int = 1
    mesh_tensor: int = 1
    sharding: str = "fsdp"  # rule table: dp | fsdp | fsdp_tp
    dry_run: bool = False
    # one-off resume options (never inherited by the next resume)
    reset_optimizer: bool = False  # resume the weights with a fresh optimizer state
    allow_data_change: bool = False  # resume on data other than the checkpoint was trained on

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every",
                     "keep_last", "data_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "keep_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by grad_accum="
                              f"{self.grad_accum}; each microbatch must hold whole sequences.")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"lr_schedule={self.lr_schedule!r} is not one of {SCHEDULES}.")
        bad = set(self.no_decay_kinds) - set(NO_DECAY_KINDS)
        if bad:
            raise ConfigError(f"no_decay={self.no_decay!r} has unknown kinds {sorted(bad)}; "
                              f"use a comma list of {NO_DECAY_KINDS} (or empty).")
        if self.sharding not in RULE_TABLES:
            raise ConfigError(f"sharding={self.sharding!r} is not one of {list(RULE_TABLES)}.")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}.")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}.")

    @property
    def no_decay_kinds(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.no_decay.split(",") if k.strip())

    @property
    def mesh_sizes(self) -> dict[str, int]:
        return {a: getattr(self, f"mesh_{a}") for a in MESH_AXES}

    @property
    def microbatch(self) -> int:
        """Sequences per microbatch (one forward/backward): the global batch the mesh splits."""
        return self.batch_size // self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def split_overrides(overrides: dict[str, str], model: str | None = None
                    ) -> tuple[dict[str, str], dict[str, str]]:
    """``(model_overrides, train_overrides)``: training fields (dots read as underscores)
    go to TrainConfig, model fields to the model config.

    A key that is neither is a ConfigError whose suggestions come from both sets: the
    fields of model family ``model``, or (``None``) of any registered family; a key of
    another family is left to the model config's own error."""
    import glocal.models as gm  # (glocal.models does not import the training code)
    from glocal.configs import options as kind_options

    train_fields = TrainConfig.field_names()
    families = [model] if model is not None else gm.list_models()
    model_fields = list(dict.fromkeys(f for name in families for f in gm.config_class(name).field_names()))
    kinds, aliases = kind_options.optioned_kinds(), kind_options.alias_table()
    model_kw, train_kw = {}, {}
    for key, value in overrides.items():
        name = key.replace(".", "_")
        if name in train_fields:
            train_kw[name] = value
        elif key in model_fields or key in aliases or key.split(".")[0] in kinds:  # kind options: moe.top_k
            model_kw[key] = value
        else:
            which = f"{model} model" if model is not None else "model (any family)"
            hint = did_you_mean(name, train_fields + model_fields)
            raise ConfigError(f"{key!r} is neither a training field nor a {which} field.{hint} "
                              f"Training fields: {', '.join(train_fields)}. "
                              + (f"{model} fields: {', '.join(model_fields)}." if model is not None else
                                 "Model fields depend on the family (its config class lists them)."))
    return model_kw, train_kw
