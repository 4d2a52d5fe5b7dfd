"""SFT end to end through the real CLI on a tiny model."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.config import find_config, load_config
from alignkit.data.batching import collate_rows
from alignkit.data.tokenize import IGNORE, encode_conversation
from alignkit.losses.sft import sft_loss
from alignkit.models.forward import logits_at
from alignkit.recipes import sft
from tests.conftest import run_cli, tiny_model


def response_nll(model, tokenizer):
    messages = [{"role": "user", "content": "What is 31 + 45?"}, {"role": "assistant", "content": "31 + 45 = 76."}]
    batch = collate_rows([[encode_conversation(tokenizer, messages, None, "t")]], tokenizer.pad_token_id)
    select = batch["target_ids"] != IGNORE
    with torch.no_grad():
        logits = logits_at(model.eval(), batch["input_ids"], batch["position_ids"], select)
    return float(sft_loss(logits, batch["target_ids"][select])[0]) / batch["num_units"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


def test_sft_tiny_runs_and_saves_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", "sft", "--config", "tiny", f"output_dir={out}", "train.max_steps=30")
    assert result.returncode == 0, result.stderr
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert train[-1]["loss"] < 0.7 * train[0]["loss"]
    assert len(val) == 3 and val[-1]["val/loss"] < val[0]["val/loss"]
    assert {"lr", "grad_norm", "throughput/tokens_per_s"} <= set(train[0])
    assert (out / "config.yaml").is_file() and (out / "tensorboard").is_dir()
    trained = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    untrained = tiny_model(tokenizer)
    # the reloaded model predicts a held-out answer far better than the untrained one
    assert response_nll(trained, tokenizer) < 0.6 * response_nll(untrained, tokenizer)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    common = [
        "run",
        "sft",
        "--config",
        "tiny",
        "train.max_steps=16",
        "checkpoint.every=5",
        "data.validation=null",
        "logging.tensorboard=false",
    ]
    straight = tmp_path / "straight"
    assert run_cli(*common, f"output_dir={straight}").returncode == 0
    killed = tmp_path / "killed"
    first = run_cli(*common, f"output_dir={killed}", env={"ALIGNKIT_TEST_KILL_AT_STEP": "12"})
    assert first.returncode == -9  # SIGKILL, after the step-10 checkpoint and 2 more steps
    assert (killed / "checkpoints" / "step_10" / "COMPLETE").is_file() and not (killed / "final").exists()
    second = run_cli(*common, f"output_dir={killed}")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "step 10 of 16" in second.stderr
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the metrics file reads as one run: steps 1..16 once each, same losses
    assert [r["step"] for r in metrics(killed)] == list(range(1, 17))
    assert [r["loss"] for r in metrics(killed)] == pytest.approx([r["loss"] for r in metrics(straight)], rel=1e-6)


def run_inprocess(tmp_path, name, *overrides):
    cfg = load_config(
        sft.Config,
        find_config("sft", "tiny"),
        [
            f"output_dir={tmp_path / name}",
            "data.validation=null",
            "logging.tensorboard=false",
            "checkpoint.every=null",
            "logging.progress=none",
            *overrides,
        ],
    )
    sft.main(cfg)
    return weights(tmp_path / name)


def test_accumulation_is_normalised_by_token_count(tmp_path):
    """micro-batch 8 x accumulation 1 == micro-batch 2 x accumulation 4 (same global batch)."""
    # unpacked rows of different lengths, so per-micro-batch averaging would weigh tokens differently
    common = ["train.max_steps=3", "train.global_batch_size=8", "data.pack=false", "optim.lr=1e-2"]
    a = run_inprocess(tmp_path, "mb8", *common, "train.micro_batch_size=8")
    b = run_inprocess(tmp_path, "mb2", *common, "train.micro_batch_size=2")
    base = run_inprocess(tmp_path, "short", "train.max_steps=1", "train.global_batch_size=8", "data.pack=false")
    assert all(torch.allclose(a[k], b[k], atol=2e-6) for k in a)
    assert not all(torch.allclose(a[k], base[k], atol=2e-6) for k in a)  # training did move the weights


def test_lora_run_saves_merged_and_adapter_models(tmp_path):
    lora = ["model.lora.enabled=true", "model.lora.r=4", "train.max_steps=4", "data.validation=null"]
    merged = tmp_path / "merged"
    assert run_cli("run", "sft", "--config", "tiny", f"output_dir={merged}", *lora).returncode == 0
    sd = weights(merged)
    assert not any("lora" in k for k in sd)
    model = AutoModelForCausalLM.from_pretrained(merged / "final")
    assert sum(p.numel() for p in model.parameters()) > 0
    adapter = tmp_path / "adapter"
    result = run_cli("run", "sft", "--config", "tiny", f"output_dir={adapter}", *lora, "model.lora.merge_on_save=false")
    assert result.returncode == 0, result.stderr
    assert (adapter / "final" / "adapter_model.safetensors").is_file()


def test_bf16_autocast_trains(tmp_path):
    out = tmp_path / "bf16"
    result = run_cli(
        "run",
        "sft",
        "--config",
        "tiny",
        f"output_dir={out}",
        "model.precision=bf16_autocast",
        "train.max_steps=10",
        "data.validation=null",
    )
    assert result.returncode == 0, result.stderr
    rows = metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_cli_reports_config_and_data_errors_without_traceback(tmp_path):
    bad_key = run_cli("run", "sft", "--config", "tiny", "optim.lrr=1")
    assert bad_key.returncode == 2 and "did you mean 'optim.lr'" in bad_key.stderr
    assert "Traceback" not in bad_key.stderr
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    bad_data = run_cli("run", "sft", "--config", "tiny", f"output_dir={tmp_path / 'o'}", f"data.train.path={data}")
    assert bad_data.returncode == 2 and f"{data}:2: malformed JSON" in bad_data.stderr
    assert "Traceback" not in bad_data.stderr
    unknown = run_cli("run", "sftt", "--config", "tiny")
    assert unknown.returncode == 2 and "did you mean 'sft'" in unknown.stderr


def test_ls_and_validate(tmp_path):
    listing = run_cli("ls")
    assert listing.returncode == 0 and "sft" in listing.stdout and "tiny" in listing.stdout
    ok = run_cli("validate", "configs/sft/tiny.yaml")
    assert ok.returncode == 0 and "valid sft config" in ok.stdout
    bad = tmp_path / "sft.yaml"
    bad.write_text("recipe: sft\noutput_dir: o\nmodel: {path: m}\ndata: {train: {path: x}}\ntrain: {epochs: two}\n")
    result = run_cli("validate", str(bad))
    assert result.returncode == 2 and "train.epochs" in result.stderr and "valid integer" in result.stderr
    bad.write_text("recipe: sft\noutput_dir: [o\n")
    result = run_cli("validate", str(bad))
    assert result.returncode == 2 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr
