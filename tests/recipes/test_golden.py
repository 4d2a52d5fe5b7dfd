"""Golden loss curves: the first logged values of every shipped `tiny` config, pinned (as torchtune
and torchtitan pin theirs). A silent change to a loss, the data order, the sampler, the
initialisation or the optimizer moves them. After an intended change, rerun
`python -m tests.golden_runner /tmp/golden` and update GOLDEN, saying why in the commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

# recipe/config -> metric -> its values at the first logged steps (steerlm2 needs a trained
# SteerLM model as its start: its own tests pin its behaviour).
GOLDEN = {
    "sft/tiny": {"loss": [5.6044822982594935, 5.34010941354852, 5.089582905016448]},
    "distill/tiny": {
        "loss": [0.0065030979204781444, 0.0035118962589063144, 0.0016378685047751978],
        "sft_loss": [5.595683964596519, 5.601860608552632, 5.603960217927631],
    },
    "dpo/tiny": {
        "loss": [0.6931479573249817, 1.0938936471939087, 0.6334654688835144],
        "logps/chosen": [-498.922607421875, -947.1044921875, -817.3209228515625],
    },
    "reward_model/tiny": {"loss": [0.6931471824645996, 0.6928937435150146, 0.6920939683914185]},
    "reward_model/tiny_regression": {"loss": [1.5569879441034227, 2.7691657972631987, 2.033839198521205]},
    "steerlm/tiny": {"loss": [5.632960601869824, 5.425229386626445, 5.170654035762032]},
    "rejection_sampling/tiny": {"rollout/reward": [0.39736328460276127], "loss": [5.627234468005953]},
    "ppo/tiny": {
        "rollout/reward": [0.37187499925494194, 0.3812500014901161],
        "critic/value_loss": [0.023947932503440163, 0.0031818512361496687],
        "actor/loss": [-0.05950421172303039, -0.04110134392976761],
    },
    "reinforce/tiny": {"rollout/reward": [0.3777343751862645, 0.3812500014901161]},
    "draftp/tiny": {
        "reward": [-0.056944526731967926, -0.03329109773039818],
        "loss": [0.056944526731967926, 0.033291205763816833],
    },
}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden")
    result = subprocess.run(
        [sys.executable, "-m", "tests.golden_runner", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "golden.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GOLDEN))
def test_first_steps_match_the_pinned_curve(logged, name):
    for metric, pinned in GOLDEN[name].items():
        values = [row[metric] for row in logged[name] if metric in row][: len(pinned)]
        # fp32 on one thread is repeatable to the last bit on one machine; across CPUs (vector
        # widths) sums may round differently, hence a tolerance far below any real change.
        assert values == pytest.approx(pinned, rel=1e-4, abs=1e-6), f"{name} {metric}"
