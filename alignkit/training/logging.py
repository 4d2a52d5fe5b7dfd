"""Metric logging: metrics.jsonl always; TensorBoard, W&B and MLflow when configured.

Only rank 0 writes. On a resumed run, lines of metrics.jsonl past the resumed step are
dropped first, so the file reads as one uninterrupted run. The console shows a rich progress
bar (ETA, loss, tokens/s) on an interactive terminal and plain lines otherwise (CI, files).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from alignkit.config import LoggingConfig

__all__ = ["MetricLogger", "get_logger"]


def get_logger(name: str = "alignkit") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
    path.write_text("".join(f"{line}\n" for line in kept))


class MetricLogger:
    """Writes each logged step to every configured sink (rank 0 only; others are silent)."""

    def __init__(
        self,
        output_dir: str | Path,
        cfg: LoggingConfig,
        total_steps: int,
        enabled: bool,
        run_config: dict[str, Any] | None = None,
        resumed_step: int = 0,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.output_dir = Path(output_dir)
        self._sinks: list[Any] = []
        self._bar = None
        self._start = time.perf_counter()
        self._start_step = resumed_step
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl_path = self.output_dir / "metrics.jsonl"
        _truncate_after(self._jsonl_path, resumed_step)
        self._jsonl = self._jsonl_path.open("a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # local: pulls in tensorboard, only when enabled

            self._tb = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=resumed_step + 1)
            self._sinks.append(("tb", self._tb))
        if cfg.wandb_project:
            self._try_wandb(cfg.wandb_project, run_config)
        if cfg.mlflow_experiment:
            self._try_mlflow(cfg.mlflow_experiment, run_config)
        mode = cfg.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        if mode == "bar":
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn  # local: terminals only

            self._bar = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total_steps, completed=resumed_step, status="")
            self._bar.start()

    def _try_wandb(self, project: str, run_config: dict[str, Any] | None) -> None:
        try:
            import wandb  # optional: not a dependency
        except ImportError:
            get_logger().warning("logging.wandb_project is set but wandb is not installed; skipping W&B")
            return
        wandb.init(project=project, config=run_config, dir=str(self.output_dir))
        self._sinks.append(("wandb", wandb))

    def _try_mlflow(self, experiment: str, run_config: dict[str, Any] | None) -> None:
        try:
            import mlflow  # optional: not a dependency
        except ImportError:
            get_logger().warning("logging.mlflow_experiment is set but mlflow is not installed; skipping MLflow")
            return
        mlflow.set_experiment(experiment)
        mlflow.start_run()
        if run_config:
            mlflow.log_params({k: str(v)[:250] for k, v in run_config.items()})
        self._sinks.append(("mlflow", mlflow))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for kind, sink in self._sinks:
            if kind == "tb":
                for key, value in metrics.items():
                    sink.add_scalar(key, value, step)
            elif kind == "wandb":
                sink.log(metrics, step=step)
            elif kind == "mlflow":
                sink.log_metrics({k.replace("/", "_"): v for k, v in metrics.items()}, step=step)
        self._show(step, metrics)

    def _show(self, step: int, metrics: dict[str, float]) -> None:
        keys = [
            k for k in ("loss", "val/loss", "reward", "val/reward", "lr", "throughput/tokens_per_s") if k in metrics
        ]
        status = "  ".join(f"{k}={metrics[k]:.4g}" for k in keys)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, status=status)
        elif self.mode == "lines":
            elapsed = time.perf_counter() - self._start
            done = max(1, step - self._start_step)
            eta = elapsed / done * (self.total_steps - step)
            print(f"step {step}/{self.total_steps}  {status}  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.stop()
        self._jsonl.close()
        for kind, sink in self._sinks:
            if kind == "tb":
                sink.close()
            elif kind == "wandb":
                sink.finish()
            elif kind == "mlflow":
                sink.end_run()
