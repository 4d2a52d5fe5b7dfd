"""Dataset builders and `builtin:` names: files parse with the right fields, pairs are ordered by the oracle,
and held-out files never overlap training files."""

import json
import time

import pytest

from alignkit.data.formats import to_messages
from alignkit.data.io import DataError, read_records
from alignkit.data.taskworld import build_datasets
from alignkit.tasks import (
    ATTRIBUTES,
    SKILLS,
    DatasetSizes,
    parse_prompt,
    preference_records,
    score_response,
)

SMALL = DatasetSizes(
    pretrain=60, sft=40, prefs=30, attributes=30, kto=40, prompts=40, valid=10, eval_per_skill=10, redteam=12
)

FIELDS = {
    "pretrain": {"text"},
    "sft": {"prompt", "response"},
    "sft_valid": {"prompt", "response"},
    "prefs": {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin"},
    "prefs_valid": {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin"},
    "attributes": {"prompt", "response", "attributes"},
    "attributes_valid": {"prompt", "response", "attributes"},
    "kto": {"prompt", "completion", "label"},
    "prompts": {"prompt", "task", "args", "answer", "split", "id"},
    "eval_prompts": {"prompt", "task", "args", "answer", "split", "id"},
    "redteam": {"prompt", "task", "args", "answer", "split", "id"},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("taskworld")
    paths = build_datasets(out, seed=0, sizes=SMALL)
    records = {name: [json.loads(line) for line in path.open()] for name, path in paths.items() if name != "manifest"}
    return records, paths


def test_every_file_parses_with_the_right_fields_and_count(built):
    records, paths = built
    assert set(records) == set(FIELDS)
    manifest = json.loads(paths["manifest"].read_text())
    for name, fields in FIELDS.items():
        assert records[name], name
        assert all(set(r) == fields for r in records[name]), name
        assert manifest["counts"][name] == len(records[name])
    assert len(records["sft"]) == SMALL.sft and len(records["prefs"]) == SMALL.prefs
    assert len(records["eval_prompts"]) == 7 * SMALL.eval_per_skill
    assert {r["task"] for r in records["redteam"]} == {"redteam"}


def test_build_is_deterministic(built, tmp_path):
    _, paths = built
    again = build_datasets(tmp_path, seed=0, sizes=SMALL)
    for name in FIELDS:
        assert again[name].read_text() == paths[name].read_text(), name
    other = build_datasets(tmp_path / "other", seed=1, sizes=SMALL)
    assert other["sft"].read_text() != paths["sft"].read_text()


def test_pretrain_text_is_the_chat_template_rendering(built):
    from alignkit.models.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    for record in built[0]["pretrain"][:10]:
        user, assistant = record["text"].removeprefix("<|user|>\n").removesuffix("</s>").split("</s><|assistant|>\n")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        assert tokenizer.apply_chat_template(messages, tokenize=False) == record["text"]
        assert parse_prompt(user) is not None


def test_practice_documents_are_right_answers_to_training_prompts_with_no_filler():
    from alignkit.tasks.datasets import PRACTICE_SKILLS, practice_records

    docs = practice_records(60, seed=0)
    assert len(docs) == 60 and docs == practice_records(60, seed=0) and docs != practice_records(60, seed=1)
    skills = set()
    for doc in docs:
        user, answer = doc["text"].removeprefix("<|user|>\n").removesuffix("</s>").split("</s><|assistant|>\n")
        record = parse_prompt(user)
        assert record["split"] == "train" and record["task"] in PRACTICE_SKILLS
        scores = score_response(record, answer)
        assert (scores.correctness, scores.coherence, scores.politeness, scores.verbosity) == (4, 4, 2, 1), answer
        skills.add(record["task"])
    assert skills == set(PRACTICE_SKILLS)


def test_pretrain_corpus_mixes_practice_into_the_mixed_quality_documents():
    from alignkit.tasks.datasets import practice_records, pretrain_corpus, pretrain_records

    assert pretrain_corpus(30, 0, seed=0) == pretrain_records(30, seed=0)  # no practice: as before
    corpus = pretrain_corpus(30, 10, seed=0)
    expected = pretrain_records(30, seed=0) + practice_records(10, seed=0)
    assert sorted(r["text"] for r in corpus) == sorted(r["text"] for r in expected) and corpus != expected


def test_preference_pairs_are_ranked_by_the_oracle(built):
    for record in built[0]["prefs"]:
        chosen = score_response(record["prompt"], record["chosen"]).reward
        rejected = score_response(record["prompt"], record["rejected"]).reward
        assert (chosen, rejected) == (record["chosen_reward"], record["rejected_reward"])
        assert chosen - rejected == pytest.approx(record["margin"]) and record["margin"] >= 0.05


def test_preference_pairs_differ_on_more_than_one_axis():
    records = preference_records(80, seed=3)
    gaps = {name: 0 for name in ATTRIBUTES}
    for r in records:
        chosen, rejected = score_response(r["prompt"], r["chosen"]), score_response(r["prompt"], r["rejected"])
        for name in ATTRIBUTES:
            gaps[name] += getattr(chosen, name) != getattr(rejected, name)
    for name in ("correctness", "politeness", "coherence", "harmlessness"):
        assert gaps[name] >= 5, gaps


def test_attribute_labels_are_the_oracle_scores_in_range(built):
    for record in built[0]["attributes"]:
        assert set(record["attributes"]) == set(ATTRIBUTES)
        assert all(0 <= v <= 4 for v in record["attributes"].values())
        assert record["attributes"] == score_response(record["prompt"], record["response"]).attributes()


def test_sft_demonstrations_are_good(built):
    for record in built[0]["sft"] + built[0]["sft_valid"]:
        scores = score_response(record["prompt"], record["response"])
        assert scores.reward >= 0.9 and scores.correctness == 4, (record, scores)


def test_kto_labels_follow_the_oracle_reward(built):
    labels = [r["label"] for r in built[0]["kto"]]
    assert any(labels) and not all(labels)
    for record in built[0]["kto"]:
        assert record["label"] == (score_response(record["prompt"], record["completion"]).reward >= 0.8)


def test_held_out_files_share_no_question_with_training_files(built):
    records = built[0]
    train_prompts = {r["prompt"] for name in ("sft", "prefs", "attributes", "kto", "prompts") for r in records[name]}
    train_prompts |= {r["text"].split("</s>")[0].removeprefix("<|user|>\n") for r in records["pretrain"]}
    train_ids = {parse_prompt(p)["id"] for p in train_prompts}
    for name in ("eval_prompts", "redteam"):
        assert all(r["split"] == "test" for r in records[name])
        assert not {r["id"] for r in records[name]} & train_ids, name
    valid_ids = {parse_prompt(r["prompt"])["id"] for r in records["sft_valid"] + records["prefs_valid"]}
    assert not valid_ids & train_ids


# --- builtin: names ---------------------------------------------------------------------------


def test_builtin_sft_is_fast_and_feeds_the_sft_format():
    start = time.perf_counter()
    records = read_records("builtin:sft?n=256&seed=0")
    assert time.perf_counter() - start < 0.5
    assert len(records) == 256 and records[0].source == "builtin:sft?n=256&seed=0#0"
    assert records[0].data == read_records("builtin:sft?n=256&seed=0")[0].data
    assert [r.data for r in records] != [r.data for r in read_records("builtin:sft?n=256&seed=1")]
    assert all(to_messages(r)[-1]["role"] == "assistant" for r in records)
    # The smoke data is short (fits the tiny configs' 128 byte-level tokens) and all correct.
    for r in records:
        assert len(r.data["prompt"]) + len(r.data["response"]) + 31 <= 128
        assert score_response(r.data["prompt"], r.data["response"]).correctness == 4


def test_builtin_chat_has_two_exchanges_after_a_system_prompt():
    for record in read_records("builtin:chat?n=8&seed=0"):
        roles = [m["role"] for m in to_messages(record)]
        assert roles == ["system", "user", "assistant", "user", "assistant"]


def test_builtin_demos_are_the_good_task_world_demonstrations():
    start = time.perf_counter()
    records = read_records("builtin:demos?n=256&seed=0")
    assert time.perf_counter() - start < 0.5
    assert {parse_prompt(r.data["prompt"])["task"] for r in records} == set(SKILLS)
    assert all(score_response(r.data["prompt"], r.data["response"]).reward >= 0.9 for r in records)


@pytest.mark.parametrize(
    "name, fields",
    [
        ("prefs", FIELDS["prefs"]),
        ("attributes", FIELDS["attributes"]),
        ("kto", FIELDS["kto"]),
        ("prompts", FIELDS["prompts"]),
        ("eval", FIELDS["prompts"]),
        ("redteam", FIELDS["prompts"]),
        ("pretrain", FIELDS["pretrain"]),
        ("demos", FIELDS["sft"]),
    ],
)
def test_builtin_names_give_their_format(name, fields):
    records = read_records(f"builtin:{name}?n=12&seed=0")
    assert len(records) == 12 and all(set(r.data) == fields for r in records)


def test_builtin_split_parameter():
    assert {r.data["split"] for r in read_records("builtin:prompts?n=20&split=valid")} == {"valid"}
    assert {r.data["split"] for r in read_records("builtin:eval?n=20")} == {"test"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("builtin:nope", "unknown built-in dataset"),
        ("builtin:sft?n=abc", "must be integers"),
        ("builtin:sft?size=3", "unknown parameter"),
        ("builtin:demos?split=dev", "unknown split"),
        ("builtin:sft?split=test", "unknown parameter"),
    ],
)
def test_builtin_errors_name_the_problem(spec, message):
    with pytest.raises(DataError, match=message):
        read_records(spec)


def test_ranked_pairs_keep_every_comparison_that_clears_the_margin():
    from alignkit.tasks.datasets import best_worst_pair, ranked_pairs

    scored = [(0.5, "b"), (0.9, "a"), (0.52, "c"), (0.1, "d"), (0.9, "a")]  # "a" twice: counted once
    pairs = ranked_pairs("q", scored, min_margin=0.05)
    # distinct: b .5, a .9, c .52, d .1 -> 6 comparisons; b-c (0.02) is under the margin
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "b"), ("b", "d"), ("a", "c"), ("a", "d"), ("c", "d")]
    assert [p["margin"] for p in pairs] == [0.4, 0.4, 0.38, 0.8, 0.42]
    assert all(p["chosen_reward"] > p["rejected_reward"] and p["prompt"] == "q" for p in pairs)
    # best-vs-worst is one of them
    best = best_worst_pair("q", scored, 0.05)
    assert (best["chosen"], best["rejected"]) in [(p["chosen"], p["rejected"]) for p in pairs]
    assert ranked_pairs("q", [(0.5, "x"), (0.52, "y")], 0.05) == []
