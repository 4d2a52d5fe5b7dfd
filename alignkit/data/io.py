"""Read dataset records from JSONL, JSON, Parquet or a `datasets.save_to_disk` directory.

Every record comes with its provenance (`file:line` for JSONL, `file:row N` otherwise), so a
problem found later in a record (a missing field, an over-long example) names where it is.
JSONL is parsed line by line here so that a malformed line is reported with its number;
the other formats go through the `datasets` library. `builtin:NAME?n=N&seed=S` names a dataset
that the task world generates (`alignkit.tasks.builtin`), each record's source `builtin:...#i`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from alignkit.tasks.builtin import BUILTIN_DATASETS
from alignkit.tasks.world import SPLITS

__all__ = ["DataError", "Record", "clip", "field_names", "finite_number", "read_records", "shown", "write_jsonl"]


class DataError(ValueError):
    """Bad input data, with the file and line (or row) it came from."""


@dataclass(frozen=True)
class Record:
    data: dict[str, Any]
    source: str  # "path:line" or "path:row N"


def clip(text: str, limit: int = 200) -> str:
    """`text` on one line, cut to about `limit` characters: an error stays one short line whatever the data holds."""
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} chars)"


def shown(value: Any, limit: int = 60) -> str:
    """`repr(value)`, clipped (`clip`)."""
    return clip(repr(value), limit)


def field_names(data: dict[str, Any], limit: int = 12) -> str:
    """The record's field names for an error message (the first `limit`, each shortened)."""
    names = sorted(map(str, data))
    listed = ", ".join(n if len(n) <= 40 else shown(n, 40) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return (listed + more) or "none"


def finite_number(value: Any) -> float | None:
    """`value` as a float if it is a finite JSON number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer literal too large for a float
        return None
    return number if math.isfinite(number) else None


def _parse_json(text: str, where: str, multiline: bool = False) -> Any:
    """json.loads, every failure a DataError naming `where` (the file and line; with `multiline`,
    the file, and the line of a syntax error is added)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        place = f"{where}:{exc.lineno}" if multiline else where
        raise DataError(f"{place}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: the JSON is nested too deeply to read") from None
    except ValueError as exc:  # e.g. an integer literal of more than 4300 digits
        raise DataError(f"{where}: unreadable JSON value: {clip(str(exc), 120)}") from None


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line); "
            "save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path, limit: int | None) -> list[Record]:
    records: list[Record] = []
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
        for line_no, raw in enumerate(f, start=1):
            if limit is not None and len(records) >= limit:
                break
            where = f"{path}:{line_no}"
            line = _decode(raw.removeprefix(b"\xef\xbb\xbf") if line_no == 1 else raw, where)  # a BOM is not data
            if not line.strip():
                continue
            data = _parse_json(line, where)
            if not isinstance(data, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
            records.append(Record(data, where))
    return records


def _read_json(path: Path, limit: int | None) -> list[Record]:
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        byte = raw[exc.start]
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x}); save the file as UTF-8") from None
    data = _parse_json(text, str(path), multiline=True)
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise DataError(f"{path}: a .json dataset must be a list of objects (use .jsonl for one object per line)")
    data = data if limit is None else data[:limit]
    return [Record(x, f"{path}:row {i}") for i, x in enumerate(data)]


def _from_dataset(dataset, path: Path, limit: int | None) -> list[Record]:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return [Record(dict(dataset[i]), f"{path}:row {i}") for i in range(n)]


def _read_builtin(spec: str) -> list[Record]:
    """Records for `builtin:NAME?n=N&seed=S&split=X` (defaults n=256, seed=0, split per name)."""
    parts = urlsplit(spec.removeprefix("builtin:"))
    name = parts.path
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown built-in dataset {spec!r} (available: {', '.join(BUILTIN_DATASETS)})")
    generate, default_split = BUILTIN_DATASETS[name]
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    allowed = {"n", "seed"} | ({"split"} if default_split else set())
    unknown = set(query) - allowed
    if unknown:
        raise DataError(f"{spec!r}: unknown parameter(s) {sorted(unknown)} (use {', '.join(sorted(allowed))})")
    try:
        n, seed = int(query.get("n", 256)), int(query.get("seed", 0))
    except ValueError:
        raise DataError(f"{spec!r}: n and seed must be integers, e.g. builtin:{name}?n=256&seed=0") from None
    split = query.get("split", default_split)
    if default_split and split not in SPLITS:
        raise DataError(f"{spec!r}: unknown split {split!r} (use one of {', '.join(SPLITS)})")
    return [Record(data, f"{spec}#{i}") for i, data in enumerate(generate(n, seed, split))]


def _with_datasets(load: Callable[[], Any], path: Path, kind: str) -> Any:
    """`load()` (a `datasets` reader); whatever it raises on a damaged file becomes a DataError naming it."""
    try:
        return load()
    except Exception as exc:  # pyarrow, fsspec and datasets each have their own exception types
        raise DataError(f"{path}: cannot read {kind}: {type(exc).__name__}: {clip(str(exc), 160)}") from None


def read_records(path: str | Path, split: str | None = None, limit: int | None = None) -> list[Record]:
    """All records of a dataset file or directory (the first `limit` if given).

    `builtin:NAME?n=N&seed=S` names a generated dataset (see `alignkit.tasks.builtin`).
    """
    if str(path).startswith("builtin:"):
        records = _read_builtin(str(path))
        return records if limit is None else records[:limit]
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    if path.is_dir():
        import datasets  # local: 1 s of start-up, for saved directories and Parquet only

        loaded = _with_datasets(lambda: datasets.load_from_disk(str(path)), path, "a saved datasets directory")
        if isinstance(loaded, datasets.DatasetDict):
            if split is None:
                if len(loaded) != 1:
                    raise DataError(f"{path}: has splits {list(loaded)}; choose one with `split`")
                split = next(iter(loaded))
            if split not in loaded:
                raise DataError(f"{path}: no split {split!r} (has {list(loaded)})")
            loaded = loaded[split]
        return _from_dataset(loaded, path, limit)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, limit)
    if suffix == ".json":
        return _read_json(path, limit)
    if suffix == ".parquet":
        import datasets  # local: 1 s of start-up, for saved directories and Parquet only

        dataset = _with_datasets(lambda: datasets.Dataset.from_parquet(str(path)), path, "a Parquet file")
        return _from_dataset(dataset, path, limit)
    raise DataError(
        f"{path}: unsupported dataset format {suffix!r} (use .jsonl, .json, .parquet or a saved datasets directory)"
    )


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """One JSON object per line, written atomically (a temporary file renamed into place), so a run
    killed mid-write never leaves a truncated file that a resumed run would trust."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
