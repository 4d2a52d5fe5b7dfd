"""Seeded fuzz corpus of broken inputs: every case ends accepted or in alignkit's own one-line error
naming the place (a DataError with the file and line, a ConfigError with the dotted key), never in
another exception type.

Data: for every record format in docs/data.md, a good record and systematic breakages of it (each
field and nested value removed or replaced by every JSON type, empty, huge, 1 MB strings), broken
lines (truncated, not UTF-8, not an object, nested too deeply, ...) and seeded random byte
mutations, each read by the function the recipes use. Files: broken .json, .parquet and saved
dataset directories. Configs: for every recipe's tiny config, each numeric key past each bound of
its range, each enum misspelled, wrong types and unknown keys, as command-line overrides; broken
config files.

Failures are collected and reported together, so one run shows all of them. The corpus sizes are
stated in docs/data.md and checked here.
"""

from __future__ import annotations

import json
import random
import re
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
import pytest

from alignkit.config import ConfigError, DataConfig, DatasetConfig, Section, configs_dir, load_config
from alignkit.data.formats import read_prompt_records
from alignkit.data.io import DataError, read_records
from alignkit.data.preference import load_kto_pairs, load_preference_pairs
from alignkit.data.reward import load_attribute_examples, load_reward_pairs
from alignkit.data.sft import load_sft_examples
from alignkit.data.steerlm import SteerLMFormat
from alignkit.recipes import RECIPES, recipe_module

SEED = 24
RANDOM_MUTATIONS = 6  # seeded byte mutations of each format's good line
MEGABYTE = "x" * 1_000_000
SLOW_CASE_S = 15.0  # "must not hang": no single case may take longer
DOCS = Path(__file__).resolve().parents[2] / "docs" / "data.md"


# --- outcomes ---------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    run: Callable[[], Any]
    place: str  # a regex the error message must contain (the file and line, or the dotted key)
    expect: Literal["accept", "reject", "either"] = "either"
    error: type[Exception] = DataError


def failure(case: Case) -> str | None:
    """Why `case` went wrong, or None when it ended as it should."""
    start = time.perf_counter()
    try:
        case.run()
    except case.error as exc:
        message = str(exc)
        if case.expect == "accept":
            return f"rejected a good input: {message[:300]}"
        if not re.search(case.place, message):
            return f"error does not name {case.place!r}: {message[:300]}"
        if "\n" in message or len(message) > 1500:
            return f"error is not one short line ({len(message)} chars): {message[:300]!r}"
    except Exception as exc:  # noqa: BLE001 - exactly what this test looks for
        return f"{type(exc).__name__} (not {case.error.__name__}): {str(exc)[:300]}"
    else:
        if case.expect == "reject":
            return "accepted a broken input"
    seconds = time.perf_counter() - start
    return f"took {seconds:.1f} s" if seconds > SLOW_CASE_S else None


def check_all(cases: list[Case]) -> None:
    problems = [f"{c.name}: {why}" for c in cases if (why := failure(c)) is not None]
    assert not problems, f"{len(problems)} of {len(cases)} cases failed:\n" + "\n".join(problems)


# --- data: formats and their loaders ------------------------------------------------------------

Q = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}]
A = [{"role": "assistant", "content": "A"}]
CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
LABEL = "helpfulness:4,correctness:3,coherence:4,complexity:1,verbosity:2"

