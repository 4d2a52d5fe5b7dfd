"""Constitutional AI end to end through the real CLI on a tiny random Llama: the whole chain from
the tiny config (the policy as its own critic), each step skipped when its files exist, the soft
reward-model trainer alone; and the labelling step against alignkit's OpenAI-compatible server on
loopback, killed mid-run and resumed without asking any answered request again."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from alignkit.models.loading import save_causal_lm
from alignkit.recipes.cai import candidate_pairs
from alignkit.serving.openai_server import create_app
from tests.conftest import REPO, run_cli, run_recipe, tiny_model
from tests.unit.serving.test_reward_server import Server


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_whole_chain_runs_from_the_tiny_config_and_each_step_alone(tmp_path):
    out = tmp_path / "cai"
    run_recipe("cai", out)
    chains = _lines(out / "sl_data" / "chains.jsonl")
    assert len(chains) == 16 and all(len(c["rounds"]) == 2 for c in chains)
    names = {"harm", "dignity", "safety", "law", "wise_friend", "not_preachy"}
    assert {r["principle"] for c in chains for r in c["rounds"]} <= names
    blend = _lines(out / "sl_data" / "train.jsonl")
    revisions = sum(1 for c in chains for r in c["rounds"] if r["revision"])
    assert len(blend) == 2 * revisions  # helpful_per_revision 1
    pairs = _lines(out / "rl_data" / "pairs.jsonl")
    assert pairs and all(0.5 <= p["preference"] <= 1.0 and p["chosen"] != p["rejected"] for p in pairs)
    for final in ("sl/final", "rl/final"):
        assert (out / final / "model.safetensors").is_file()
    cache = (out / "feedback_cache.jsonl").read_text()

    # every step's files exist: a second run does nothing and asks nothing
    again = run_recipe("cai", out)
    assert "SL-CAI:" not in again.stderr and "RL-CAI:" not in again.stderr
    assert (out / "feedback_cache.jsonl").read_text() == cache

    # one step alone: a reward model with soft targets on the same pairs (for the ppo recipe)
    run_recipe("cai", out, "cai.steps=[rl_train]", "cai.rl.trainer=reward_model")
    config = json.loads((out / "rl" / "reward_model" / "final" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert "cai" in run_cli("ls").stdout


def test_labelling_against_the_served_model_resumes_without_repeating_requests(tmp_path, tokenizer):
    policy = tiny_model(tokenizer, seed=3).eval()
    policy_dir = save_causal_lm(policy, policy.state_dict(), tokenizer, tmp_path / "policy")
    app = create_app(tiny_model(tokenizer, seed=5).eval(), tokenizer, "critic")
    sent = []

    @app.middleware("http")
    async def count(request, call_next):
        if request.url.path == "/v1/chat/completions":
            sent.append(1)
        return await call_next(request)

    out = tmp_path / "cai"
    cache = out / "feedback_cache.jsonl"
    with Server(app) as url:
        args = [
            f"cai.feedback.url={url}/v1",
            "cai.feedback.model=critic",
            "cai.feedback.concurrency=1",
            "cai.steps=[rl_data]",
            f"cai.rl.policy={policy_dir}",
            "data.train.path=builtin:redteam?n=24&split=train",
        ]
        command = [sys.executable, "-m", "alignkit.cli", "run", "cai", "--config", "tiny", f"output_dir={out}"]
        killed = subprocess.Popen(
            [*command, "logging.progress=none", *args],
            cwd=REPO,
            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while not (cache.is_file() and len(cache.read_text().splitlines()) >= 20):
            assert time.time() < deadline and killed.poll() is None, "the labelling run did not get going"
            time.sleep(0.02)
        killed.kill()
        killed.wait()
        answered, sent_before = len(_lines(cache)), len(sent)
        assert not (out / "rl_data" / "pairs.jsonl").exists()
        assert 0 <= sent_before - answered <= 1  # concurrency 1: at most the request in flight is lost

        run_recipe("cai", out, *args)
        final = _lines(cache)
    assert len({entry["key"] for entry in final}) == len(final)  # no request answered twice
    assert len(sent) - sent_before == len(final) - answered  # the resumed run asked only what was missing
    samples = _lines(out / "rl_data" / "samples.jsonl")
    compared = sum(len(candidate_pairs(s["answers"], "all")) for s in samples)
    assert len(final) == 2 * compared  # each pair asked once in each order
    assert (out / "rl_data" / "pairs.jsonl").is_file()
