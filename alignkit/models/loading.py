"""Load, build and save causal LMs in Hugging Face format (safetensors).

`load_tokenizer` and `load_causal_lm` read a local HF directory (any architecture that
`AutoModelForCausalLM` knows) or build a random model from `model.random_init`.
`save_causal_lm` writes `final/`-style directories that `from_pretrained` loads,
merging LoRA adapters into the weights when asked. Saving is atomic: the files are
written into a temporary sibling directory that is renamed into place. `load_for_eval` reads
such a directory back for sampling (`alignkit generate`, `eval`, `serve generate`).

A directory is checked before transformers reads it (`check_model_dir`: config.json, and weights
files that are present and whole), and `check_positions` compares a length from the config
(`data.max_seq_len`, a prompt plus `max_new_tokens`) with the model's position limit, both
reading only small files so that a bad run fails at start-up with one line.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from alignkit.config import ConfigError, LoraConfig, ModelConfig
from alignkit.models.recompute import enable_checkpointing
from alignkit.models.tokenizer import byte_tokenizer

__all__ = [
    "adapters_off",
    "apply_lora",
    "autocast",
    "check_model_dir",
    "check_positions",
    "causal_lm_skeleton",
    "gathered",
    "hf_class",
    "load_causal_lm",
    "load_for_eval",
    "load_sequence_scorer",
    "load_tokenizer",
    "meta_skeleton",
    "position_limit",
    "random_init_config",
    "save_causal_lm",
    "save_hf_streamed",
    "saved_weight_names",
    "unwrap",
]


logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    path = cfg.tokenizer_path or cfg.path
    if path is None:
        return byte_tokenizer()
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
        # transformers would build a tokenizer of one token from config.json alone, without a word
        raise FileNotFoundError(
            f"no tokenizer files in {path} (looked for {', '.join(_TOKENIZER_FILES)}); "
            "copy them there or set model.tokenizer_path"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # Padding positions never reach a loss, so any existing token will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_for_eval(model_dir: str | Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A saved causal LM (fp32, eval mode) and its tokenizer, for sampling and scoring."""
    check_model_dir(model_dir)
    tokenizer = load_tokenizer(ModelConfig(path=str(model_dir)))  # pads with EOS where it has no pad token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def random_init_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase):
    """An HF config for `cfg.random_init`, sized to the tokenizer."""
    ri = cfg.random_init
    assert ri is not None
    common = dict(
        vocab_size=len(tokenizer),
        tie_word_embeddings=ri.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if ri.architecture == "gpt2":  # GPT-2 names its sizes differently and has no GQA
        return AutoConfig.for_model(
            "gpt2",
            n_embd=ri.hidden_size,
            n_layer=ri.num_layers,
            n_head=ri.num_heads,
            n_inner=ri.intermediate_size,
            n_positions=ri.max_position_embeddings,
            **common,
        )
    return AutoConfig.for_model(
        ri.architecture,
        hidden_size=ri.hidden_size,
        num_hidden_layers=ri.num_layers,
        num_attention_heads=ri.num_heads,
        num_key_value_heads=ri.num_kv_heads,
        intermediate_size=ri.intermediate_size,
        max_position_embeddings=ri.max_position_embeddings,
        head_dim=ri.hidden_size // ri.num_heads,
        **common,
    )


def check_model_dir(model_dir: str | Path) -> None:
    """Fail with one line naming the file when `model_dir` lacks config.json or its weights are
    missing, truncated or corrupt (transformers would raise a safetensors traceback, or an OSError
    listing file names). Reads the safetensors headers only."""
    directory = Path(model_dir)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"not a Hugging Face model directory (no config.json): {directory}")
    for weights in _weight_files(directory):
        _check_safetensors(weights)


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of `directory` (one file, or the shards its index names)."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise FileNotFoundError(f"{index}: not a readable safetensors index ({exc}); save the model again") from exc
        return [directory / shard for shard in shards]
    if any((directory / name).is_file() for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        return []  # legacy pickled weights: transformers reads and checks them itself
    raise FileNotFoundError(
        f"no weights in {directory} (model.safetensors): it holds a config but no model; save or copy the model again"
    )


def _check_safetensors(path: Path) -> None:
    # FileNotFoundError also for a damaged file: it is as unusable as a missing one, and every
    # command (run, generate, eval, score, serve) reports that type as one line.
    if not path.is_file():
        raise FileNotFoundError(f"missing weights file {path}: save or copy the model again")
    try:
        with safe_open(path, framework="pt"):  # parses the header, checks the data covers the file
            pass
    except (SafetensorError, OSError) as exc:
        raise FileNotFoundError(
            f"{path} ({path.stat().st_size} bytes) is truncated or corrupt ({exc}); save or copy the model again"
        ) from exc


def position_limit(config: PretrainedConfig) -> int | None:
    """The most positions the model takes: GPT-2's learned `n_positions` (one more and its position
    embedding raises an IndexError), other models' `max_position_embeddings` (RoPE models run past it
    but were not trained there); None when the config names neither."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("n_positions", "max_position_embeddings"):  # GPT-2 maps the second to the first
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(cfg: ModelConfig, length: int, key: str) -> None:
    """Fail at start-up, naming `key`, when `length` tokens (e.g. `data.max_seq_len`, or a prompt
    plus `max_new_tokens`) exceed the position limit of the model `cfg` describes. Reads only
    config.json (or `random_init`), so it runs before any weights load."""
    if cfg.path is None:
        assert cfg.random_init is not None
        limit, source = cfg.random_init.max_position_embeddings, "model.random_init.max_position_embeddings"
    else:
        check_model_dir(cfg.path)
        limit, source = position_limit(AutoConfig.from_pretrained(cfg.path)), str(Path(cfg.path) / "config.json")
    if limit is not None and length > limit:
        raise ConfigError(f"{key}={length} is beyond the model's position limit of {limit} ({source}): lower {key}")


def _supported_attention(requested: str, auto_class, hf_config: PretrainedConfig) -> str:
    """`requested`, or eager where the architecture has no sdpa kernel: transformers refuses sdpa
    outright for those (Gemma2: "does not support an attention implementation through
    torch.nn.functional.scaled_dot_product_attention"), and eager is what every model has."""
    if requested != "sdpa":
        return requested
    model_class = auto_class._model_mapping.get(type(hf_config), None)
    if model_class is None or getattr(model_class, "_supports_sdpa", True):
        return requested
    logger.warning(
        f"{model_class.__name__} has no sdpa attention in this transformers version: using eager "
        "(set model.attn_implementation to choose another)"
    )
    return "eager"


def _dtype(cfg: ModelConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def load_causal_lm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> nn.Module:
    """The model `cfg` describes, with LoRA applied if enabled. Random init is seeded."""
    return _load(cfg, tokenizer, seed, AutoModelForCausalLM, "CAUSAL_LM")


def load_sequence_scorer(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, num_labels: int, seed: int = 0
) -> nn.Module:
    """A causal LM with a linear `score` head of `num_labels` outputs on its hidden states
    (`AutoModelForSequenceClassification`): a reward model, or a critic.

    From a causal LM directory the backbone is loaded and the head is new; it starts at ZERO
    (every reward 0 at step 0, so a Bradley-Terry loss starts at log 2 on every rank). From a
    sequence-classification directory with the same number of labels the head is loaded too.
    """
    return _load(cfg, tokenizer, seed, AutoModelForSequenceClassification, "SEQ_CLS", num_labels=num_labels)


def _load(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int, auto_class, task_type: str, **config_kwargs
) -> nn.Module:
    # Seeded: weights that from_pretrained initialises (a new head) must be equal on every rank.
    with _seeded(seed):
        if cfg.path is not None:
            check_model_dir(cfg.path)
            attn = _supported_attention(cfg.attn_implementation, auto_class, AutoConfig.from_pretrained(cfg.path))
            with _quiet_transformers(task_type == "SEQ_CLS"):  # a new head is expected, not news
                model, info = auto_class.from_pretrained(
                    cfg.path,
                    dtype=_dtype(cfg),
                    attn_implementation=attn,
                    output_loading_info=True,
                    **config_kwargs,
                )
            new_weights = set(info.get("missing_keys", []))
        else:
            hf_config = random_init_config(cfg, tokenizer)
            for key, value in config_kwargs.items():
                setattr(hf_config, key, value)
            attn = _supported_attention(cfg.attn_implementation, auto_class, hf_config)
            model = auto_class.from_config(hf_config, dtype=_dtype(cfg), attn_implementation=attn)
            new_weights = {name for name, _ in model.named_parameters()}
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
            f"{model.get_input_embeddings().num_embeddings}: they do not belong together "
            "(point model.tokenizer_path at the model's own tokenizer)"
        )
    if task_type == "SEQ_CLS":
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        head = model.get_submodule("score")
        if any(name.startswith("score.") for name in new_weights):
            with torch.no_grad():
                for param in head.parameters():
                    param.zero_()
    _disable_dropout(model)
    enable_checkpointing(model, cfg.gradient_checkpointing)
    model.config.use_cache = False
    if cfg.lora.enabled:
        # seeded like the base weights: every rank must start from the same adapters
        with _seeded(seed):
            model = apply_lora(model, cfg.lora, task_type)
    return model


def _disable_dropout(model: nn.Module) -> None:
    """Dropout off (LoRA's own, added later, stays as configured). GPT-2 and some older models ship
    dropout 0.1: in train mode a policy would then differ from its identical reference (a DPO loss
    not log 2 at step 1, PPO ratios not 1 before any update) and every forward would draw random
    masks. The saved config keeps the model's values."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style attention: a float
            module.attention_dropout = 0.0


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """Silence transformers' load report (\"score.weight MISSING\") while loading a backbone."""
    level = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def apply_lora(model: nn.Module, cfg: LoraConfig, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap `model` with LoRA adapters. task_type SEQ_CLS also trains the (new) score head in full."""
    # local: importing peft costs seconds of start-up, and only LoRA runs need it
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, peft_config)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def gathered(model: nn.Module):
    """An FSDP2-sharded model made whole on every rank for the length of the block (one all-gather
    per sharded module, a collective: every rank enters together), and kept whole by its forwards:
    generation then runs, and the weights are read, with no collective inside, as on a DDP copy.
    The shards come back at exit. Any other model is used as it is."""
    from torch.distributed.fsdp import FSDPModule  # local: DTensor's import costs ~0.6 s

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        yield model
        return
    # FSDP2 reshards a module after each forward unless told not to; what it was told is restored
    # at exit (the private fields set_reshard_after_forward writes: it has no getter).
    states = [m._get_fsdp_state() for m in sharded]
    saved = [(s._auto_reshard_after_forward, [g.post_forward_mesh_info for g in s._fsdp_param_groups]) for s in states]
    for m in sharded:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m, state, (auto, infos) in zip(sharded, states, saved):
            state._auto_reshard_after_forward = auto
            for group, info in zip(state._fsdp_param_groups, infos):
                group.post_forward_mesh_info = info
            m.reshard()


@contextlib.contextmanager
def adapters_off(model: nn.Module, lora: bool = True):
    """The reference of a LoRA policy: the same model with its adapters disabled. A model without
    adapters (or `lora` false) is used as is."""
    module = unwrap(model)
    with module.disable_adapter() if lora and _is_peft(module) else contextlib.nullcontext():
        yield


def autocast(precision: str, device: torch.device):
    """bf16 autocast for `bf16_autocast`, a no-op context otherwise."""
    if precision == "bf16_autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _make_readable(directory: Path) -> None:
    """mkdtemp creates 0700 directories; a saved model is meant to be shared (0755/0644)."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _keep_generation_config(source: nn.Module, saved: nn.Module) -> None:
    """The saved model keeps the loaded model's generation config (a skeleton built from the config
    alone would fall back to config.eos_token_id and lose an instruct model's end-of-turn ids, e.g.
    Llama-3's <|eot_id|>), with the KV cache on."""
    source = source.get_base_model() if _is_peft(source) else source
    target = saved.get_base_model() if _is_peft(saved) else saved
    if getattr(target, "generation_config", None) is None:
        return
    if getattr(source, "generation_config", None) is not None:
        target.generation_config = copy.deepcopy(source.generation_config)
    target.generation_config.use_cache = True


def save_causal_lm(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    merge_lora: bool = True,
    auto_class=AutoModelForCausalLM,
    config_updates: dict | None = None,
) -> Path:
    """Write `state_dict` (full, unsharded, on CPU) as an HF model directory, atomically.

    `model` provides only the architecture: a fresh skeleton of `auto_class` is built on the
    meta device and the weights are assigned into it, so a sharded or wrapped training model is
    never modified. A LoRA model is merged into plain weights (`merge_lora`) or saved as an
    adapter. `config_updates` are set on the saved config (e.g. a reward model's statistics).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        hf_model = unwrap(model)
        with torch.device("meta"):
            if _is_peft(hf_model):
                from peft import get_peft_model  # local: seconds of start-up, LoRA models only

                base_config = hf_model.get_base_model().config
                skeleton = get_peft_model(auto_class.from_config(base_config), hf_model.peft_config["default"])
            else:
                skeleton = auto_class.from_config(hf_model.config)
        skeleton.load_state_dict(state_dict, assign=True, strict=True)
        skeleton.tie_weights()  # a no-op unless the config ties input and output embeddings
        if _is_peft(skeleton) and merge_lora:
            skeleton = skeleton.merge_and_unload()
        skeleton.config.use_cache = True  # training turned the KV cache off; users generate with it
        _keep_generation_config(hf_model, skeleton)
        for key, value in (config_updates or {}).items():
            setattr(skeleton.config, key, value)
        skeleton.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _make_readable(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --- streamed saving: one tensor in memory at a time ---------------------------------------------

_SHARD_BYTES = 5 * 10**9  # the Hub's usual safetensors shard size
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TensorSpec = tuple[torch.Size, torch.dtype]


def hf_class(model: nn.Module) -> type:
    """The model's transformers class: FSDP2 swaps a sharded module's class for a subclass
    (`FSDPLlamaForCausalLM`), which transformers neither names nor knows."""
    return next(c for c in type(unwrap(model)).__mro__ if not c.__name__.startswith("FSDP"))


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A weightless copy of an HF model (its class and config, on the meta device)."""
    hf_model = unwrap(model)
    with torch.device("meta"):
        skeleton = hf_class(hf_model)._from_config(hf_model.config)
    skeleton.tie_weights()
    if getattr(hf_model, "generation_config", None) is not None:
        skeleton.generation_config = copy.deepcopy(hf_model.generation_config)
    return skeleton


def causal_lm_skeleton(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """The causal LM `cfg` describes on the meta device: its class, config, dtype and generation
    config (the stop tokens), no weights and nothing read but the config files. What a generation
    engine whose weights are pushed to it needs: a 70B policy's engine never holds a copy of its own."""
    if cfg.path is not None:
        check_model_dir(cfg.path)
        hf_config = AutoConfig.from_pretrained(cfg.path)
    else:
        hf_config = random_init_config(cfg, tokenizer)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config, dtype=_dtype(cfg))
    if cfg.path is not None and Path(cfg.path, "generation_config.json").is_file():
        skeleton.generation_config = GenerationConfig.from_pretrained(cfg.path)
    return skeleton


def saved_weight_names(skeleton: nn.Module) -> list[str] | None:
    """The names `save_pretrained` writes for this model, in its order: the state dict without the
    tied copies (GPT-2's and tied models' `lm_head.weight`). None where transformers would rename or
    fuse weights on saving (some MoE models): those save through `save_causal_lm`."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    kept = remove_tied_weights_from_state_dict(skeleton.state_dict(), skeleton)
    try:
        reverted = revert_weight_conversion(skeleton, dict(kept))
    except Exception:  # a conversion that cannot run on meta tensors: not ours to stream
        return None
    return list(kept) if list(reverted) == list(kept) else None


def save_hf_streamed(
    skeleton: nn.Module,
    specs: dict[str, TensorSpec],
    fetch,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    write: bool = True,
    config_updates: dict | None = None,
    max_shard_bytes: int = _SHARD_BYTES,
) -> Path:
    """An HF model directory written one tensor at a time: `fetch(name)` returns a full tensor
    (a gather under FSDP/TP, a read from a DCP checkpoint) that goes straight into its safetensors
    shard, so the writer holds one tensor, never the model. Every rank calls it with the same
    `specs` (name -> shape, dtype) and calls `fetch` in the same order (it may be a collective);
    only the rank with `write` writes. Atomic like `save_causal_lm`."""
    out_dir = Path(out_dir)
    shards = _plan_shards(specs, max_shard_bytes)
    tmp = None
    if write:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for file_name, names in shards.items():
            _write_safetensors(tmp / file_name if tmp else None, {n: specs[n] for n in names}, fetch)
        if tmp is None:
            return out_dir
        if len(shards) > 1:
            total = sum(_nbytes(spec) for spec in specs.values())
            weight_map = {name: file_name for file_name, names in shards.items() for name in names}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        dtype = next((dtype for _, dtype in specs.values() if dtype.is_floating_point), None)  # the weights'
        _save_config(skeleton, tmp, config_updates, dtype)
        tokenizer.save_pretrained(tmp)
        _make_readable(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _nbytes(spec: TensorSpec) -> int:
    shape, dtype = spec
    return math.prod(shape) * dtype.itemsize


def _plan_shards(specs: dict[str, TensorSpec], max_shard_bytes: int) -> dict[str, list[str]]:
    """File name -> tensor names, in order, each file up to `max_shard_bytes` (or one tensor)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        if groups[-1] and size + _nbytes(spec) > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += _nbytes(spec)
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}


def _write_safetensors(path: Path | None, specs: dict[str, TensorSpec], fetch) -> None:
    """The safetensors format (a little-endian u64 header length, a JSON header of dtypes, shapes
    and byte offsets, then the raw bytes) written header first: the offsets follow from the
    shapes, so each tensor is written as it arrives and dropped. `path` None: fetch only."""
    header: dict = {}
    offset = 0
    for name, spec in specs.items():
        shape, dtype = spec
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + _nbytes(spec)],
        }
        offset += _nbytes(spec)
    header["__metadata__"] = {"format": "pt"}  # transformers refuses files without it
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") if path else contextlib.nullcontext() as f:
        if f:
            f.write(struct.pack("<Q", len(blob)) + blob)
        for name, (shape, dtype) in specs.items():
            tensor = fetch(name)
            if f:
                if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise ValueError(
                        f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(shape)} {dtype}"
                    )
                f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _save_config(skeleton: nn.Module, directory: Path, config_updates: dict | None, dtype: torch.dtype | None) -> None:
    """config.json (and generation_config.json) as `save_pretrained` writes them."""
    config = copy.deepcopy(skeleton.config)
    config.architectures = [type(skeleton).__name__]
    config.use_cache = True  # training turned the KV cache off; users generate with it
    if dtype is not None:
        config.dtype = str(dtype).split(".")[1]
    for key, value in (config_updates or {}).items():
        setattr(config, key, value)
    config.save_pretrained(directory)
    if skeleton.can_generate() and getattr(skeleton, "generation_config", None) is not None:
        generation_config = copy.deepcopy(skeleton.generation_config)
        generation_config.use_cache = True
        generation_config.save_pretrained(directory)
