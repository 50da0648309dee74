"""The model registry: presets belong to the family their file names (FAMILY), so a family
whose name extends another's (``transformer_toy``) neither steals nor loses presets, and
temporary registrations clean up."""

import dataclasses
import sys

import pytest

import glocal.models as gm
from glocal import configs as configs_pkg
from glocal.configs.base import Config, ConfigError, ModelConfig
from glocal.models import registry
from glocal.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class ToyConfig(ModelConfig):
    d_model: int = 8


class Toy:
    def __init__(self, cfg, *, rngs):
        self.config = cfg


@pytest.fixture
def preset_dir(tmp_path, monkeypatch):
    """An extra folder of preset files, searched as part of glocal/configs."""
    monkeypatch.setattr(configs_pkg, "__path__", [*configs_pkg.__path__, str(tmp_path)])
    yield tmp_path
    for name, module in list(sys.modules.items()):  # forget the imported toy presets
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def test_a_family_whose_name_extends_another_keeps_its_own_presets(preset_dir):
    (preset_dir / "transformer_toy_tiny.py").write_text('FAMILY = "transformer_toy"\nCONFIG = dict(d_model=4)\n')
    before = gm.list_presets("transformer")
    with registry.registered("transformer_toy", ToyConfig, Toy):
        assert gm.list_presets("transformer") == before == ["base", "bench", "delta_small", "sinks_small", "small", "tiny"]
        assert gm.list_presets("transformer_toy") == ["tiny"]
        assert gm.list_presets("moe") == ["base", "gpt_oss_tiny", "mixtral_tiny", "qwen3_next_small", "qwen3_next_tiny",
                                          "small", "tiny"]
        assert gm.split_config_name("transformer_toy_tiny") == ("transformer_toy", "tiny")
        assert gm.split_config_name("transformer_tiny") == ("transformer", "tiny")
        assert gm.get_config("transformer_toy", "tiny") == ToyConfig(d_model=4)
        with pytest.raises(ConfigError, match="unknown preset 'small'"):
            gm.get_config("transformer_toy", "small")
        with pytest.raises(ConfigError, match=r"unknown preset 'small' for model 'transformer_toy'; available: \['tiny'\]"):
            gm.split_config_name("transformer_toy_small")  # the longest family that matches
    assert "transformer_toy" not in gm.list_models()
    with pytest.raises(ConfigError, match="unknown preset 'toy_tiny' for model 'transformer'"):
        gm.split_config_name("transformer_toy_tiny")  # its family is no longer registered


def test_a_family_without_preset_files_has_no_presets():
    with registry.registered("transformer_toy", ToyConfig, Toy):
        assert gm.list_presets("transformer_toy") == []
        assert gm.split_config_name("transformer_small") == ("transformer", "small")
    with pytest.raises(ConfigError, match="unknown config 'nomodel_tiny'.*Available: .*'fit_tiny'"):
        gm.split_config_name("nomodel_tiny")


def test_a_preset_file_must_name_its_family(preset_dir):
    (preset_dir / "nofamily_tiny.py").write_text("CONFIG = dict(d_model=4)\n")
    with pytest.raises(ConfigError, match="nofamily_tiny.py must define FAMILY"):
        gm.list_presets("transformer")


def test_registered_restores_what_was_there_and_unregister_checks_the_name():
    original = registry._REGISTRY["fit"]
    with registry.registered("fit", ToyConfig, Toy):
        assert gm.config_class("fit") is ToyConfig
    assert registry._REGISTRY["fit"] == original
    with pytest.raises(ConfigError, match="cannot unregister 'nope'"):
        registry.unregister("nope")


def test_the_training_config_is_a_config_but_not_a_model_config():
    assert issubclass(TrainConfig, Config) and not issubclass(TrainConfig, ModelConfig)
    with pytest.raises(ConfigError, match="must derive from glocal.configs.base.ModelConfig"):
        gm.register("train_as_model", TrainConfig, Toy)
    assert "train_as_model" not in gm.list_models()
    tcfg = TrainConfig().replace(steps="7", mesh_data="2")  # the shared machinery still works
    assert TrainConfig.from_dict(tcfg.to_dict()) == tcfg and tcfg.steps == 7
    with pytest.raises(ConfigError, match="Did you mean steps"):
        tcfg.replace(stpes=3)


def test_every_shipped_presets_training_defaults_are_valid():
    for name in gm.list_models():
        for preset in gm.list_presets(name):
            TrainConfig().replace(**gm.preset_train_defaults(name, preset))  # raises on a bad field or value


def test_a_preset_can_carry_training_defaults(preset_dir, tmp_path):
    from glocal.workdir import resolve_configs
    (preset_dir / "transformer_lrtoy.py").write_text(
        'FAMILY = "transformer"\nCONFIG = dict(d_model=64)\nTRAIN = dict(learning_rate=1.5e-3, warmup_steps=7)\n')
    _, tcfg = resolve_configs("transformer_lrtoy", tmp_path / "new", {})
    assert (tcfg.learning_rate, tcfg.warmup_steps) == (1.5e-3, 7)
    _, tcfg = resolve_configs("transformer_lrtoy", tmp_path / "new", {"learning_rate": "5e-4"})
    assert (tcfg.learning_rate, tcfg.warmup_steps) == (5e-4, 7)  # the command line wins
    assert gm.preset_train_defaults("transformer", "tiny") == {}
    _, tcfg = resolve_configs("transformer_tiny", tmp_path / "new", {})
    assert tcfg.learning_rate == TrainConfig().learning_rate
    (preset_dir / "transformer_badtoy.py").write_text(
        'FAMILY = "transformer"\nCONFIG = dict(d_model=64)\nTRAIN = dict(learning_rat=1e-3)\n')
    with pytest.raises(ConfigError, match=r"TRAIN defaults of preset 'transformer_badtoy'.*no field 'learning_rat'"):
        resolve_configs("transformer_badtoy", tmp_path / "new", {})
