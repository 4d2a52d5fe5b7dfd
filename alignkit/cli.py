"""The `alignkit` command line.

    alignkit run RECIPE --config CONFIG [key.path=value ...] [--nproc N]
    alignkit ls
    alignkit validate CONFIG [--recipe RECIPE]
    alignkit score --model RM --data FILE [--out FILE]

CONFIG is a YAML path or the name of a shipped config (`configs/RECIPE/NAME.yaml`).
New knobs go into the config tree, never into new flags.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer
import yaml

from alignkit.config import ConfigError, configs_dir, find_config, load_config
from alignkit.data.io import DataError
from alignkit.recipes import RECIPES, recipe_module
from alignkit.training.distributed import shutdown

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Align generative models: SFT, distillation, DPO, reward models, RLHF, SteerLM, DRaFT+.")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


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
    nproc: Annotated[int, typer.Option(help="processes to launch with torchrun")] = 1,
) -> None:
    """Run a recipe. Extra arguments `a.b=c` override config values."""
    overrides = list(ctx.args)
    try:
        module, cfg = _load(recipe, config, overrides)  # validate before launching anything
        if nproc > 1 and "LOCAL_RANK" not in os.environ:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "alignkit.cli", "run", recipe, "--config", str(find_config(recipe, config)), *overrides]
            raise typer.Exit(code=subprocess.call(cmd))
        module.main(cfg)
        # Leave the process group explicitly, then end a torchrun rank without the interpreter's
        # teardown: gloo's worker threads destroyed by it abort the process now and then ("terminate
        # called without an active exception", SIGABRT after the run had finished and saved). Every
        # file is closed by then; logs and stdio are flushed here. Only on success: a failed rank
        # must exit at once so that torchrun stops the others, not wait at a barrier.
        if shutdown():
            _exit_now()
    except (ConfigError, DataError, FileNotFoundError) as exc:
        _fail(str(exc))


@app.command("ls")
def list_recipes() -> None:
    """List recipes and their shipped configs."""
    root = configs_dir()
    for name, module_path in RECIPES.items():
        configs = sorted(p.stem for p in (root / name).glob("*.yaml"))
        typer.echo(f"{name:20s} {', '.join(configs) or '-'}")


@app.command()
def validate(
    config: Annotated[str, typer.Argument(help="config path")],
    recipe: Annotated[str | None, typer.Option(help="recipe (default: the config's `recipe` key or its folder name)")] = None,
) -> None:
    """Check a config without running it."""
    try:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        recipe = recipe or (data.get("recipe") if isinstance(data, dict) else None) or path.parent.name
        _load(recipe, str(path), [])
    except (ConfigError, DataError) as exc:
        _fail(str(exc))
    typer.secho(f"ok: {config} is a valid {recipe} config", fg=typer.colors.GREEN)


@app.command()
def demo(
    stages: Annotated[str, typer.Option(help="comma-separated stages, or 'all' (default: data,tokenizer,base,sft,dpo,reward_model)")] = "",
    output_dir: Annotated[str, typer.Option("--output-dir", help="where the demo writes")] = "runs/demo",
) -> None:
    """Run the end-to-end demo on the task world (stages whose inputs are unchanged are reused)."""
    from alignkit.demo import run_demo

    try:
        run_demo([s for s in stages.split(",") if s] or None, output_dir)
    except (ConfigError, DataError, ValueError) as exc:
        _fail(str(exc))


@app.command("build-data")
def build_data(
    out: Annotated[str, typer.Option(help="output directory")] = "runs/data",
    seed: int = 0,
) -> None:
    """Write every task-world dataset (pretraining corpus, SFT, preferences, attributes, prompts, ...)."""
    from alignkit.data.taskworld import build_datasets

    for name, path in build_datasets(out, seed=seed).items():
        typer.echo(f"{name:18s} {path}")


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option(help="HF model directory to evaluate")],
    reference: Annotated[str | None, typer.Option(help="reference model directory: win rate and KL")] = None,
    prompts: Annotated[str, typer.Option(help="prompt records (JSONL with a 'prompt' field) or builtin:eval?n=...")] = "builtin:eval?n=350&seed=0",
    out: Annotated[str, typer.Option(help="output directory for eval.json and eval.png")] = "runs/eval",
    max_new_tokens: int = 96,
    temperature: float = 0.7,
    seed: int = 0,
) -> None:
    """Sample responses to held-out task-world prompts and score them with the oracle."""
    from alignkit.data.io import read_records
    from alignkit.evaluation.evaluate import evaluate_model, plot_results, write_json
    from alignkit.config import SamplingConfig

    try:
        records = [r.data for r in read_records(prompts)]
        if not records or "prompt" not in records[0]:
            raise DataError(f"{prompts}: expected prompt records with a 'prompt' field")
        params = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        result = evaluate_model(model, records, params, reference_dir=reference)
    except (DataError, FileNotFoundError, OSError) as exc:
        _fail(str(exc))
    write_json(result.to_json(records), Path(out) / "eval.json")
    plot_results({Path(model).name: result.metrics}, Path(out) / "eval.png")
    for key, value in result.metrics.items():
        typer.echo(f"{key:32s} {value:.4f}")


@app.command()
def score(
    model: Annotated[str, typer.Option(help="reward model directory (what `alignkit run reward_model` saves)")],
    data: Annotated[str, typer.Option(help="records: {prompt, response} (or completion), or preference pairs")],
    out: Annotated[str | None, typer.Option(help="write the records with their scores here (JSONL)")] = None,
    normalize: Annotated[bool, typer.Option(help="standardise rewards with the model's mean and std")] = False,
    batch_size: int = 16,
) -> None:
    """Score responses (or both sides of preference pairs) with a reward model."""
    import json

    from alignkit.data.io import read_records
    from alignkit.data.preference import RESPONSE_KEYS
    from alignkit.rewards import LocalRewardModel

    try:
        records = read_records(data)
        if not records:
            raise DataError(f"{data}: no records")
        rm = LocalRewardModel(model, batch_size=batch_size, normalize=normalize)
        first = records[0].data
        pair_keys = next((k for k in RESPONSE_KEYS if k[0] in first), None)
        sides = list(pair_keys) if pair_keys else ["completion" if "completion" in first else "response"]
        for r in records:
            missing = [k for k in ("prompt", *sides) if k not in r.data]
            if missing:
                raise DataError(f"{r.source}: missing field(s) {', '.join(missing)} (every record must have "
                                f"{', '.join(('prompt', *sides))}, like the first)")
        scored = {side: rm.score([r.data["prompt"] for r in records], [r.data[side] for r in records])
                  for side in sides}
    except (DataError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    rows = []
    for i, r in enumerate(records):
        row = dict(r.data)
        for side in sides:
            prefix = "" if len(sides) == 1 else f"{side}_"
            row[f"{prefix}score"] = float(scored[side].rewards[i])
            if len(rm.names) > 1:
                row[f"{prefix}score_attributes"] = dict(zip(rm.names, scored[side].attributes[i].tolist()))
        rows.append(row)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    rewards = torch.cat([scored[side].rewards for side in sides])
    typer.echo(f"records {len(records)}  reward mean {float(rewards.mean()):.4f}  std {float(rewards.std()):.4f}")
    if pair_keys:
        accuracy = float((scored[sides[0]].rewards > scored[sides[1]].rewards).float().mean())
        typer.echo(f"pairwise accuracy {accuracy:.4f}")


@app.command()
def annotate(
    data: Annotated[str, typer.Option(help="records: prompt/response or chat (the last assistant turn is annotated)")],
    out: Annotated[str, typer.Option(help="output JSONL: the records with a SteerLM 'label'")],
    reward_model: Annotated[str | None, typer.Option(help="attribute model directory (a regression reward model)")] = None,
    url: Annotated[str | None, typer.Option(help="or a reward server (`alignkit serve reward`) with attributes")] = None,
    oracle: Annotated[bool, typer.Option(help="or the task world's oracle")] = False,
    attributes: Annotated[str, typer.Option(help="the label's attributes, in order")] = ",".join(
        ("helpfulness", "correctness", "coherence", "complexity", "verbosity")),
) -> None:
    """SteerLM step 2: label each response with its attributes (clipped to 0..4, rounded)."""
    import json

    from alignkit.data.io import read_records
    from alignkit.data.steerlm import annotate as annotate_records
    from alignkit.rewards import RewardSourceConfig, build_reward_source

    sources = [k for k, v in (("model", reward_model), ("http", url), ("oracle", oracle)) if v]
    if len(sources) != 1:
        _fail("give exactly one of --reward-model, --url, --oracle")
    try:
        source = build_reward_source(RewardSourceConfig(kind=sources[0], path=reward_model, url=url))
        rows = annotate_records(read_records(data), source, [a.strip() for a in attributes.split(",") if a.strip()])
    except (DataError, FileNotFoundError, ValueError, RuntimeError) as exc:
        _fail(str(exc))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
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
    attributes: Annotated[str | None, typer.Option(
        help="SteerLM models: target attributes, e.g. 'verbosity:0,politeness:4' (others: the model's defaults); "
             "a record's own 'attributes' (object or label) wins")] = None,
) -> None:
    """Sample responses with the KV-cache engine and write them as JSONL."""
    import json

    from alignkit.data.formats import messages_from_value
    from alignkit.data.io import read_records
    from alignkit.data.steerlm import LabelError, SteerLMFormat, steered_prompt
    from alignkit.evaluation.evaluate import load_for_eval
    from alignkit.config import SamplingConfig
    from alignkit.generation.sampler import generate as sample

    try:
        records = read_records(prompts)
        conversations = []
        for r in records:
            if "messages" in r.data:
                conversations.append(messages_from_value(r.data["messages"], "user", f"{r.source}: field 'messages'"))
            elif "prompt" in r.data:
                conversations.append(messages_from_value(r.data["prompt"], "user", f"{r.source}: field 'prompt'"))
            else:
                raise DataError(f"{r.source}: a prompt record needs 'prompt' or 'messages'")
        if not Path(model, "config.json").is_file():
            raise FileNotFoundError(f"not a Hugging Face model directory (no config.json): {model}")
        lm, tokenizer = load_for_eval(model)
        fmt = SteerLMFormat.from_config(lm.config)
        texts, labels = [], []
        for r, c in zip(records, conversations):
            request = r.data.get("attributes", attributes)
            try:
                texts.append(steered_prompt(tokenizer, c, fmt, request))
            except LabelError as exc:
                raise DataError(f"{r.source}: {exc}") from None
            labels.append({"label": fmt.label(request)} if fmt else {})
    except (DataError, FileNotFoundError, OSError) as exc:
        _fail(str(exc))
    params = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, n=n,
                            stop=tuple(stop or ()), seed=seed)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    written = ended = 0
    with open(out, "w", encoding="utf-8") as f:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            batch_params = params.model_copy(update={"seed": seed + start})
            for c in sample(lm, chunk, batch_params, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.decode):
                record = records[start + c.prompt_index].data
                steer = labels[start + c.prompt_index]
                f.write(json.dumps({"prompt": record.get("prompt", record.get("messages")), **steer, "response": c.text,
                                    "sample": written % n, "is_end": c.is_end, "finish_reason": c.finish_reason,
                                    "num_tokens": len(c.token_ids), "logprob": sum(c.logprobs)},
                                   ensure_ascii=False) + "\n")
                written += 1
                ended += c.is_end
    typer.echo(f"wrote {written} samples for {len(ids)} prompts to {out} ({ended} ended on EOS or a stop string)")


@app.command("generate-images")
def generate_images(
    out: Annotated[str, typer.Option(help="output PNG: one row per prompt, one column per seed")],
    prompts: Annotated[list[str], typer.Option("--prompt", help="a prompt (repeatable), or a records file with "
                                                                "'prompt' (JSONL, builtin:captions?n=4, ...)")],
    model: Annotated[str | None, typer.Option(help="base diffusers pipeline directory (default: the one --lora names)")] = None,
    lora: Annotated[str | None, typer.Option(help="DRaFT+ adapters (a draftp run's final/)")] = None,
    schedule: Annotated[str, typer.Option(help="annealed importance guidance: base, draft, linear, power_P, step_F")] = "draft",
    n: Annotated[int, typer.Option(help="images per prompt (seeds seed..seed+n-1)")] = 4,
    seed: int = 0,
    steps: Annotated[int, typer.Option(help="DDIM steps")] = 50,
    guidance: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 7.5,
    reward: Annotated[str | None, typer.Option(help="score the images: a reward directory or module:function")] = None,
) -> None:
    """Sample images from a diffusion pipeline (with DRaFT+ adapters, optionally annealed) into a PNG grid."""
    import json

    from alignkit.diffusion.images import save_grid
    from alignkit.diffusion.inference import generate_images as sample_images
    from alignkit.diffusion.inference import load_for_images, read_prompts
    from alignkit.diffusion.reward import load_image_reward
    from alignkit.diffusion.sampling import diversity

    try:
        if schedule != "draft" and lora is None:
            raise ValueError(f"--schedule {schedule}: mixing base and fine-tuned models needs --lora")
        pipe = load_for_images(model, lora)
        texts = prompts
        if len(prompts) == 1 and (Path(prompts[0]).is_file() or prompts[0].startswith("builtin:")):
            texts = read_prompts(prompts[0], pipe.tokenizer)
        images = sample_images(pipe, texts, list(range(seed, seed + n)), steps, guidance, schedule)
        scores = load_image_reward(reward)(images.flatten(0, 1), [t for t in texts for _ in range(n)]) if reward else None
    except (DataError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    save_grid(images, out, labels=texts)
    summary = {"prompts": texts, "seeds": list(range(seed, seed + n)), "schedule": schedule,
               "diversity": diversity(images) if n > 1 else None}
    if scores is not None:
        summary["rewards"] = scores.view(len(texts), n).tolist()
        summary["reward"] = float(scores.mean())
    Path(out).with_suffix(".json").write_text(json.dumps(summary, indent=1))
    extra = f", mean reward {summary['reward']:.3f}" if scores is not None else ""
    typer.echo(f"wrote {len(texts)} x {n} images to {out}{extra}")


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
    import json

    from alignkit.diffusion.pipeline import save_pipeline
    from alignkit.diffusion.pretrain import pretrain_shape_pipeline
    from alignkit.diffusion.reward import train_shape_judge

    root = Path(out)
    judge, judge_report = train_shape_judge(n=judge_images, seed=seed)
    judge.save(root / "judge")
    typer.echo(f"judge: {judge_report}")
    pipe, report = pretrain_shape_pipeline(n_images=images, vae_steps=vae_steps, unet_steps=unet_steps, seed=seed,
                                           log=typer.echo)
    save_pipeline(pipe, root / "base")
    (root / "report.json").write_text(json.dumps({"judge": judge_report, "base": report}, indent=1))
    typer.echo(f"wrote {root / 'base'} and {root / 'judge'}")


serve_app = typer.Typer(no_args_is_help=True, help="HTTP servers: a reward model, an OpenAI-compatible LM.")
app.add_typer(serve_app, name="serve")


@serve_app.command("reward")
def serve_reward(
    model: Annotated[str, typer.Option(help="reward model directory (what `alignkit run reward_model` saves)")],
    host: Annotated[str, typer.Option(help="address to bind; loopback unless you mean to expose it")] = "127.0.0.1",
    port: int = 5555,
    token_env: Annotated[str | None, typer.Option(help="require `Authorization: Bearer <token>` with the token "
                                                       "read from this environment variable")] = None,
    normalize: Annotated[bool, typer.Option(help="standardise rewards with the model's mean and std")] = False,
    max_batch: Annotated[int, typer.Option(help="responses per forward batch, gathered across requests")] = 64,
    max_delay_ms: Annotated[float, typer.Option(help="how long a request waits for others to join its batch")] = 5.0,
    max_items: Annotated[int, typer.Option(help="responses allowed in one request")] = 1024,
) -> None:
    """Serve a reward model over HTTP: POST /score, GET /health."""
    import os

    import uvicorn

    from alignkit.rewards import LocalRewardModel
    from alignkit.serving.reward_server import create_app

    token = None
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            _fail(f"--token-env {token_env}: the variable is not set")
    try:
        rm = LocalRewardModel(model, batch_size=min(max_batch, 32), normalize=normalize)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    server = create_app(rm.score, model_name=str(model), names=rm.names, max_batch=max_batch,
                        max_delay_ms=max_delay_ms, max_items=max_items, token=token)
    uvicorn.run(server, host=host, port=port, log_level="warning")


@serve_app.command("generate")
def serve_generate(
    model: Annotated[str, typer.Option(help="HF causal LM directory")],
    host: Annotated[str, typer.Option(help="address to bind; loopback unless you mean to expose it")] = "127.0.0.1",
    port: int = 8000,
    name: Annotated[str | None, typer.Option(help="the model id clients ask for (default: the directory)")] = None,
    max_tokens_limit: Annotated[int, typer.Option(help="the most new tokens a request may ask for")] = 1024,
) -> None:
    """Serve a causal LM behind an OpenAI-compatible API: /v1/completions, /v1/chat/completions."""
    import uvicorn

    from alignkit.evaluation.evaluate import load_for_eval
    from alignkit.serving.openai_server import create_app

    if not Path(model, "config.json").is_file():
        _fail(f"not a Hugging Face model directory (no config.json): {model}")
    lm, tokenizer = load_for_eval(model)
    server = create_app(lm, tokenizer, name or str(model), max_tokens_limit=max_tokens_limit)
    uvicorn.run(server, host=host, port=port, log_level="warning")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
