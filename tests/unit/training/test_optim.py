import math

import pytest

from alignkit.config import OptimConfig
from alignkit.training.optim import lr_multiplier


def test_warmup_then_constant():
    cfg = OptimConfig(schedule="constant", warmup_steps=4)
    assert [lr_multiplier(s, 10, cfg) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "schedule, quarter", [("linear", 0.1 + 0.9 * 0.75), ("cosine", 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))]
)
def test_decay_shapes(schedule, quarter):
    cfg = OptimConfig(schedule=schedule, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_multiplier(2, 10, cfg) == pytest.approx(1.0)  # first step after warmup: peak
    assert lr_multiplier(4, 10, cfg) == pytest.approx(quarter)  # a quarter of the 8 decay steps
    assert lr_multiplier(6, 10, cfg) == pytest.approx(0.55)  # half way: between peak and floor
    assert lr_multiplier(10, 10, cfg) == pytest.approx(0.1)


def test_cosine_is_above_linear_early():
    lin, cos = OptimConfig(schedule="linear"), OptimConfig(schedule="cosine")
    assert lr_multiplier(2, 20, cos) > lr_multiplier(2, 20, lin)
