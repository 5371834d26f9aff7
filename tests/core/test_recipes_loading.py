"""Recipe loading: extends, overrides, and clear errors for bad recipes and bad overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdlm.errors import RecipeError
from cdlm.recipes import list_recipes, load_recipe, to_yaml


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_shipped_recipe_has_a_description() -> None:
    recipes = list_recipes()
    assert {"elf-105m", "elf-342m", "elf-652m", "elf-tiny"} <= set(recipes)
    assert all(description for description in recipes.values())


def test_extends_merges_sections_and_child_wins() -> None:
    config = load_recipe("elf-342m")
    assert (config.model.depth, config.model.hidden_size, config.model.num_heads) == (24, 1056, 16)
    assert config.model.bottleneck_dim == 128  # inherited from elf-105m
    assert config.sample.steps == 64 and config.sample.churn == 1.0
    assert config.train.lr == 2e-3


def test_overrides_are_parsed_as_yaml() -> None:
    config = load_recipe(
        "elf-105m", ["train.lr=3e-4", "model.depth=2", "sample.sampler=heun", "train.trackers=[tensorboard]"]
    )
    assert config.train.lr == 3e-4 and config.model.depth == 2 and config.sample.sampler == "heun"
    assert config.train.trackers == ["tensorboard"]


def test_unknown_field_names_the_file_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "extends: elf-105m\ntrain: {lrr: 0.1}\nmodel: {depht: 3}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    lines = str(err.value).splitlines()
    assert f"{path}: train.lrr: unknown field; did you mean 'lr'?" in lines
    assert f"{path}: model.depht: unknown field; did you mean 'depth'?" in lines


def test_ill_typed_override_names_the_override() -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe("elf-105m", ["train.lr=fast"])
    message = str(err.value)
    assert message.startswith("--set train.lr=fast: train.lr:") and "'fast'" in message


def test_override_without_equals_sign() -> None:
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe("elf-105m", ["train.lr"])


def test_unknown_recipe_suggests_a_name() -> None:
    with pytest.raises(RecipeError, match="did you mean 'elf-tiny'"):
        load_recipe("elf-tinny")


def test_unknown_method_lists_installed(tmp_path: Path) -> None:
    path = write(tmp_path / "m.yaml", "method: nope\nmodel: {}\n")
    with pytest.raises(RecipeError, match="'nope' is not installed; installed: \\[.*'elf'"):
        load_recipe(str(path))


def test_extends_cycle_is_reported(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(str(tmp_path / "a.yaml"))


def test_invalid_yaml_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(write(tmp_path / "x.yaml", "model: [unclosed\n")))
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(str(write(tmp_path / "y.yaml", "- 1\n- 2\n")))


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = load_recipe("elf-105m")
    path = write(tmp_path / "resolved.yaml", to_yaml(config))
    assert load_recipe(str(path)) == config


def test_stages_merge_and_set_wins_over_stage_values(tmp_path: Path) -> None:
    path = write(
        tmp_path / "staged.yaml",
        "extends: elf-tiny\nstages:\n"
        "  - {name: one, overrides: {train: {steps: 7, lr: 0.5}}}\n"
        "  - {name: two, overrides: {model: {depth: 1}}}\n",
    )
    from cdlm.recipes import stage_config

    config = load_recipe(str(path), ["train.steps=2"])
    one, two = stage_config(config, "one"), stage_config(config, "two")
    assert (one.train.steps, one.train.lr, one.model.depth) == (2, 0.5, config.model.depth)
    assert (two.train.steps, two.model.depth, two.stages) == (2, 1, [])
    with pytest.raises(RecipeError, match="stage 'three' not found"):
        stage_config(config, "three")


def test_invalid_stage_is_reported_at_load(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "extends: elf-tiny\nstages:\n  - {name: one, overrides: {train: {stepz: 1}}}\n")
    with pytest.raises(RecipeError, match="stages.one: .*train.stepz: unknown field"):
        load_recipe(str(path))
