"""Per-method sample sections, the rules between sections (at validation and at build), `recipes show`, flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import cdlm
from cdlm.cli import flags
from cdlm.cli.__main__ import app
from cdlm.config import RunConfig, SampleConfig
from cdlm.errors import DataError, RecipeError
from cdlm.recipes import list_names, stage_config, to_yaml, validate
from cdlm.registry import get_method
from cdlm_cola.config import ColaSampleConfig
from cdlm_elf.config import ElfConfig, ElfSampleConfig

ELF_ONLY = {"sampler", "grid", "grid_mean", "grid_std", "grid_shift", "churn", "guidance", "self_cond_scale"}
COLA_ONLY = {"sampler", "grid", "guidance", "max_new_tokens", "repetition_penalty"}


def one_line_error(call: object) -> str:
    with pytest.raises(RecipeError) as raised:
        call()  # type: ignore[operator]
    message = str(raised.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("name", [n for n in list_names() if n.startswith(("elf", "cola"))])
def test_every_recipe_samples_with_its_methods_settings(name: str) -> None:
    config = cdlm.load_recipe(name)
    assert type(config.sample) is get_method(config.method).sample_config_cls
    assert validate(yaml.safe_load(to_yaml(config))) == config  # the recorded config reads back the same
    for stage in config.stages:
        assert type(stage_config(config, stage.name).sample) is type(config.sample)


def test_core_keeps_only_the_shared_settings_and_plugins_add_theirs() -> None:
    core = set(SampleConfig.model_fields)
    assert core == {"num_samples", "batch_size", "steps", "temperature", "top_k", "top_p", "use_ema", "seed"} | {
        "num_threads"
    }
    assert set(ElfSampleConfig.model_fields) == core | ELF_ONLY
    assert set(ColaSampleConfig.model_fields) == core | COLA_ONLY


def test_defaults_are_each_references() -> None:
    elf = ElfSampleConfig()  # ELF-B headline setting, ELF spec §4.4
    assert (elf.sampler, elf.grid, elf.steps, elf.churn, elf.self_cond_scale, elf.guidance) == (
        "sde", "logit_normal", 32, 1.5, 3.0, 1.0
    )  # fmt: skip
    cola = ColaSampleConfig()  # generate_task_repaint_inference, Cola spec §5–7
    assert (cola.sampler, cola.grid, cola.steps, cola.guidance, cola.max_new_tokens, cola.batch_size) == (
        "euler", "uniform", 16, 7.0, 32, 20
    )  # fmt: skip
    assert (cola.temperature, cola.top_k, cola.top_p, cola.repetition_penalty) == (0.0, 50, 0.9, 1.1)
    assert "churn" not in type(cola).model_fields and not hasattr(cola, "churn")
    assert cdlm.load_recipe("cola-2b").sample == cola  # the benchmark protocol (spec §11.3) is the default
    assert cdlm.load_recipe("elf-105m").sample == elf


@pytest.mark.parametrize(
    ("recipe", "sample", "named"),
    [
        ("cola-tiny", "{churn: 1.5}", ["sample.churn: unknown field for method 'cola'", "repetition_penalty"]),
        ("cola-tiny", "{self_cond_scale: 3}", ["sample.self_cond_scale", "method 'cola'"]),
        ("cola-tiny", "{sampler: sde}", ["sample.sampler", "'euler', 'heun', 'midpoint' or 'dpm2m'"]),
        ("cola-tiny", "{grid: logit_normal}", ["sample.grid", "'uniform'"]),
        ("elf-tiny", "{max_new_tokens: 8}", ["sample.max_new_tokens: unknown field for method 'elf'", "churn"]),
        ("elf-tiny", "{repetition_penalty: 1.1}", ["sample.repetition_penalty", "method 'elf'"]),
    ],
)
def test_a_setting_the_method_does_not_use_is_refused(
    tmp_path: Path, recipe: str, sample: str, named: list[str]
) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(f"extends: {recipe}\nsample: {sample}\n")
    message = one_line_error(lambda: cdlm.load_recipe(path))
    assert message.startswith(f"{path}: sample.")
    for text in named:
        assert text in message


def test_a_stage_cannot_set_another_methods_setting() -> None:
    message = one_line_error(lambda: cdlm.load_recipe("cola-tiny", ["stages.joint.sample.churn=2"]))
    assert message.startswith("--set stages.joint.sample.churn=2: stages.joint: sample.churn: unknown field")


@pytest.mark.parametrize(
    ("recipe", "overrides", "named"),
    [
        ("elf-tiny", ["data.seq_len=128"], ["--set data.seq_len=128: data.seq_len: 128", "model.max_length 64"]),
        (
            "elf-tiny",
            ["data.vocab_size=8192", "model.vocab_size=8192", "model.encoder.mlm_mask_prob=null"],
            ["model.encoder.vocab_size 4097"],
        ),
        ("elf-tiny", ["model.eos_id=4096"], ["--set model.eos_id=4096: model.eos_id: 4096", "[0, 4096)"]),
        ("cola-tiny", ["sample.max_new_tokens=5000"], ["sample.max_new_tokens: 5000", "model.max_length 4096"]),
        ("cola-tiny", ["data.vocab_size=1024"], ["data.vocab_size: 1024", "model.vae.vocab_size 512"]),
        ("cola-tiny", ["data.seq_len=2"], ["--set data.seq_len=2: model.block_sizes", "at most 2 latents"]),
        ("cola-tiny", ["model.block_sizes=[128]"], ["model.block_sizes", "data.seq_len 64"]),
    ],
)
def test_cross_section_rules_at_validation(recipe: str, overrides: list[str], named: list[str]) -> None:
    message = one_line_error(lambda: cdlm.load_recipe(recipe, overrides))
    for text in named:
        assert text in message, message


def test_cola_block_rule_applies_only_where_the_dit_trains() -> None:
    config = cdlm.load_recipe("cola-tiny", ["data.seq_len=2", "model.stage=vae", "stages=[]"])
    assert config.data.seq_len == 2


def test_build_checks_a_config_changed_in_python() -> None:
    config = cdlm.load_recipe("elf-tiny")
    longer = config.model_copy(update={"data": config.data.model_copy(update={"seq_len": 128})})
    message = one_line_error(lambda: cdlm.build(longer))
    assert message.startswith("data.seq_len: 128 differs from model.max_length 64")
    cola = cdlm.load_recipe("cola-tiny")
    greedy = cola.model_copy(update={"sample": cola.sample.model_copy(update={"max_new_tokens": 9999})})
    assert "sample.max_new_tokens: 9999 new tokens exceed model.max_length 4096" in one_line_error(
        lambda: cdlm.build(greedy)
    )


def test_build_refuses_sections_of_another_class() -> None:
    made = RunConfig(method="elf", model=ElfConfig(max_length=128), data={"seq_len": 128})
    message = one_line_error(lambda: cdlm.build(made))
    assert message.startswith("sample: method 'elf' takes cdlm_elf.config.ElfSampleConfig, got SampleConfig")
    fixed = made.model_copy(update={"sample": ElfSampleConfig()})
    with torch.device("meta"):
        assert cdlm.build(fixed).vocab_size == 32100
    other = cdlm.load_recipe("cola-tiny")
    with pytest.raises(RecipeError) as raised:
        cdlm.build(other.model_copy(update={"method": "elf"}))
    model, sample = str(raised.value).splitlines()  # one line per problem
    assert model.startswith("model: method 'elf' takes cdlm_elf.config.ElfConfig, got ColaConfig")
    assert sample.startswith("sample: method 'elf' takes cdlm_elf.config.ElfSampleConfig, got ColaSampleConfig")


def test_recipes_show_prints_the_methods_sample_section() -> None:
    shown = CliRunner().invoke(app, ["recipes", "show", "cola-tiny"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert yaml.safe_load(shown.stdout) == yaml.safe_load(to_yaml(cdlm.load_recipe("cola-tiny")))
    lines = shown.stdout.splitlines()
    header = lines.index("sample:  # the sample settings of method 'cola' (ColaSampleConfig); it takes no others")
    section = lines[header + 1 : header + 1 + len(ColaSampleConfig.model_fields)]
    assert [line.split(":")[0].strip() for line in section] == list(ColaSampleConfig.model_fields)
    guidance = next(line for line in section if line.strip().startswith("guidance:"))
    assert guidance.startswith("  guidance: 3.0") and "guidance scale" in guidance and guidance.endswith("default 7.0")
    assert "churn" not in shown.stdout
    elf = CliRunner().invoke(app, ["recipes", "show", "elf-tiny"], catch_exceptions=False).stdout
    assert "churn: 1.5" in elf and "SDE γ" in elf and "max_new_tokens" not in elf


def test_a_flag_the_method_does_not_use_names_the_method_and_its_flags() -> None:
    config = cdlm.load_recipe("elf-tiny")
    given = flags.overrides({"steps": 4, "max_new_tokens": 8, "repetition_penalty": None})
    assert given == {"sample.steps=4": "--steps 4", "sample.max_new_tokens=8": "--max-new-tokens 8"}
    with pytest.raises(DataError) as raised:
        flags.check_used(config, given, tuple(flags.SAMPLE_FLAGS))
    message = str(raised.value)
    assert message.startswith("--max-new-tokens 8: method 'elf' does not use this flag; the sampling flags it takes")
    takes = message.split("it takes are ")[1].split(" (")[0].split(", ")
    assert takes == ["--num-samples", "--steps", "--sampler", "--guidance", "--seed", "--temperature", "--top-k"] + [
        "--top-p",
        "--ema/--raw-weights",
    ]
    flags.check_used(cdlm.load_recipe("cola-tiny"), given, tuple(flags.SAMPLE_FLAGS))  # Cola uses both


@pytest.mark.parametrize("recipe", ["elf-seq2seq-tiny", "cola-tiny"])
def test_run_configs_saved_before_the_guidance_rename_still_load(recipe: str) -> None:
    raw = yaml.safe_load(to_yaml(cdlm.load_recipe(recipe)))
    raw["sample"]["cfg"] = raw["sample"].pop("guidance")  # how config.yaml files said it before
    assert validate(raw).sample.guidance == cdlm.load_recipe(recipe).sample.guidance
