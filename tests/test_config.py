"""Recipes: extends, merging, overrides, smoke, identity."""

import pytest

from speedup.config import ConfigError, config_hash, load_config, recipe_names, resolve_recipe


def write(path, text):
    path.write_text(text)
    return path


def test_shipped_recipes_all_validate():
    names = recipe_names()
    assert "quickstart" in names
    for name in names:
        cfg = load_config(name)
        assert cfg.recipe == name
        load_config(name, smoke=True)


def test_extends_merges_child_over_base(tmp_path):
    write(tmp_path / "base.yaml", "extends: quickstart\nseed: 1\noptimizer:\n  lr: 0.5\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nseed: 2\n")
    cfg = load_config(str(child))
    assert cfg.seed == 2  # child wins
    assert cfg.optimizer.lr == 0.5 and cfg.optimizer.name == "adamw"  # base and grandparent
    assert cfg.model.name == "mnist1d_cnn"


def test_naming_another_component_replaces_its_section(tmp_path):
    child = write(tmp_path / "c.yaml", "extends: quickstart\noptimizer:\n  name: sgd\n  lr: 0.1\n")
    cfg = load_config(str(child))
    assert dict(cfg.optimizer) == {"name": "sgd", "lr": 0.1}  # adamw's weight_decay is gone
    cfg = load_config("quickstart", ["data.name=mnist1d", "data.length=40"])
    assert cfg.data.batch_size == 256


def test_overrides_and_deletion():
    cfg = load_config("quickstart", ["seed=3", "optimizer.lr=0.02", "~optimizer.weight_decay"])
    assert cfg.seed == 3 and cfg.optimizer.lr == 0.02
    assert "weight_decay" not in cfg.optimizer
    with pytest.raises(ConfigError, match="~nope: no such key"):
        load_config("quickstart", ["~nope"])
    with pytest.raises(ConfigError, match="must be key=value"):
        load_config("quickstart", ["seed"])


def test_smoke_shrinks_and_recipe_smoke_section_and_cli_come_later(tmp_path):
    recipe = write(tmp_path / "r.yaml", "extends: quickstart\nsmoke:\n  model:\n    channels: 4\n")
    cfg = load_config(str(recipe), ["data.batch_size=4"], smoke=True)
    assert cfg.max_duration == "4ba" and cfg.device == "cpu"
    assert cfg.model.channels == 4
    assert cfg.data.batch_size == 4 and cfg.data.train_samples == 64
    assert load_config(str(recipe)).model.channels == 32  # smoke: only under --smoke


def test_config_hash_is_stable_and_ignores_where_it_runs():
    a = load_config("quickstart")
    b = load_config("quickstart", ["run_dir=/tmp/elsewhere", "progress_bar=false"])
    c = load_config("quickstart", ["seed=99"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert len(config_hash(a)) == 8


def test_recipe_paths_and_names():
    assert resolve_recipe("quickstart").name == "quickstart.yaml"
    with pytest.raises(ConfigError, match="unknown recipe"):
        resolve_recipe("missing/thing.yaml")


def test_non_mapping_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(str(write(tmp_path / "l.yaml", "- a\n- b\n")))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(write(tmp_path / "b.yaml", "a: [1,\n")))


def test_scheduler_and_data_values_checked():
    with pytest.raises(ConfigError, match="scheduler.warmpu.*did you mean 'warmup'"):
        load_config("quickstart", ["scheduler.warmpu=10ba"])
    with pytest.raises(ConfigError, match="scheduler.warmup: malformed"):
        load_config("quickstart", ["scheduler.warmup=soon"])
    with pytest.raises(ConfigError, match="data.batch_size: must be > 0"):
        load_config("quickstart", ["data.batch_size=0"])
    with pytest.raises(ConfigError, match="unknown optimizer 'adamm'.*did you mean 'adam"):
        load_config("quickstart", ["optimizer.name=adamm"])
