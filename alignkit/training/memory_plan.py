"""Will it fit? A per-rank memory plan of a training config, from arithmetic alone.

No weight is loaded: the architecture comes from the model's config.json (`model.path`, read by
AutoConfig) or from `model.random_init`. Per rank the plan counts

    parameters    trainable + frozen, in the weight dtype of `model.precision`
    gradients     one per trainable parameter, in the weight dtype
    optimizer     AdamW: two moments per trainable parameter (fp32; bf16 with precision bf16)
    activations   what autograd keeps for backward, per decoder layer, at micro_batch x seq_len
                  (bf16 under autocast or FSDP's bf16 param_dtype; less with gradient_checkpointing)
    gathered      FSDP's unsharded weights of the root and the layers at work (fsdp.param_dtype)
    logits        micro_batch x seq_len x vocab x 4 bytes, x3 at backward's start (see _LOGIT_COPIES)
    extra models  the frozen copies the recipe holds (reference, teacher, reward model) and
                  PPO's critic, which trains (its own gradients and optimizer state)

FSDP shards the trained model's parameters, gradients and optimizer state over dp_shard x tp
(tensor parallelism splits the decoder layers, FSDP shards the rest); DDP replicates them; with
`distributed.fsdp.cpu_offload` they are host memory (`host`), not the GPU's. A frozen reference
is sharded like the trained model; a reward model or teacher is held whole by every rank. `suggest()` searches
meshes and micro-batches for the first that fits a GPU with 10% headroom.

    alignkit plan --config configs/sft/llama3_8b_lora.yaml --gpus 8 --gpu-memory 80GiB
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import ConfigError, ModelConfig

__all__ = ["Arch", "MemoryPlan", "arch_of", "count_params", "lora_params", "parse_bytes", "plan", "suggest"]

HEADROOM = 0.10  # the share of a GPU left free: the allocator's fragmentation, NCCL buffers, CUDA context
# The step's peak, at the start of backward: the float32 log-softmax the cross-entropy saves and
# the two gradients backward makes of it, each (micro_batch * seq_len, vocab).
_LOGIT_COPIES = 3
_LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Arch:
    """The sizes of a decoder that decide its memory."""

    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    positions: int = 0  # learned position embeddings (GPT-2); 0: rotary
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: an RMSNorm of head_dim on q and k

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


# The shipped configs' models, from their published config.json files, so that a plan can be
# made before the weights are downloaded (a directory that exists is always read instead).
_LLAMA31_8B = Arch("llama", 128256, 4096, 32, 32, 8, 128, 14336, tied=False)
_PUBLISHED = {
    "Llama-3.1-8B": _LLAMA31_8B,
    "Llama-3.1-8B-Instruct": _LLAMA31_8B,
    "Llama-3.1-70B-Instruct": Arch("llama", 128256, 8192, 80, 64, 8, 128, 28672, tied=False),
    "Qwen3-8B": Arch("qwen3", 151936, 4096, 36, 32, 8, 128, 12288, tied=False, qk_norm=True),
    "Qwen3-1.7B": Arch("qwen3", 151936, 2048, 28, 16, 8, 128, 6144, tied=True, qk_norm=True),
}


# --- parameters --------------------------------------------------------------------------


def arch_of(model: ModelConfig) -> Arch:
    """The architecture `model` describes: its config.json, or its random_init sized to the byte tokenizer."""
    from transformers import AutoConfig  # local: transformers' import costs a second

    if model.path is not None:
        if not (Path(model.path) / "config.json").is_file():
            if Path(model.path).name in _PUBLISHED:  # plan before the download
                return _PUBLISHED[Path(model.path).name]
            raise ConfigError(
                f"{model.path}: no config.json (the plan reads the architecture from it; "
                "an earlier stage's output? add model.path=<a directory of the same architecture>)"
            )
        hf = AutoConfig.from_pretrained(model.path)
    else:
        from alignkit.models.loading import load_tokenizer, random_init_config

        hf = random_init_config(model, load_tokenizer(model))
    return _arch(hf)


def _arch(hf) -> Arch:
    if hf.model_type == "gpt2":
        inner = hf.n_inner or 4 * hf.n_embd
        head_dim = hf.n_embd // hf.n_head
        sizes = (hf.vocab_size, hf.n_embd, hf.n_layer, hf.n_head, hf.n_head, head_dim, inner)
        return Arch("gpt2", *sizes, hf.tie_word_embeddings, positions=hf.n_positions)
    if hf.model_type not in _LLAMA_FAMILY:
        raise ConfigError(f"alignkit plan knows {', '.join(('gpt2',) + _LLAMA_FAMILY)}, not {hf.model_type!r}")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return Arch(
        hf.model_type,
        hf.vocab_size,
        hf.hidden_size,
        hf.num_hidden_layers,
        hf.num_attention_heads,
        hf.num_key_value_heads or hf.num_attention_heads,
        head_dim,
        hf.intermediate_size,
        hf.tie_word_embeddings,
        qkv_bias=hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
        qk_norm=hf.model_type == "qwen3",
    )


def _linears(a: Arch) -> dict[str, tuple[int, int]]:
    """Each decoder layer's linear modules by name: (in_features, out_features)."""
    h, q = a.hidden, a.heads * a.head_dim
    if a.model_type == "gpt2":  # Conv1D: c_attn packs q, k, v
        return {
            "c_attn": (h, 3 * h),
            "attn.c_proj": (h, h),
            "c_fc": (h, a.intermediate),
            "mlp.c_proj": (a.intermediate, h),
        }
    return {
        "q_proj": (h, q),
        "k_proj": (h, a.kv_dim),
        "v_proj": (h, a.kv_dim),
        "o_proj": (q, h),
        "gate_proj": (h, a.intermediate),
        "up_proj": (h, a.intermediate),
        "down_proj": (a.intermediate, h),
    }


