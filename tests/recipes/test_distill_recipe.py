"""Knowledge distillation end to end through the real CLI on tiny models.

A real teacher is trained first (the SFT tiny config, 30 steps); a smaller random student
(1 layer, hidden 32, vs 2 layers, hidden 64) then distils it. Beyond "the loss went down",
the tests measure what distillation is for, on held-out examples and with the saved model:
the student's argmax agrees with the teacher's far more often, and the full-vocabulary
KL(teacher || student) falls.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignkit.config import ConfigError, find_config, load_config
from alignkit.data.batching import collate_rows
from alignkit.data.sft import load_sft_examples, make_rows
from alignkit.data.tokenize import IGNORE
from alignkit.models.forward import logits_at
from alignkit.models.loading import load_causal_lm, load_tokenizer
from alignkit.models.tokenizer import train_bpe_tokenizer
from alignkit.recipes import distill
from tests.conftest import run_cli

# One BLAS thread per run: these machines' cores are shared, and oversubscribed threads make
# a tiny model's forward pass tens of times slower.
ENV = {"OMP_NUM_THREADS": "1"}
QUIET = ["logging.tensorboard=false", "logging.progress=none"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_rows(out):
    return [r for r in metrics(out) if "kd_loss" in r]


def val_rows(out):
    return [r for r in metrics(out) if "val/kd_loss" in r]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    result = run_cli(
        "run",
        "sft",
        "--config",
        "tiny",
        f"output_dir={out}",
        "train.max_steps=30",
        "checkpoint.every=null",
        *QUIET,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    return out / "final"


def distill_args(out, teacher, *overrides):
    return [
        "run",
        "distill",
        "--config",
        "tiny",
        f"output_dir={out}",
        f"teacher.path={teacher}",
        "teacher.random_init=null",
        *QUIET,
        *overrides,
    ]


@pytest.fixture(scope="module")
def offline(tmp_path_factory, teacher):
    out = tmp_path_factory.mktemp("offline")
    result = run_cli(*distill_args(out, teacher), env=ENV)
    assert result.returncode == 0, result.stderr
    return out, result


def agreement_and_kl(student, teacher, batch):
    """Top-1 agreement and mean full-vocabulary KL(teacher || student) at the target tokens."""
    select = batch["target_ids"] != IGNORE
    with torch.no_grad():
        s = logits_at(student.eval(), batch["input_ids"], batch["position_ids"], select).float().log_softmax(-1)
        t = logits_at(teacher.eval(), batch["input_ids"], batch["position_ids"], select).float().log_softmax(-1)
    agreement = (s.argmax(-1) == t.argmax(-1)).float().mean().item()
    kl = (t.exp() * (t - s)).sum(-1).mean().item()
    return agreement, kl


def test_offline_distillation_moves_the_student_to_the_teacher(offline, teacher):
    out, result = offline
    assert "computing teacher top-8 logits for 256 train examples" in result.stderr
    assert len(list((out / "teacher_topk").glob("train-*.safetensors"))) == 1
    assert len(list((out / "teacher_topk").glob("validation-*.safetensors"))) == 1

    train = train_rows(out)
    assert [r["step"] for r in train] == list(range(1, 31))
    assert all(r["loss"] == pytest.approx(r["kd_loss"]) for r in train)  # sft_weight 0: pure KD
    first, last = [sum(r["kd_loss"] for r in rows) / 3 for rows in (train[:3], train[-3:])]
    assert last < 0.2 * first
    assert train[0]["teacher_top1_agreement"] < 0.05  # step 1 is measured on the initial student
    val = val_rows(out)
    assert [r["step"] for r in val] == [10, 20, 30]
    assert val[-1]["val/kd_loss"] < val[0]["val/kd_loss"]
    assert val[-1]["val/teacher_top1_agreement"] > 0.7

    # Independently, with the saved student, on the validation examples.
    cfg = load_config(distill.Config, out / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    examples, _ = load_sft_examples(cfg.data.validation, cfg.data, tokenizer)
    batch = collate_rows(make_rows(examples, cfg.data), tokenizer.pad_token_id)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher)
    initial = load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed)  # the run's starting point
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert final.config.num_hidden_layers == 1 and final.config.hidden_size == 32
    agree_before, kl_before = agreement_and_kl(initial, teacher_model, batch)
    agree_after, kl_after = agreement_and_kl(final, teacher_model, batch)
    assert agree_before < 0.05 and agree_after > 0.7
    assert agree_after == pytest.approx(val[-1]["val/teacher_top1_agreement"], abs=0.01)
    assert kl_after < 0.95 * kl_before


def test_online_mode_matches_offline_mode(offline, teacher, tmp_path):
    """The same teacher top-K, taken on the fly instead of from the cache: the same run."""
    out = tmp_path / "online"
    result = run_cli(*distill_args(out, teacher, "mode=online", "checkpoint.every=null"), env=ENV)
    assert result.returncode == 0, result.stderr
    assert "computing teacher" not in result.stderr and not (out / "teacher_topk").exists()
    keys = ["kd_loss", "sft_loss", "teacher_top1_agreement"]
    online, reference = train_rows(out), train_rows(offline[0])
    assert len(online) == len(reference) == 30
    for a, b in zip(online, reference):
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=1e-4, abs=1e-6), a["step"]
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.num_hidden_layers == 1


def test_resume_reuses_the_cache_and_matches_the_uninterrupted_run(offline, teacher, tmp_path):
    """Continue from the step-20 checkpoint of a copy of the offline run: same steps 21-30."""
    out = tmp_path / "resumed"
    shutil.copytree(offline[0], out)
    shutil.rmtree(out / "checkpoints" / "step_30")
    shutil.rmtree(out / "final")
    result = run_cli(*distill_args(out, teacher), env=ENV)
    assert result.returncode == 0, result.stderr
    assert "reusing cached teacher top-K for train" in result.stderr
    assert "computing teacher" not in result.stderr
    assert "resumed from" in result.stderr and "step 20 of 30" in result.stderr
    keys = ["kd_loss", "teacher_top1_agreement"]
    assert [r["step"] for r in train_rows(out)] == list(range(1, 31))  # steps 21-30 replaced, once each
    assert [r[k] for r in train_rows(out) for k in keys] == pytest.approx(
        [r[k] for r in train_rows(offline[0]) for k in keys], rel=1e-6
    )
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (out, offline[0]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.distributed
def test_two_processes_match_one(offline, teacher, tmp_path):
    """--nproc 2: each process computes half the teacher top-K; the run equals the 1-process one."""
    out = tmp_path / "two"
    result = run_cli(*distill_args(out, teacher, "--nproc", "2", "checkpoint.every=null"), env=ENV)
    assert result.returncode == 0, result.stderr
    assert not list((out / "teacher_topk").glob("*.part*"))  # shards merged and removed
    one, two = train_rows(offline[0]), train_rows(out)
    assert [r["kd_loss"] for r in two] == pytest.approx([r["kd_loss"] for r in one], rel=1e-4)


def test_shipped_tiny_config_runs_with_its_random_teacher(tmp_path):
    """The smoke config as shipped (in-process, shortened): the random teacher is not the student."""
    out = tmp_path / "smoke"
    cfg = load_config(
        distill.Config,
        find_config("distill", "tiny"),
        [
            f"output_dir={out}",
            "train.max_steps=2",
            "data.train.limit=64",
            "data.validation=null",
            "checkpoint.every=null",
            *QUIET,
        ],
    )
    distill.main(cfg)
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["kd_loss"] > 0
    assert (out / "final" / "model.safetensors").is_file()
    assert len(list((out / "teacher_topk").glob("train-*.safetensors"))) == 1


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
    other = train_bpe_tokenizer(["What is 2 + 2? The reverse of 'apple' is 'elppa'."] * 20, vocab_size=300)
    other.save_pretrained(tmp_path / "tok")
    cfg = load_config(
        distill.Config,
        find_config("distill", "tiny"),
        [f"output_dir={tmp_path / 'run'}", f"teacher.tokenizer_path={tmp_path / 'tok'}", *QUIET],
    )
    with pytest.raises(ConfigError, match="teacher and student tokenizers differ"):
        distill.main(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("teacher.lora.enabled=true", "the teacher is frozen"),
        ("top_k=0", "top_k"),
        ("loss.kl=backward", "loss.kl"),
    ],
)
def test_config_errors_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(distill.Config, find_config("distill", "tiny"), [f"output_dir={tmp_path}", override])