# name -> (a good record, which loader reads it). Every record format of docs/data.md and the
# recipe docs: SFT (distill reads the same), preference (DPO), KTO, reward pairs and attributes,
# prompts (PPO, REINFORCE, rejection sampling, online DPO, SteerLM 2.0), SteerLM, DRaFT+'s image prompts.
FORMATS: dict[str, tuple[dict, str]] = {
    "sft_prompt_response": ({"prompt": "Q", "response": "A"}, "sft"),
    "sft_input_output": ({"input": "Q", "output": "A"}, "sft"),
    "sft_prompt_completion": ({"prompt": Q, "completion": A}, "sft"),
    "sft_messages": ({"messages": [*Q, *A]}, "sft"),
    "sft_conversations": (
        {"system": "S", "conversations": [{"from": "User", "value": "Q"}, {"from": "Assistant", "value": "A"}]},
        "sft",
    ),
    "sft_text": ({"text": "plain text"}, "sft"),
    "sft_tools": (
        {
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c1", "name": "weather", "content": "SUNNY"},
                {"role": "assistant", "content": "Sunny."},
            ],
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
        },
        "sft",
    ),
    "preference": ({"prompt": Q, "chosen": A, "rejected": "B"}, "preference"),
    "preference_nemo": ({"prompt": "Q", "chosen_response": "A", "rejected_response": "B"}, "preference"),
    "preference_rpo": (
        {"prompt": "Q", "chosen": "A", "rejected": "B", "chosen_reward": 1.0, "rejected_reward": 0},
        "preference_rpo",
    ),
    "kto": ({"prompt": "Q", "completion": "A", "label": True}, "kto"),
    "kto_nemo": ({"prompt": "Q", "response": "A", "preference": "rejected"}, "kto"),
    "reward_pairs": ({"prompt": "Q", "chosen": "A", "rejected": "B", "margin": 2}, "reward_pairs"),
    "reward_attributes": (
        {"prompt": Q, "response": "A", "attributes": {"helpfulness": 3, "verbosity": None}},
        "reward_attributes",
    ),
    "reward_attributes_nemo": ({"text": "<|user|>Q<|assistant|>A", "label": [3, -100]}, "reward_attributes"),
    "prompts": ({"prompt": "Q", "answer": "42"}, "prompts"),
    "prompts_messages": ({"messages": Q}, "prompts"),
    "steerlm": ({"prompt": "Q", "response": "A", "label": LABEL}, "steerlm"),
    "steerlm_conversations": (
        {
            "conversations": [
                {"from": "User", "value": "Q"},
                {"from": "Assistant", "value": "A", "label": LABEL},
            ]
        },
        "steerlm",
    ),
    "steerlm_attributes": (
        {"messages": [*Q, *A], "attributes": {**dict.fromkeys(SteerLMFormat().attributes, 2), "verbosity": -0.4}},
        "steerlm",
    ),
    "steerlm2_prompts": ({"prompt": "Q", "attributes": {"helpfulness": 3}}, "steerlm2_prompts"),
    "image_prompts": ({"prompt": "a red circle"}, "image_prompts"),
}


def _data(path: Path) -> DataConfig:
    return DataConfig(train=DatasetConfig(path=str(path)), max_seq_len=256)


def loaders(tokenizer) -> dict[str, Callable[[Path], Any]]:
    """Loader name -> what the recipes call to read and check a file of that format."""
    from alignkit.diffusion.inference import read_prompts
    from alignkit.recipes.steerlm import load_steerlm_examples
    from alignkit.recipes.steerlm2 import _targets
    from alignkit.training.rollouts import render_prompts

    steer = SteerLMFormat(defaults=dict.fromkeys(SteerLMFormat().attributes, 2))

    def sft(p):
        return load_sft_examples(DatasetConfig(path=str(p)), _data(p), tokenizer)

    def prompts(p):
        return render_prompts(tokenizer, read_prompt_records(str(p)), None, "Be brief.")

    def steerlm(p):
        return load_steerlm_examples(read_records(p), SteerLMFormat(), _data(p), tokenizer)

    def steerlm2_prompts(p):
        return [_targets(steer, r) for r in read_prompt_records(str(p))]

    return {
        "sft": sft,
        "preference": lambda p: load_preference_pairs(DatasetConfig(path=str(p)), _data(p), tokenizer),
        "preference_rpo": lambda p: load_preference_pairs(DatasetConfig(path=str(p)), _data(p), tokenizer, True),
        "kto": lambda p: load_kto_pairs(DatasetConfig(path=str(p)), _data(p), tokenizer),
        "reward_pairs": lambda p: load_reward_pairs(DatasetConfig(path=str(p)), _data(p), tokenizer),
        "reward_attributes": lambda p: load_attribute_examples(
            DatasetConfig(path=str(p)), _data(p), tokenizer, ["helpfulness", "verbosity"]
        ),
        "prompts": prompts,
        "steerlm": steerlm,
        "steerlm2_prompts": steerlm2_prompts,
        "image_prompts": lambda p: read_prompts(str(p), tokenizer),  # the byte tokenizer stands for CLIP's
    }


# --- data: the corpus -----------------------------------------------------------------------------

# What replaces a value: every JSON type, empty, a number too large for a float, deep nesting.
REPLACEMENTS: dict[str, Any] = {
    "null": None,
    "int": 7,
    "negative": -1,
    "float": 0.5,
    "bool": True,
    "empty_str": "",
    "str": "x",
    "empty_list": [],
    "list": ["x", 1],
    "empty_object": {},
    "object": {"role": "user", "content": {"text": "x"}},
    "huge_int": 10**400,
    "nested": json.loads("[" * 200 + "]" * 200),
    "big_str": "y" * 50_000,
}