def _layer_params(a: Arch) -> int:
    weights = sum(i * o for i, o in _linears(a).values())
    h = a.hidden
    if a.model_type == "gpt2":  # every linear has a bias; two LayerNorms (weight + bias)
        return weights + 3 * h + h + a.intermediate + h + 4 * h
    bias = (a.heads * a.head_dim + 2 * a.kv_dim) if a.qkv_bias else 0
    qk_norm = 2 * a.head_dim if a.qk_norm else 0
    return weights + bias + qk_norm + 2 * h  # two RMSNorms


def count_params(a: Arch, head: int | None = None) -> int:
    """Exact parameter count: embeddings, layers, final norm, and the LM head (untied), or a
    value/score head of `head` outputs (no bias) in its place."""
    h = a.hidden
    embed = a.vocab * h + a.positions * h
    final_norm = 2 * h if a.model_type == "gpt2" else h
    out = a.vocab * h * (not a.tied) if head is None else h * head
    return embed + a.layers * _layer_params(a) + final_norm + out


def lora_params(a: Arch, r: int, target_modules: list[str] | str) -> int:
    """LoRA's trainable parameters: r x (in + out) per adapted module. "all-linear" adapts every
    linear layer but the output head, as peft does; a list matches module names by suffix."""
    names = list(_linears(a))
    if target_modules != "all-linear":
        targets = [target_modules] if isinstance(target_modules, str) else target_modules
        names = [n for n in names if any(n == t or n.endswith("." + t) or n.split(".")[-1] == t for t in targets)]
    return a.layers * sum(r * (i + o) for n, (i, o) in _linears(a).items() if n in names)


# --- activations -------------------------------------------------------------------------


