"""SL-CAI's blend: revisions plus helpful records, prompt-only ones answered by the policy itself."""

from __future__ import annotations

import json
import random

import alignkit.recipes.cai as cai
from alignkit.data.io import Record


def _sl(tmp_path, records, per_revision):
    path = tmp_path / "helpful.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return cai.SLConfig(helpful={"path": str(path)}, helpful_per_revision=per_revision, train_on="last_round")


def test_revisions_keep_the_last_round_and_drop_empty_ones():
    chains = [
        {"prompt": "p1", "rounds": [{"revision": "r1a"}, {"revision": "r1b"}]},
        {"prompt": "p2", "rounds": [{"revision": "r2a"}, {"revision": ""}]},
    ]
    last = cai.revision_records(chains, cai.SLConfig(train_on="last_round"))
    assert last == [{"prompt": "p1", "response": "r1b"}]
    every = cai.revision_records(chains, cai.SLConfig(train_on="every_round"))
    assert [r["response"] for r in every] == ["r1a", "r1b", "r2a"]


def test_prompt_only_records_are_answered_by_the_policy_in_order(tmp_path, monkeypatch):
    written = {"prompt": "w", "response": "written answer"}
    records = [{"prompt": "q1"}, written, {"prompt": "q2"}, {"prompt": "q3"}]
    sl = _sl(tmp_path, records, per_revision=None)
    asked = []

    def fake_answers(model, tokenizer, recs, sampling, data):
        asked.extend(r.data["prompt"] for r in recs)
        return [{"q1": "a1", "q2": "", "q3": "a3"}[r.data["prompt"]] for r in recs]

    monkeypatch.setattr(cai, "answer_prompts", fake_answers)
    picked = [Record(r, f"helpful.jsonl:{i + 1}") for i, r in enumerate(records)]
    out = cai.answer_helpful(None, None, picked, sl, data=None)
    assert asked == ["q1", "q2", "q3"]  # one sampling call for the prompt-only records, in order
    # q2's empty answer is dropped; the written record is kept as it is
    assert out == [{"prompt": "q1", "response": "a1"}, written, {"prompt": "q3", "response": "a3"}]


def test_helpful_records_per_revision_and_the_blend(tmp_path):
    records = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]
    picked = cai.pick_helpful(_sl(tmp_path, records, per_revision=2.0), revisions=3, rng=random.Random(0))
    assert len(picked) == 6 and len({r.data["prompt"] for r in picked}) == 6
    revisions = [{"prompt": "p", "response": "r"}] * 3
    blend = cai.sl_blend(revisions, [r.data for r in picked], random.Random(0))
    assert sorted(r["prompt"] for r in blend) == sorted(["p"] * 3 + [r.data["prompt"] for r in picked])
    assert cai.pick_helpful(cai.SLConfig(), revisions=3, rng=random.Random(0)) == []
