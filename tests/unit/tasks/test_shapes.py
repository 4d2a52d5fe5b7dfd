"""The shape world's captions: the format round-trips, specs never hide the shape, `builtin:captions`."""

from __future__ import annotations

import pytest

from alignkit.data.io import read_records
from alignkit.tasks.shapes import ShapeSpec, caption_records, parse_caption, shape_records


def test_caption_round_trip_and_bad_captions_are_named():
    spec = ShapeSpec("triangle", "red", "blue")
    assert spec.caption == "a red triangle on blue" and parse_caption(spec.caption) == spec
    with pytest.raises(ValueError, match="'a pink circle on blue'.*expected 'a <colour> <shape> on <colour>'"):
        parse_caption("a pink circle on blue")


def test_records_never_paint_a_shape_in_its_background_colour():
    records = shape_records(500, seed=1)
    assert all(r.colour != r.background for r in records)
    assert len({r.caption for r in records}) > 60 and shape_records(500, seed=1) == records


def test_caption_records_cover_the_world_in_a_seeded_order():
    records = caption_records(90, seed=0)
    assert len({r["prompt"] for r in records}) == 90  # 3 shapes x 7 colours x 5 backgrounds - 15 same-colour
    assert all(parse_caption(r["prompt"]) for r in records)
    assert caption_records(95, seed=0)[90:] == records[:5] and caption_records(90, seed=1) != records
    assert [r.data for r in read_records("builtin:captions?n=4&seed=0")] == records[:4]
