from __future__ import annotations

import pytest
import torch

from alignkit.diffusion.pipeline import build_tiny_pipeline, load_pipeline, save_pipeline, shape_tokenizer


def test_the_tokenizer_gives_one_token_per_shape_world_word():
    tok = shape_tokenizer()
    ids = tok("a purple triangle on white")["input_ids"]
    assert len(ids) == 5 + 2  # start, 5 words, end
    assert tok.decode(ids, skip_special_tokens=True) == "a purple triangle on white"
    assert len(tok("a dog")["input_ids"]) > 4  # unknown words fall back to characters


def test_tiny_pipeline_round_trips_through_a_diffusers_directory(tmp_path):
    pipe = build_tiny_pipeline(seed=0)
    out = save_pipeline(pipe, tmp_path / "pipe")
    loaded = load_pipeline(out)
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=32, output_type="pt")
    a = pipe(["a red circle on blue"], generator=torch.Generator().manual_seed(0), **kwargs).images
    b = loaded(["a red circle on blue"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, 3, 32, 32)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path)
