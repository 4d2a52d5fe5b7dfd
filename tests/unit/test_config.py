import re

import pytest
from pydantic import ValidationError

from alignkit.config import ConfigError, find_config, load_config, parse_overrides
from alignkit.recipes import recipe_module
from alignkit.recipes.sft import Config as SFTConfig


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


BASE = """
output_dir: out
model: {random_init: {architecture: llama}}
data: {train: {path: x.jsonl}}
"""


def test_valid_config_gets_defaults(tmp_path):
    cfg = load_config(SFTConfig, write(tmp_path, BASE))
    assert cfg.train.global_batch_size == 16 and cfg.optim.schedule == "cosine" and cfg.data.pack is True


def test_overrides_parse_yaml_scalars(tmp_path):
    cfg = load_config(
        SFTConfig,
        write(tmp_path, BASE),
        ["optim.lr=2e-5", "train.max_steps=7", "data.pack=false", "model.lora.target_modules=[q_proj,v_proj]"],
    )
    assert cfg.optim.lr == 2e-5 and cfg.train.max_steps == 7 and cfg.data.pack is False
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]


def test_a_jinja_template_override_is_text_as_written_or_read_from_a_file(tmp_path):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    cfg = load_config(SFTConfig, write(tmp_path, BASE), [f"data.chat_template={template}"])
    assert cfg.data.chat_template == template
    (tmp_path / "t.jinja").write_text(template + "\n")
    cfg = load_config(SFTConfig, write(tmp_path, BASE), [f"data.chat_template=@{tmp_path / 't.jinja'}"])
    assert cfg.data.chat_template == template + "\n"
    with pytest.raises(ConfigError, match=r"override of 'data.chat_template': file not found: .*nope.jinja"):
        load_config(SFTConfig, write(tmp_path, BASE), [f"data.chat_template=@{tmp_path / 'nope.jinja'}"])


def test_unknown_key_names_key_and_nearest_spelling(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.learning_rat'.*") as err:
        load_config(SFTConfig, write(tmp_path, BASE), ["optim.learning_rat=1"])
    with pytest.raises(ConfigError, match=r"'train\.max_step'; did you mean 'train\.max_steps'"):
        load_config(SFTConfig, write(tmp_path, BASE), ["train.max_step=3"])
    with pytest.raises(ConfigError, match=r"'data\.train\.pth'; did you mean 'data\.train\.path'"):
        load_config(SFTConfig, write(tmp_path, BASE + "\n"), ["data.train.pth=y"])
    assert "valid keys here" in str(err.value)


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'ouput_dir'; did you mean 'output_dir'"):
        load_config(SFTConfig, write(tmp_path, BASE + "ouput_dir: y\n"))


def test_missing_required_value_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required config value 'data\.train\.path'"):
        load_config(SFTConfig, write(tmp_path, "output_dir: o\nmodel: {path: m}\ndata: {train: {split: a}}\n"))
    with pytest.raises(ConfigError, match=r"missing required config value 'output_dir'"):
        load_config(SFTConfig, write(tmp_path, "model: {path: m}\ndata: {train: {path: a}}\n"))


def test_wrong_type_names_key_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'train\.max_steps': Input should be a valid integer.*'ten'"):
        load_config(SFTConfig, write(tmp_path, BASE), ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"'model\.precision'.*'fp32', 'bf16_autocast' or 'bf16'"):
        load_config(SFTConfig, write(tmp_path, BASE), ["model.precision=fp16"])


def test_model_needs_path_or_random_init(tmp_path):
    with pytest.raises(ConfigError, match=r"model.*set `path`"):
        load_config(SFTConfig, write(tmp_path, "output_dir: o\nmodel: {precision: fp32}\ndata: {train: {path: a}}\n"))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["lr"])


def test_find_config_shipped_and_suggestion():
    assert find_config("sft", "tiny").name == "tiny.yaml"
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        find_config("sft", "tinny")


@pytest.mark.parametrize(
    "override, ours",
    [
        ("optim.learning_rate=1e-5", "optim.lr"),
        ("train.num_train_epochs=2", "train.epochs"),
        ("optim.max_grad_norm=1", "optim.grad_clip"),
        ("model.lora.lora_r=8", "model.lora.r"),
    ],
)
def test_names_from_transformers_and_trl_point_to_ours(tmp_path, override, ours):
    key = re.escape(override.split("=")[0])
    with pytest.raises(ConfigError, match=rf"'{key}'; did you mean '{re.escape(ours)}'"):
        load_config(SFTConfig, write(tmp_path, BASE), [override])


@pytest.mark.parametrize(
    "override",
    [
        "train.max_steps=-5",
        "train.max_steps=0",
        "train.global_batch_size=0",
        "train.micro_batch_size=0",
        "optim.lr=-1e-4",
        "optim.lr=0",
        "optim.warmup_steps=-1",
        "optim.min_lr_ratio=2",
        "checkpoint.keep_last=0",
        "data.max_seq_len=0",
        "model.lora.r=0",
        "model.lora.dropout=1",
    ],
)
def test_values_out_of_range_fail_at_start_naming_the_key(tmp_path, override):
    key = re.escape(override.split("=")[0])
    with pytest.raises(ConfigError, match=rf"config key '{key}': Input should be"):
        load_config(SFTConfig, write(tmp_path, BASE), [override])


def test_an_algorithm_that_is_an_option_names_its_recipe():
    with pytest.raises(ConfigError, match=r"unknown recipe 'grpo'; use reinforce with reinforce\.estimator=grpo"):
        recipe_module("grpo")
    with pytest.raises(ConfigError, match=r"unknown recipe 'kto'; use dpo with loss\.type=kto"):
        recipe_module("kto")
    with pytest.raises(ConfigError, match=r"unknown recipe 'sfft'; did you mean 'sft'"):
        recipe_module("sfft")


def test_a_section_given_as_true_keeps_it_when_a_key_of_it_is_overridden(tmp_path):
    """`gradient_checkpointing: true` in the file and `...gradient_checkpointing.mode=selective` on the
    command line: still enabled, now selective (not a fresh section with enabled false)."""
    from alignkit.recipes import sft

    path = tmp_path / "c.yaml"
    path.write_text(
        "output_dir: x\nmodel: {random_init: {}, gradient_checkpointing: true}\ndata: {train: {path: d.jsonl}}\n"
    )
    cfg = load_config(sft.Config, path, ["model.gradient_checkpointing.mode=selective"])
    assert cfg.model.gradient_checkpointing.enabled and cfg.model.gradient_checkpointing.mode == "selective"


@pytest.mark.parametrize(
    "reward,critic,message",
    [
        ({"ranks": 1, "colocate_with": "critic"}, {"ranks": 2}, "as many each (placement.reward.ranks=1"),
        ({"ranks": 2, "colocate_with": "critic"}, {"ranks": 0}, "placement.critic.ranks=0"),
        ({"ranks": 2, "colocate_with": "reward"}, {"ranks": 2}, "cannot share its own"),
        ({"ranks": 2}, {"ranks": 2, "colocate_with": "generator"}, "placement.generator.ranks=0"),
    ],
)
def test_colocation_needs_two_placed_roles_of_the_same_size(reward, critic, message):
    from alignkit.config import PlacementConfig

    with pytest.raises(ValidationError, match=re.escape(message)):
        PlacementConfig(reward=reward, critic=critic)
    assert PlacementConfig(reward={"ranks": 2, "colocate_with": "critic"}, critic={"ranks": 2}).reward.ranks == 2