def _paths(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every position inside a JSON value (dict keys and list indices), parents first."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield (*path, key)
        yield from _paths(child, (*path, key))


def _edited(record: dict, path: tuple, new: Any = None, delete: bool = False) -> dict:
    record = json.loads(json.dumps(record))  # a deep copy
    parent = record
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return record


def _structural(record: dict, megabyte: bool) -> Iterator[tuple[str, dict]]:
    """Each position removed and replaced by every kind of value; each list extended by a stray
    element; with `megabyte`, the first string field 1 MB long."""
    for path in _paths(record):
        at = ".".join(map(str, path))
        yield f"{at}=<removed>", _edited(record, path, delete=True)
        for kind, value in REPLACEMENTS.items():
            yield f"{at}=<{kind}>", _edited(record, path, value)
    for path in _paths(record):
        parent = record
        for key in path:
            parent = parent[key]
        if isinstance(parent, list):
            yield f"{'.'.join(map(str, path))}+<stray>", _edited(record, path, [*parent, "stray"])
    yield "<unknown_field>", {**record, "unexpected": {"deep": [1, 2]}}
    if megabyte:
        first_string = next(p for p in _paths(record) if isinstance(_get(record, p), str))
        yield f"{'.'.join(map(str, first_string))}=<1MB>", _edited(record, first_string, MEGABYTE)
        yield "<1MB_field_name>", {**record, MEGABYTE: 1}


def _get(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


def _lines(good: bytes, rng: random.Random) -> Iterator[tuple[str, bytes, str]]:
    """(name, line, expect): broken lines around the good one, then seeded random byte mutations."""
    yield "good", good, "accept"
    yield "crlf", good + b"\r", "accept"
    yield "blank", b"   ", "accept"
    yield "truncated_half", good[: len(good) // 2], "reject"
    yield "truncated_last_byte", good[:-1], "reject"
    yield "trailing_garbage", good + b"}", "reject"
    yield "not_utf8_ff", good.replace(b'"', b'"\xff', 1), "reject"
    yield "not_utf8_latin1", good.replace(b'"', b'"caf\xe9 ', 1), "reject"
    yield "utf8_surrogate", good.replace(b'"', b'"\xed\xa0\x80', 1), "reject"
    yield "nul_byte", good.replace(b'"', b'"\x00', 1), "reject"
    yield "array", b"[" + good + b"]", "reject"
    yield "number", b"42", "reject"
    yield "string", b'"text"', "reject"
    yield "null", b"null", "reject"
    yield "deep_nesting", b"[" * 100_000 + b"]" * 100_000, "reject"
    yield "5000_digit_number", b'{"prompt": ' + b"9" * 5000 + b"}", "reject"
    yield "nan_and_infinity", good[:-1] + b', "margin": NaN, "chosen_reward": Infinity}', "either"
    for i in range(RANDOM_MUTATIONS):
        line = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(line))
            op = rng.choice(("flip", "delete", "insert", "duplicate"))
            if op == "flip":
                line[at] = rng.randrange(256)
            elif op == "delete":
                del line[at]
            elif op == "insert":
                line.insert(at, rng.randrange(256))
            else:
                line[at:at] = line[at : at + rng.randint(1, 8)]
        yield f"random_{i}", bytes(line).replace(b"\n", b" "), "either"


def data_cases(tmp_path: Path, tokenizer) -> list[Case]:
    """The data corpus: each case is a file whose line 2 is broken between two good lines."""
    rng = random.Random(SEED)
    load = loaders(tokenizer)
    cases = []
    megabyte_done = set()  # 1 MB values cost seconds to tokenize: once per loader
    for fmt, (good, loader) in FORMATS.items():
        good_line = json.dumps(good).encode()
        variants = [(n, json.dumps(r).encode(), "either") for n, r in _structural(good, loader not in megabyte_done)]
        megabyte_done.add(loader)
        for name, line, expect in [*_lines(good_line, rng), *variants]:
            path = tmp_path / f"{fmt}-{len(cases)}.jsonl"
            path.write_bytes(b"\n".join([good_line, line, good_line]) + b"\n")
            place = re.escape(f"{path}:2")
            cases.append(Case(f"{fmt}/{name}", lambda p=path, f=load[loader]: f(p), place, expect))
    return cases


def file_cases(tmp_path: Path, tokenizer) -> list[Case]:
    """Broken .json, .jsonl, .parquet files and saved dataset directories, read as SFT data."""
    import datasets

    sft = loaders(tokenizer)["sft"]
    rows = [{"prompt": "Q", "response": "A"}, {"prompt": "Q2", "response": "A2"}]
    good_json = json.dumps(rows, indent=1).encode()
    parquet = tmp_path / "good.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    with_null = tmp_path / "null_field.parquet"
    datasets.Dataset.from_list([rows[0], {"prompt": None, "response": "A"}]).to_parquet(str(with_null))
    two_splits = tmp_path / "two_splits"
    datasets.DatasetDict({"a": datasets.Dataset.from_list(rows), "b": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(two_splits)
    )
    not_saved = tmp_path / "not_saved"
    not_saved.mkdir()
    (not_saved / "dataset_info.json").write_text("{")
    files: dict[str, tuple[bytes | None, str, str]] = {  # name -> (content, place, expect)
        "good.json": (good_json, "", "accept"),
        "bom.json": (b"\xef\xbb\xbf" + good_json, "", "accept"),
        "bom.jsonl": (b"\xef\xbb\xbf" + json.dumps(rows[0]).encode() + b"\n", "", "accept"),
        "empty.jsonl": (b"", "", "accept"),
        "truncated.json": (good_json[:-5], r":\d+: malformed JSON", "reject"),
        "not_a_list.json": (json.dumps(rows[0]).encode(), "", "reject"),
        "list_of_strings.json": (b'["a", "b"]', "", "reject"),
        "not_utf8.json": (good_json.replace(b"A2", b"A\xff"), r":\d+: not UTF-8", "reject"),
        "deep.json": (b"[" * 100_000 + b"]" * 100_000, "", "reject"),
        "bad_row.json": (json.dumps([rows[0], {"prompt": "Q"}]).encode(), r":row 1", "reject"),
        "garbage.parquet": (b"PAR1 this is not parquet", "", "reject"),
        "truncated.parquet": (parquet.read_bytes()[:100], "", "reject"),
        "null_field.parquet": (None, r":row 1", "reject"),
        "two_splits": (None, "", "reject"),
        "not_saved": (None, "", "reject"),
        "table.csv": (b"prompt,response\nQ,A\n", "", "reject"),
        "missing.jsonl": (None, "", "reject"),
    }
    cases = []
    for name, (content, place, expect) in files.items():
        path = with_null if name == "null_field.parquet" else tmp_path / name
        if content is not None:
            path.write_bytes(content)
        cases.append(Case(f"file/{name}", lambda p=path: sft(p), re.escape(str(path)) + place, expect))
    return cases


# --- configs: every numeric range, every enum, wrong types, unknown keys --------------------------


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X; other annotations as they are."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _sections(annotation: Any) -> list[type[Section]]:
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return [annotation]
    return [c for a in typing.get_args(annotation) for c in _sections(a)]


def config_fields(cls: type[Section], prefix: str = "") -> Iterator[tuple[str, Any, list]]:
    """(dotted key, type, constraints) of every leaf field, nested sections walked."""
    for name, field in cls.model_fields.items():
        subs = _sections(field.annotation)
        if subs:
            yield from config_fields(subs[0], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", _unwrap(field.annotation), field.metadata


def _outside(kind: type, constraint: Any) -> Any | None:
    """A value just past `constraint` (ge/gt/le/lt) of an int or float field."""
    step = 1 if kind is int else 0.5
    if isinstance(constraint, annotated_types.Ge):
        return constraint.ge - step
    if isinstance(constraint, annotated_types.Gt):
        return constraint.gt
    if isinstance(constraint, annotated_types.Le):
        return constraint.le + step
    if isinstance(constraint, annotated_types.Lt):
        return constraint.lt
    return None


def _misspelled(value: str) -> str:
    return value[:-1] + ("x" if value[-1:] != "x" else "y") if value else "x"


def _tuple_overrides(key: str, items: tuple) -> Iterator[tuple[str, str, str]]:
    """Each element of a fixed-length tuple field past each bound of its range, the others valid."""
    for i, item in enumerate(items):
        kind, *extra = typing.get_args(item) or (item,)
        constraints = [c for info in extra for c in getattr(info, "metadata", [])]
        for constraint in constraints:
            value = _outside(kind, constraint)
            inside = [0.5] * len(items)
            inside[i] = value
            yield f"{key}.{i}<{type(constraint).__name__}>", f"{key}={inside}", key
    yield f"{key}<length>", f"{key}=[0.5]", key


def config_overrides(cls: type[Section]) -> Iterator[tuple[str, str, str]]:
    """(case name, override, the dotted key the error must name)."""
    for key, kind, constraints in config_fields(cls):
        if kind in (int, float):
            for constraint in constraints:
                value = _outside(kind, constraint)
                if value is not None:
                    yield f"{key}<{type(constraint).__name__}>", f"{key}={value}", key
            yield f"{key}<str>", f"{key}=abc", key
            yield f"{key}<list>", f"{key}=[1, 2]", key
        elif typing.get_origin(kind) is Literal:
            for option in typing.get_args(kind):
                yield f"{key}<{option}>", f"{key}={_misspelled(str(option))}", key
            yield f"{key}<int>", f"{key}=3", key
        elif kind is bool:
            yield f"{key}<bool>", f"{key}=maybe", key
        elif typing.get_origin(kind) is tuple:  # e.g. optim.betas: each element's range
            yield from _tuple_overrides(key, typing.get_args(kind))
    for section in [name for name, f in cls.model_fields.items() if _sections(f.annotation)]:
        yield f"{section}.<unknown>", f"{section}.no_such_key=1", f"{section}.no_such_key"
        yield f"{section}<scalar>", f"{section}=5", section
    yield "<unknown>", "no_such_key=1", "no_such_key"
    yield "<yaml>", "train.epochs=[1,", "train.epochs"


def config_cases(tmp_path: Path) -> list[Case]:
    cases = []
    for recipe in RECIPES:
        cls = recipe_module(recipe).Config
        tiny = configs_dir() / recipe / "tiny.yaml"
        cases.append(Case(f"{recipe}/good", lambda c=cls, p=tiny: load_config(c, p), "", "accept", ConfigError))
        for name, override, key in config_overrides(cls):
            run = lambda c=cls, p=tiny, o=override: load_config(c, p, [o])  # noqa: E731
            cases.append(Case(f"{recipe}/{name}", run, re.escape(key), "reject", ConfigError))
    sft = recipe_module("sft").Config
    tiny = (configs_dir() / "sft" / "tiny.yaml").read_bytes()
    files = {
        "not_utf8.yaml": tiny.replace(b"output_dir: ", b"output_dir: caf\xe9"),
        "truncated.yaml": tiny[: tiny.index(b"data:") + 12],
        "tabs.yaml": tiny.replace(b"  max_seq_len", b"\tmax_seq_len"),
        "list.yaml": b"- a\n- b\n",
        "deep.yaml": b"[" * 5000 + b"]" * 5000,
        "empty.yaml": b"",
    }
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        cases.append(Case(f"file/{name}", lambda p=path: load_config(sft, p), "", "reject", ConfigError))
    missing = tmp_path / "missing.yaml"
    cases.append(Case("file/missing.yaml", lambda: load_config(sft, missing), "missing.yaml", "reject", ConfigError))
    return cases


# --- the tests ------------------------------------------------------------------------------------


def _documented(kind: str) -> int:
    match = re.search(rf"(\d[\d,]*) {kind} cases", DOCS.read_text())
    assert match, f"docs/data.md: state the number of {kind} cases ('N {kind} cases')"
    return int(match.group(1).replace(",", ""))


def test_broken_data_files_end_in_one_line_data_errors(tmp_path, tokenizer):
    cases = data_cases(tmp_path, tokenizer) + file_cases(tmp_path, tokenizer)
    assert len(cases) == _documented("data"), f"{len(cases)} cases: update docs/data.md"
    check_all(cases)


def test_broken_configs_end_in_one_line_config_errors(tmp_path):
    cases = config_cases(tmp_path)
    # the corpus grows with every config key a recipe adds: the docs state it to within 10%
    documented = _documented("config")
    assert abs(len(cases) - documented) <= documented / 10, f"{len(cases)} cases: update docs/data.md"
    check_all(cases)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_good_records_are_accepted(tmp_path, tokenizer, fmt):
    good, loader = FORMATS[fmt]
    path = tmp_path / "good.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    loaders(tokenizer)[loader](path)