def _activations(a: Arch, gc, tp: int) -> float:
    """Elements kept per token by all layers at the end of the forward, plus, with checkpointing,
    the one layer being recomputed in backward. A checkpointed layer keeps its input (`full`), or
    its input and the outputs of its matmuls and attention (`selective`); the others keep all."""
    per_layer = _layer_activation_elements(a, tp)
    if not gc.enabled:
        return a.layers * per_layer
    checkpointed = -(-a.layers // gc.every_n_layers)  # layers 0, N, 2N, ...
    kept = a.hidden
    if gc.mode == "selective":  # q, k, v, attention out, o; gate, up, down (k, v: the kv heads' own)
        q = a.heads * a.head_dim
        kept += 2 * a.hidden + (2 * q + 2 * a.kv_dim + 2 * a.intermediate) / tp
    # backward recomputes one checkpointed layer at a time: what it did not keep comes back
    return checkpointed * kept + (a.layers - checkpointed) * per_layer + (per_layer - kept)


def _layer_activation_elements(a: Arch, tp: int) -> float:
    """Elements autograd keeps per token in one decoder layer: the analogue of Korthikanti et al.
    2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 2: 34 x s x b x h
    bytes per layer) re-derived for a pre-norm decoder with a gated MLP, no dropout and fused
    (sdpa / flash) attention, so no s^2 term. Per token, q = heads x head_dim:
        norms        2 x (input, normalised, scaled by the weight)                 6h
        attention    q, k and v as sdpa gets them (GQA's k, v repeated to every
                     head), its output, and the o projection's contiguous input    5q
        MLP          gate, up, act(gate), act(gate) * up                          4i
    Tensor parallelism splits the heads and the MLP's hidden units over tp ranks. Checked against
    the bytes of the tensors autograd saves (tests/unit/training/test_memory_plan.py)."""
    h, q, i = a.hidden, a.heads * a.head_dim, a.intermediate
    if a.model_type == "gpt2":  # LayerNorms 6h; qkv, attention out, its copy 5h; fc out and gelu out 2i
        return 6 * h + (5 * q + 2 * i) / tp
    return 6 * h + (5 * q + 4 * i) / tp


# --- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank. `total` is what must fit; `gpu_memory` (if known) is the device's size."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    extra_models: dict[str, int] = field(default_factory=dict)
    gathered: int = 0  # FSDP: weights all-gathered for the layers at work (see _gathered)
    host: int = 0  # distributed.fsdp.cpu_offload: parameters, gradients and optimizer state in host memory
    params_total: int = 0  # the trained model's parameters (whole, not per rank)
    params_trainable: int = 0
    mesh: tuple[int, int, int] = (1, 1, 1)  # dp_replicate, dp_shard, tp
    micro_batch: int = 1
    seq_len: int = 1
    strategy: str = "fsdp"
    gpu_memory: int | None = None

    @property
    def training_state(self) -> int:
        """What a training step adds over the loaded weights: gradients, optimizer, activations, logits."""
        return self.gradients + self.optimizer + self.activations + self.logits + self.gathered

    @property
    def total(self) -> int:
        return self.parameters + self.training_state + sum(self.extra_models.values())

    @property
    def headroom(self) -> int | None:
        return None if self.gpu_memory is None else self.gpu_memory - self.total

    def fits(self) -> bool:
        return self.gpu_memory is not None and self.total <= (1 - HEADROOM) * self.gpu_memory


def _bytes(precision: str) -> tuple[int, int]:
    """(weight and gradient bytes, optimizer bytes per moment). bf16_autocast keeps fp32 master
    weights; only bf16 stores weights, gradients and moments in bf16."""
    return (2, 2) if precision == "bf16" else (4, 4)


def _extra_models(cfg, recipe: str, arch: Arch, shard: int) -> dict[str, int]:
    """Bytes per rank of the models the recipe holds besides the one it trains (read from each
    recipe's main(): what it loads, and whether it wraps it)."""
    m = cfg.model
    # a frozen reference is sharded like the trained model under FSDP (training.distributed.wrap_frozen)
    own = count_params(arch) * _bytes(m.precision)[0] // shard
    lora = m.lora.enabled
    extra: dict[str, int] = {}
    if recipe in ("dpo", "cai") and not lora:
        loss_type = getattr(getattr(cfg, "loss", None), "type", "sigmoid")
        online_ref = getattr(getattr(cfg, "reference", None), "mode", "online") == "online"
        if recipe == "cai" or (online_ref and loss_type not in ("simpo", "orpo")):
            extra["reference"] = own  # a second, frozen copy of the starting policy
    if recipe == "ppo":
        if not lora:
            extra["reference"] = own
        extra.update(_critic(cfg, arch, shard))
        extra.update(_reward_model(cfg, m.precision, arch))
    if recipe == "reinforce":
        rf = cfg.reinforce
        if rf.kl_coef and not lora:
            extra["reference"] = own
        if rf.estimator == "onpolicy_distill" and cfg.teacher is not None:
            extra["teacher"] = _frozen(cfg.teacher)
        if cfg.reward is not None:
            extra.update(_reward_model(cfg, m.precision, arch))
    if recipe == "distill" and cfg.mode == "online":
        extra["teacher"] = _frozen(cfg.teacher)
    return extra


def _frozen(model: ModelConfig, head: int | None = None) -> int:
    return count_params(arch_of(model), head) * _bytes(model.precision)[0]


def _arch_or(path: str, policy: Arch) -> Arch:
    """The architecture at `path`; the policy's while an earlier stage has yet to write it there
    (a reward model trained from the policy, the usual pipeline)."""
    try:
        return arch_of(ModelConfig(path=path))
    except ConfigError:
        return policy


def _reward_model(cfg, precision: str, policy: Arch) -> dict[str, int]:
    """A reward model held whole by every trainer rank, unless Ray places it on ranks of its own."""
    source = cfg.reward
    if source.kind != "model" or cfg.placement.reward.ranks:
        return {}
    return {"reward model": count_params(_arch_or(source.path, policy), head=1) * _bytes(precision)[0]}


def _critic(cfg, arch: Arch, shard: int) -> dict[str, int]:
    """PPO's critic: a value-head model trained beside the actor (sharded like it), unless Ray
    places it on ranks of its own."""
    if cfg.placement.critic.ranks:
        return {}
    path = cfg.critic.path or (cfg.reward.path if cfg.reward.kind == "model" else None)
    critic_arch = arch if path is None else _arch_or(path, arch)
    weight, moment = _bytes(cfg.model.precision)
    n = count_params(critic_arch, head=1)
    return {"critic": n * (2 * weight + 2 * moment) // shard}


def plan(cfg, recipe: str, gpus: int | None = None, gpu_memory: int | None = None, **changes) -> MemoryPlan:
    """The per-rank plan of `cfg` (a recipe's typed config) on `gpus` processes (default: the
    config's mesh, or one process). `changes` override `micro_batch`, `dp_shard`, `tp`."""
    if recipe == "draftp":
        raise ConfigError("alignkit plan covers the language-model recipes; draftp trains a diffusion UNet")
    arch = arch_of(cfg.model)
    mesh = cfg.distributed.mesh
    world = gpus or (mesh.dp_replicate * (mesh.dp_shard or 1) * mesh.tp)
    tp = changes.get("tp", mesh.tp)
    if world % (mesh.dp_replicate * tp):
        raise ConfigError(
            f"--gpus {world}: not a multiple of distributed.mesh dp_replicate x tp = {mesh.dp_replicate * tp}"
        )
    dp_shard = changes.get("dp_shard", world // (mesh.dp_replicate * tp))  # the config's, unless --gpus differs
    micro = changes.get("micro_batch", cfg.train.micro_batch_size)
    seq = cfg.data.max_seq_len
    strategy = cfg.distributed.strategy if world > 1 else "none"
    shard = dp_shard * tp if strategy == "fsdp" else 1

    head = 1 if recipe == "reward_model" else None
    total = count_params(arch, head)
    lora = cfg.model.lora
    trainable = lora_params(arch, lora.r, lora.target_modules) + (arch.hidden if head else 0) if lora.enabled else total
    weight, moment = _bytes(cfg.model.precision)
    params = (total + (trainable if lora.enabled else 0)) * weight  # LoRA: the frozen base plus the adapters
    fsdp = cfg.distributed.fsdp
    bf16_compute = cfg.model.precision != "fp32" or fsdp.param_dtype == "bf16"
    tokens = micro * seq
    activations = _activations(arch, cfg.model.gradient_checkpointing, tp) * tokens * (2 if bf16_compute else 4)
    logits = 0 if head else _LOGIT_COPIES * tokens * arch.vocab * 4
    state = [int(params // shard), int(trainable * weight // shard), int(trainable * 2 * moment // shard)]
    offloaded = strategy == "fsdp" and fsdp.cpu_offload
    gathered = _gathered(arch, fsdp, tp, 2 if fsdp.param_dtype == "bf16" else weight) if strategy == "fsdp" else 0
    return MemoryPlan(
        parameters=0 if offloaded else state[0],
        gradients=0 if offloaded else state[1],
        optimizer=0 if offloaded else state[2],
        host=sum(state) if offloaded else 0,
        gathered=int(gathered),
        activations=int(activations),
        logits=int(logits),
        extra_models=_extra_models(cfg, recipe, arch, shard),
        params_total=total,
        params_trainable=trainable,
        mesh=(mesh.dp_replicate, dp_shard, tp),
        micro_batch=micro,
        seq_len=seq,
        strategy=strategy,
        gpu_memory=gpu_memory,
    )


def _gathered(a: Arch, fsdp, tp: int, nbytes: int) -> float:
    """FSDP's unsharded copies during a step: the root's weights (embeddings, final norm, head:
    gathered once per step) and two decoder layers (the one running and the one prefetched), or
    every layer with reshard_after_forward false (kept from its forward to its backward)."""
    layers = 2 if fsdp.reshard_after_forward else a.layers
    root = count_params(a) - a.layers * _layer_params(a)
    return (root + layers * _layer_params(a) / tp) * nbytes


def suggest(cfg, recipe: str, gpus: int, gpu_memory: int) -> MemoryPlan | None:
    """The first plan that fits with HEADROOM to spare: meshes dp_shard x tp over `gpus` (tp only
    for sft, whose data is split over data-parallel ranks; tp divides the heads and the MLP), the least tp
    first, each with the largest micro-batch up to the configured one. None: nothing fits."""
    arch = arch_of(cfg.model)
    splits = (gpus, arch.heads, arch.kv_heads, arch.intermediate)
    tps = [t for t in (1, 2, 4, 8) if all(n % t == 0 for n in splits)]
    if recipe != "sft" or arch.model_type not in _LLAMA_FAMILY:
        tps = [1]
    fsdp = _with_fsdp(cfg) if gpus > 1 else cfg
    for tp in tps:
        micro = cfg.train.micro_batch_size
        while micro >= 1:
            p = plan(fsdp, recipe, gpus, gpu_memory, tp=tp, dp_shard=gpus // tp, micro_batch=micro)
            if p.fits():
                return p
            micro //= 2
    return None


def _with_fsdp(cfg):
    """`cfg` sharded with FSDP: the strategy the search assumes on more than one GPU."""
    dist = cfg.distributed.model_copy(update={"strategy": "fsdp"})
    return cfg.model_copy(update={"distributed": dist})


def parse_bytes(text: str) -> int:
    """'80GiB', '80 GB', '141e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"--gpu-memory {text!r}: give a size such as 80GiB, 80GB or 141e9")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
