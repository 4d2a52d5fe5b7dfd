"""The variants of the reinforce recipe end to end through the real CLI on a tiny random Llama:
DAPO's dynamic sampling, GSPO and CISPO, REINFORCE++, the Dr. GRPO aggregation with the overlong
penalty, on-policy distillation. (A module of its own so that the test workers share the load.)"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import read_metrics as metrics
from tests.recipes.test_ppo import VOWELS, reward_rise
from tests.recipes.test_reinforce import reinforce


def half_constant_reward(prompts, responses):
    """A 0/1 reward that never varies on half of the prompts (a constant 0) and varies with the
    response on the other half: the zero-variance groups dynamic sampling is for."""
    return [float(len(r) % 2) if sum(map(ord, str(p))) % 2 else 0.0 for p, r in zip(prompts, responses)]


HALF = ["reinforce.estimator=grpo", "reward.kind=function", f"reward.function={__name__}:half_constant_reward"]


def test_dynamic_sampling_draws_until_groups_carry_signal(tmp_path):
    base = ["reinforce.steps=2", "checkpoint.every=null", "checkpoint.save_final=false", *HALF]
    reinforce(tmp_path / "once", *base)
    reinforce(tmp_path / "dapo", *base, "reinforce.max_draws=4", "reinforce.clip_eps_high=0.28")
    once, dapo = metrics(tmp_path / "once"), metrics(tmp_path / "dapo")
    assert all(r["rollout/draws"] == 1 and r["rollout/groups_discarded"] == 0 for r in once)
    assert sum(r["rollout/zero_variance_groups"] for r in once) > 0.5  # about half of them
    for r in dapo:
        assert r["rollout/draws"] > 1 and r["rollout/groups_drawn"] > 8 and r["rollout/groups_discarded"] > 0
        assert r["rollout/samples"] == 32  # the step still trains on 8 groups of 4
    assert sum(r["rollout/zero_variance_groups"] for r in dapo) < sum(r["rollout/zero_variance_groups"] for r in once)


def _final_weights(out):
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


@pytest.mark.parametrize(
    "variant, twin",
    [
        # with one update per step the ratio is 1, where GSPO's gradient is GRPO's with a sequence mean,
        # and CISPO's (the weight min(1, 1 + eps) = 1) is the plain token-mean REINFORCE gradient
        ("reinforce.policy_loss=gspo", "reinforce.policy_loss=ppo"),
        ("reinforce.policy_loss=cispo", "reinforce.policy_loss=ppo"),
    ],
)
def test_gspo_and_cispo_on_policy_equal_the_clipped_surrogate(tmp_path, variant, twin):
    agg = "reinforce.loss_aggregation=" + ("seq-mean-token-mean" if "gspo" in variant else "token-mean")
    common = [*VOWELS, "reinforce.estimator=grpo", "reinforce.steps=2", "checkpoint.every=null", agg]
    reinforce(tmp_path / "a", *common, variant, "reinforce.clip_eps=3e-4", "reinforce.clip_eps_high=4e-4")
    reinforce(tmp_path / "b", *common, twin)
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    moved = metrics(tmp_path / "a")
    assert moved[-1]["actor/grad_norm"] > 0


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_pp_baseline"])
def test_reinforce_pp_whitens_over_the_batch_and_learns(tmp_path, estimator):
    out = tmp_path / estimator
    reinforce(
        out, *VOWELS, f"reinforce.estimator={estimator}", "reinforce.steps=10", "optim.lr=3e-3", "checkpoint.every=null"
    )
    m = metrics(out)
    assert reward_rise(m) > 1.5, [r["rollout/reward"] for r in m]  # measured 1.98-2.39 (1.38-1.51 at lr 1e-3)
    assert m[0]["rollout/kl"] == pytest.approx(0.0, abs=1e-6) and m[-1]["rollout/kl"] > 0  # k1 in the reward
    # whitened over the batch's tokens: the mean |advantage| of a unit-variance batch is near 0.8
    assert 0.3 < m[-1]["rollout/advantages_abs_mean"] < 1.5


def test_seq_mean_token_sum_and_overlong_penalty(tmp_path):
    out = tmp_path / "drgrpo"
    reinforce(
        out,
        *VOWELS,
        "reinforce.estimator=grpo",
        "reinforce.scale_rewards=false",
        "reinforce.loss_aggregation=seq-mean-token-sum",
        "reinforce.overlong_buffer=8",
        "reinforce.steps=2",
        "checkpoint.every=null",
    )
    m = metrics(out)
    # a random model runs to max_new_tokens (16): the full penalty of -1 on nearly every sample
    assert -1.0 <= m[0]["rollout/overlong_penalty"] < -0.8


def test_onpolicy_distillation_moves_the_student_toward_the_teacher(tmp_path, tokenizer):
    from alignkit.models.loading import save_causal_lm
    from tests.conftest import tiny_model

    # the teacher: the student's own weights with its output logits scaled by 8 (a sharper version
    # of the same distribution), so the reverse KL starts large and the student can close it
    student = tiny_model(tokenizer, seed=7)
    student_dir = save_causal_lm(student, student.state_dict(), tokenizer, tmp_path / "start")
    with torch.no_grad():
        student.lm_head.weight.mul_(8.0)
    teacher_dir = save_causal_lm(student, student.state_dict(), tokenizer, tmp_path / "teacher")
    out = tmp_path / "student"
    reinforce(
        out,
        f"model.path={student_dir}",
        "model.random_init=null",
        "reinforce.estimator=onpolicy_distill",
        f"teacher.path={teacher_dir}",
        "reinforce.kl_coef=0",
        "reward=null",
        "reinforce.steps=12",
        "checkpoint.every=null",
        "optim.lr=3e-3",
    )
    m = metrics(out)
    kl = [r["actor/reverse_kl"] for r in m]  # per token, over the teacher's top 64, at the student's states
    assert sum(kl[-2:]) < 0.7 * sum(kl[:2]), kl
    assert m[0]["rollout/reward"] == 0.0 and m[0]["rollout/teacher_kl"] > 0  # no reward source: nothing scored
    sampled = tmp_path / "sampled"  # the per-token estimate as a policy gradient: runs, logs the same KL
    reinforce(
        sampled,
        f"model.path={student_dir}",
        "model.random_init=null",
        "reinforce.estimator=onpolicy_distill",
        "reinforce.distill_loss=sampled",
        f"teacher.path={teacher_dir}",
        "reinforce.kl_coef=0",
        "reward=null",
        "reinforce.steps=2",
        "checkpoint.every=null",
    )
    assert metrics(sampled)[0]["rollout/teacher_kl"] == pytest.approx(m[0]["rollout/teacher_kl"], rel=1e-5)


def test_a_teacher_behind_an_endpoint_trains_the_student_as_a_local_one(tmp_path, tokenizer):
    """The teacher served by `alignkit serve generate` (its prompt_logprobs over the student's
    tokens) gives the same steps as the same teacher loaded locally: top-K loss and sampled loss."""
    from alignkit.models.loading import load_for_eval, save_causal_lm
    from alignkit.serving.openai_server import create_app
    from tests.conftest import tiny_model
    from tests.unit.serving.test_reward_server import Server

    student = tiny_model(tokenizer, seed=7)
    student_dir = save_causal_lm(student, student.state_dict(), tokenizer, tmp_path / "start")
    with torch.no_grad():
        student.lm_head.weight.mul_(4.0)
    teacher_dir = save_causal_lm(student, student.state_dict(), tokenizer, tmp_path / "teacher")
    base = [
        f"model.path={student_dir}",
        "model.random_init=null",
        "reinforce.estimator=onpolicy_distill",
        "reinforce.kl_coef=0",
        "reward=null",
        "reinforce.steps=2",
        "reinforce.teacher_top_k=20",
        "checkpoint.every=null",
        "checkpoint.save_final=false",
    ]
    model, tok = load_for_eval(teacher_dir)
    with Server(create_app(model, tok, "teacher", max_tokens_limit=4)) as url:
        for loss in ("topk", "sampled"):
            local, remote = tmp_path / f"local_{loss}", tmp_path / f"remote_{loss}"
            reinforce(local, *base, f"reinforce.distill_loss={loss}", f"teacher.path={teacher_dir}")
            reinforce(remote, *base, f"reinforce.distill_loss={loss}", f"teacher_server.url={url}/v1", "teacher=null")
            for a, b in zip(metrics(local), metrics(remote), strict=True):
                assert b["rollout/teacher_kl"] == pytest.approx(a["rollout/teacher_kl"], rel=1e-4)
                assert b["actor/loss"] == pytest.approx(a["actor/loss"], rel=1e-4, abs=1e-6)
                assert a["rollout/teacher_kl"] > 0.1  # a sharper teacher: far from the student


def test_onpolicy_distillation_needs_one_teacher(tmp_path):
    result = reinforce(tmp_path / "run", "reinforce.estimator=onpolicy_distill", ok=False)
    assert result.returncode == 2 and "needs one teacher: a local model (teacher.path)" in result.stderr
    both = ["reinforce.estimator=onpolicy_distill", "teacher.path=x", "teacher_server.url=http://127.0.0.1:9/v1"]
    result = reinforce(tmp_path / "two", *both, ok=False)
    assert result.returncode == 2 and "needs one teacher" in result.stderr
    result = reinforce(tmp_path / "k", *both[::2], "teacher=null", "reinforce.teacher_top_k=64", ok=False)
    assert result.returncode == 2 and "at most 20" in result.stderr


def test_an_unreachable_teacher_endpoint_is_named(tmp_path):
    result = reinforce(
        tmp_path / "run",
        "reinforce.estimator=onpolicy_distill",
        "reinforce.kl_coef=0",
        "reward=null",
        "teacher_server.url=http://127.0.0.1:9/v1",
        "teacher_server.retries=0",
        "reinforce.teacher_top_k=8",
        ok=False,
    )
    assert result.returncode != 0 and "teacher http://127.0.0.1:9/v1 unreachable" in result.stderr


def test_a_generation_budget_ends_the_run_and_survives_resume(tmp_path):
    args = [*VOWELS, "reinforce.steps=10", "checkpoint.every=1", "reinforce.max_generated_tokens=1000"]
    reinforce(tmp_path / "whole", *args)
    m = metrics(tmp_path / "whole")
    # 8 prompts x 4 samples of up to 16 tokens: about 500 tokens a step -> over 1000 after the 2nd or 3rd
    assert len(m) < 10 and m[-1]["rollout/generated_tokens_total"] >= 1000 > m[-2]["rollout/generated_tokens_total"]
    assert (tmp_path / "whole" / "final").is_dir()
    killed = tmp_path / "killed"
    assert reinforce(killed, *args, ok=False, env={"ALIGNKIT_TEST_KILL_AT_STEP": "2"}).returncode != 0
    reinforce(killed, *args)
    assert [r["rollout/generated_tokens_total"] for r in metrics(killed)] == [
        r["rollout/generated_tokens_total"] for r in m
    ]
