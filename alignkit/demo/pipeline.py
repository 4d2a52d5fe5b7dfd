"""The demo's pipeline: stages run in dependency order, each reused while its inputs are unchanged.

A stage runs in its own folder under the output directory and records a fingerprint of its
inputs in `stage.json`: its name, the code version, the settings sections it reads (of
configs/demo.yaml), the text of its recipe configs (configs/demo/NAME.yaml) and its upstream
stages' fingerprints. When the fingerprint is unchanged the saved metrics are reused instead of
recomputed; a stage that must run again starts from an empty folder. The stage table, the
settings and the code version are arguments, so a test can run its own stages.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignkit.config import Section, find_config
from alignkit.demo.common import Demo, Stage
from alignkit.demo.report import write_report
from alignkit.evaluation.evaluate import write_json
from alignkit.evaluation.stats import mean_with_ci, win_rate
from alignkit.training.logging import get_logger

__all__ = ["run_pipeline"]


def run_pipeline(
    stages: Sequence[Stage],
    names: Sequence[str] | None,
    output_dir: str | Path,
    settings: Section,
    version: int,
    default: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """Run (or reuse) the stages `names` (None: `default`; ["all"]: every stage) and what they
    need, in table order; write summary.json and the report. Returns {model stage: metrics}."""
    log = get_logger()
    wanted = [s.name for s in stages] if list(names or []) == ["all"] else list(names or default)
    requested = _with_dependencies(stages, wanted)
    demo = Demo(root=Path(output_dir), settings=settings, fingerprints={}, results={})
    demo.root.mkdir(parents=True, exist_ok=True)
    for stage in requested:
        _run_stage(stage, demo, version, log)
    extra = _current_extra_stages(stages, requested, demo, version)
    if extra:
        log.info(f"demo: also reporting {', '.join(s.name for s in extra)} (current results of an earlier run)")
    shown = [s for s in stages if s in requested or s in extra]
    _add_win_rates(demo, shown)
    summary = {s.name: demo.results[s.name] for s in shown if s.is_model or s.in_summary}
    write_json(summary, demo.path("summary.json"))
    models = [s.name for s in shown if s.is_model]
    write_report(demo.root, settings, {s.name: demo.results[s.name] for s in shown}, models, len(demo.eval_prompts()))
    return {name: demo.results[name] for name in models}


# --- the fingerprint cache --------------------------------------------------------------------


def _fingerprint(stage: Stage, demo: Demo, version: int) -> str:
    parts = [stage.name, str(version)]
    if stage.settings:
        parts.append(json.dumps(demo.settings.model_dump(mode="json", include=set(stage.settings)), sort_keys=True))
    parts += [find_config("demo", name).read_text() for name in stage.configs]
    parts += [demo.fingerprints[n] for n in stage.needs]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _saved_metrics(stage: Stage, demo: Demo, version: int) -> dict[str, Any] | None:
    """The stage's saved metrics if its results on disk are current (the same fingerprint), else
    None; a current stage is recorded in `demo`."""
    fingerprint = _fingerprint(stage, demo, version)
    marker = demo.path(stage.name, "stage.json")
    if not marker.is_file():
        return None
    saved = json.loads(marker.read_text())
    if saved.get("fingerprint") != fingerprint:
        return None
    demo.fingerprints[stage.name] = fingerprint
    demo.results[stage.name] = saved["metrics"]
    return saved["metrics"]


def _run_stage(stage: Stage, demo: Demo, version: int, log) -> None:
    if _saved_metrics(stage, demo, version) is not None:
        log.info(f"demo: stage {stage.name} is up to date, reusing {demo.path(stage.name)}")
        return
    log.info(f"demo: running stage {stage.name}")
    if demo.path(stage.name).exists():  # stale results (and checkpoints) must not be resumed from
        shutil.rmtree(demo.path(stage.name))
    fingerprint = _fingerprint(stage, demo, version)
    start = time.perf_counter()
    metrics = stage.run(demo)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    write_json({"fingerprint": fingerprint, "metrics": metrics}, demo.path(stage.name, "stage.json"))
    demo.fingerprints[stage.name] = fingerprint
    demo.results[stage.name] = metrics


# --- which stages --------------------------------------------------------------------------------


def _with_dependencies(stages: Sequence[Stage], names: Sequence[str]) -> list[Stage]:
    by_name = {s.name: s for s in stages}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown demo stage(s) {unknown}; stages: {', '.join(by_name)} or 'all'")
    wanted: set[str] = set()

    def add(name: str) -> None:
        wanted.add(name)
        for dep in by_name[name].needs:
            add(dep)

    for name in names:
        add(name)
    return [s for s in stages if s.name in wanted]


def _current_extra_stages(stages: Sequence[Stage], requested: list[Stage], demo: Demo, version: int) -> list[Stage]:
    """Stages not requested this time whose results from an earlier run are still current, so that
    `make demo` after `--stages all` keeps reporting them rather than dropping them from the summary
    (table order: a stage's upstream is decided before it)."""
    names = {s.name for s in requested}
    return [
        s
        for s in stages
        if s.name not in names
        and all(n in demo.fingerprints for n in s.needs)
        and _saved_metrics(s, demo, version) is not None
    ]


def _add_win_rates(demo: Demo, stages: list[Stage]) -> None:
    """Win rate of every later model stage against base and sft, from the stored per-prompt rewards."""
    rewards = {s.name: json.loads(demo.path(s.name, "eval.json").read_text())["rewards"] for s in stages if s.is_model}
    order = list(rewards)
    for name in rewards:
        for reference in ("base", "sft"):
            if reference in rewards and order.index(reference) < order.index(name):
                demo.results[name].update(
                    mean_with_ci(f"win_rate_vs_{reference}", win_rate(rewards[name], rewards[reference]))
                )
