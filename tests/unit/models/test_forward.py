"""models/forward.py: per-sequence log-probabilities and the SFT token loss on selected logits."""

import math

import torch

from alignkit.data.batching import collate_rows
from alignkit.data.formats import to_messages
from alignkit.data.io import read_records
from alignkit.data.tokenize import IGNORE, encode_conversation
from alignkit.models.forward import sequence_logps, sft_token_loss
from tests.conftest import tiny_model


def test_sequence_logps_sums_each_sequence_by_hand():
    """V=2. Position 0: logits [0, 0] -> log p = log 1/2 = -0.6931 for either target. Position 1:
    logits [log 3, 0] -> p(0) = 3/4, log = -0.2877. Position 2: the same logits, target 1 -> log 1/4
    = -1.3863. Sequences [0, 1, 1]: seq 0 = -0.6931, seq 1 = -0.2877 - 1.3863 = -1.6740, seq 2 = 0."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [math.log(3), 0.0]])
    out = sequence_logps(logits, torch.tensor([1, 0, 1]), torch.tensor([0, 1, 1]), num_sequences=3)
    expected = torch.tensor([math.log(0.5), math.log(0.75) + math.log(0.25), 0.0])
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-6)


def test_sft_token_loss_is_the_full_forward_cross_entropy_on_targets(tokenizer):
    model = tiny_model(tokenizer).eval()
    records = read_records("builtin:chat?n=3&seed=1")
    examples = [encode_conversation(tokenizer, to_messages(r), None, r.source) for r in records]
    batch = collate_rows([[e] for e in examples], tokenizer.pad_token_id)
    with torch.no_grad():
        loss_sum, metrics = sft_token_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits  # (B, T, V)
    select = batch["target_ids"] != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[select].float(), batch["target_ids"][select], reduction="sum")
    assert torch.allclose(loss_sum, expected, rtol=1e-5) and torch.equal(metrics["loss"], loss_sum)
