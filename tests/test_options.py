"""Kind options in model configs: ``kind.option=value``, the flat names of earlier versions,
JSON sections, validation that names the user's field, and workdirs written before kinds
owned their options (``tests/data/legacy_configs.json`` holds configs exactly as the previous
version wrote them: every option flat at the top level)."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import pytest

import glocal.models as gm
from glocal import workdir as workdirs
from glocal.configs.base import ConfigError
from glocal.layers.moe import MoEOptions
from glocal.layers.recurrent import LinearOptions

LEGACY = json.loads((pathlib.Path(__file__).parent / "data" / "legacy_configs.json").read_text())


@pytest.mark.parametrize("family", sorted(LEGACY))
def test_configs_written_by_the_previous_version_read_back_the_same(family, tmp_path):
    old = LEGACY[family]
    cfg = gm.config_class(family).from_dict(old)
    # Every value the old file held means the same thing now (flat names -> kind options).
    for key, value in old.items():
        if key in cfg.field_names():
            assert getattr(cfg, key) == (tuple(value) if isinstance(value, list) else value), key
    if family == "moe":
        assert cfg.options["moe"] == MoEOptions(**{"num_experts": 4, "top_k": 2, "d_expert": 96,
                                                   "router": "expert_choice", "capacity_factor": 2.0})
    if family == "based":
        assert cfg.options["linear"] == LinearOptions(feature_dim=8, feature_map="elu")
        assert cfg.options["window"].size == 8 and cfg.options["conv"].width == 3
    if family == "transformer":
        assert dict(cfg.options) == {"window": cfg.options["window"]} and cfg.options["window"].size == 16
    if family == "mor":
        assert cfg.routing_mode == "threshold" and "moe" not in cfg.options  # dense FFN: no moe section
    # The new layout round-trips, and an old model.json is accepted as is (not rewritten).
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    record = {"model": family, "config": old, "tokenizer": "byte"}
    (tmp_path / "model.json").write_text(json.dumps(record))
    workdirs.write_model_file(tmp_path, cfg)
    assert json.loads((tmp_path / "model.json").read_text()) == record
    with pytest.raises(workdirs.WorkdirError, match="describes a different model"):
        workdirs.write_model_file(tmp_path, cfg.replace(vocab_size=cfg.vocab_size + 1))


def test_flat_and_nested_spellings_are_the_same_option():
    nested = gm.get_config("moe", "tiny", **{"moe.impl": "capacity", "moe.top_k": "1", "moe.bias_rate": 0.01})
    flat = gm.get_config("moe", "tiny", moe_impl="capacity", top_k=1, router_bias_rate=0.01)
    assert nested == flat and nested.options["moe"].impl == "capacity" and nested.options["moe"].top_k == 1
    based = gm.get_config("based", "tiny", **{"window.size": 16, "conv.width": 4})
    assert based == gm.get_config("based", "tiny", sliding_window=16, conv_width=4)


@pytest.mark.parametrize("family,overrides,message", [
    ("moe", {"moe.top_k": 9}, r"moe\.top_k=9 exceeds moe\.num_experts=4"),
    ("moe", {"router": "bogus"}, r"moe\.router='bogus' is not one of"),
    ("moe", {"moe.experts": 4}, r"kind 'moe' has no option 'experts'\. Did you mean .*num_experts"),
    ("mor", {"routing_mode": "bogus"}, r"routing_mode='bogus' is not one of"),  # was accepted silently
    ("transformer", {"moe.top_k": 1}, r"options of \['moe'\] are set, but no layer .* uses that kind"),
    ("transformer", {"windw.size": 4}, r"no registered kind 'windw' has options\. Did you mean window"),
    ("transformer", {"layer_pattern": "sg", "window.size": 0}, r"window\.size=0 must be a positive number"),
    ("based", {"linear.impl": "pallas_gpu", "linear.chunk_size": 24}, r"linear\.chunk_size=24 must be a power of two"),
    ("moe", {"options": "x"}, r"options='x': set a kind's options as kind\.option=value"),
])
def test_bad_options_name_the_field_as_written(family, overrides, message):
    with pytest.raises(ConfigError, match=message):
        gm.get_config(family, "tiny", **overrides)


def test_capabilities_come_from_the_layers():
    # A linear mixer in the baseline's pattern: the model says it cannot keep packed documents
    # apart (so the trainer feeds plain windows) and a caller passing segment ids hears why.
    hybrid = gm.build("transformer", "tiny", layer_pattern="lg", max_seq_len=32)
    assert not hybrid.packed_documents and gm.build("transformer", "tiny").packed_documents
    with pytest.raises(ValueError, match="'linear' layers read across documents"):
        hybrid(jnp.zeros((1, 8), jnp.int32), segment_ids_BT=jnp.ones((1, 8), jnp.int32))
    # Routing modes: from the MoE FFN's options, or MoR's own router; causal copies by one call.
    ec = gm.get_config("moe", "tiny", router="expert_choice")
    assert ec.routing_modes() == ("topk", "threshold") and gm.get_config("moe", "tiny").routing_modes() == ()
    assert ec.with_routing_mode("threshold").options["moe"].routing_mode == "threshold"
    mor = gm.get_config("mor", "tiny", ffn="moe", router="expert_choice")
    both = mor.with_routing_mode("threshold")
    assert both.routing_mode == "threshold" and both.options["moe"].routing_mode == "threshold"


def test_causal_variant_is_built_under_an_active_mesh():
    # The trainer samples at the end of a run with its mesh and rules active; the causal copy
    # of an expert-choice model must build there too (it once failed on logical axis names).
    import jax

    from glocal import sharding as shd
    from glocal.generation import causal_variant

    model = gm.build("mor", "tiny")
    with jax.set_mesh(shd.make_mesh({"data": 1}, jax.devices()[:1])), shd.use_rules(shd.rule_table("fsdp")):
        causal = causal_variant(model)
    assert causal.config.routing_mode == "threshold" and model.config.routing_mode == "topk"
