"""An OpenAI-compatible generation server: `alignkit serve generate --model DIR`.

    GET  /v1/models
    POST /v1/completions        {"model", "prompt": str | [str], "max_tokens", "temperature", "top_p",
                                 "n", "stop": str | [str], "seed"}
    POST /v1/chat/completions   {"model", "messages": [{"role", "content"}], same sampling fields}

so that any OpenAI client (the `openai` package, LangChain, curl) can use a model trained here.
Chat requests are rendered with the model's own chat template. Sampling runs on alignkit's
KV-cache engine in one worker thread (a model serves one batch at a time); `finish_reason` is
"stop" when the answer ended on EOS or a stop string and "length" when `max_tokens` cut it.
Unsupported fields (logit_bias, tools, streaming) are ignored or refused with a 400.

SteerLM models (config.json has a `steerlm` entry) are steered through an extra chat field,
`attributes`: `{"verbosity": 0, "politeness": 4}` or a label string; attributes left out take the
model's defaults. With the `openai` package: `extra_body={"attributes": {"verbosity": 0}}`. The
response's `alignkit_label` field is the full label the answer was conditioned on. Asking a model
that is not a SteerLM model for attributes is a 400.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from alignkit.config import SamplingConfig
from alignkit.data.steerlm import LabelError, SteerLMFormat, steered_prompt
from alignkit.generation.sampler import generate, stop_token_ids
from alignkit.models.loading import load_for_eval

__all__ = ["create_app", "serve_model"]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    attributes: dict[str, float] | str | None = None  # SteerLM target attributes


def create_app(
    model, tokenizer, model_name: str, max_tokens_limit: int = 1024, default_max_tokens: int = 128
) -> FastAPI:
    app = FastAPI(title="alignkit OpenAI-compatible server")
    lock = threading.Lock()  # one generation at a time on the one model
    steer = SteerLMFormat.from_config(model.config)
    stops = stop_token_ids(model, tokenizer)  # the model's end-of-turn tokens too, not only EOS

    @app.exception_handler(HTTPException)
    async def _error(_request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            status_code=exc.status_code, content={"error": {"message": exc.detail, "type": "invalid_request_error"}}
        )

    def params(req: _Sampling) -> SamplingConfig:
        if req.stream:
            raise HTTPException(status_code=400, detail="stream=true is not supported by this server")
        wanted = req.max_completion_tokens or req.max_tokens or default_max_tokens
        if wanted > max_tokens_limit:
            raise HTTPException(
                status_code=400, detail=f"max_tokens={wanted} is above this server's limit {max_tokens_limit}"
            )
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return SamplingConfig(
            max_new_tokens=wanted, temperature=req.temperature, top_p=req.top_p, n=req.n, stop=stop, seed=req.seed
        )

    def run(prompt_ids: list[list[int]], sampling: SamplingConfig):
        with lock:
            return generate(model, prompt_ids, sampling, stops, tokenizer.pad_token_id, tokenizer.decode)

    def usage(prompt_ids, completions) -> dict[str, int]:
        prompt = sum(len(p) for p in prompt_ids)
        completion = sum(len(c.token_ids) for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "alignkit"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> dict[str, Any]:
        sampling = params(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id] for p in prompts]
        out = await asyncio.get_running_loop().run_in_executor(None, run, ids, sampling)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "usage": usage(ids, out),
            "choices": [
                {"index": i, "text": c.text, "logprobs": None, "finish_reason": "length" if not c.is_end else "stop"}
                for i, c in enumerate(out)
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> dict[str, Any]:
        sampling = params(req)
        messages = [m.model_dump() for m in req.messages]
        try:
            text = steered_prompt(tokenizer, messages, steer, req.attributes)
        except LabelError as exc:
            raise HTTPException(status_code=400, detail=f"attributes: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a template error is the request's problem
            raise HTTPException(status_code=400, detail=f"cannot render these messages: {exc}") from None
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"]]
        out = await asyncio.get_running_loop().run_in_executor(None, run, ids, sampling)
        label = {"alignkit_label": steer.label(req.attributes)} if steer else {}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "usage": usage(ids, out),
            **label,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": "length" if not c.is_end else "stop",
                }
                for i, c in enumerate(out)
            ],
        }

    return app


def serve_model(
    model_dir: str, host: str = "127.0.0.1", port: int = 8000, name: str | None = None, max_tokens_limit: int = 1024
) -> None:
    """`alignkit serve generate`: the causal LM in `model_dir` behind `create_app`, until stopped."""
    model, tokenizer = load_for_eval(model_dir)
    server = create_app(model, tokenizer, name or str(model_dir), max_tokens_limit=max_tokens_limit)
    uvicorn.run(server, host=host, port=port, log_level="warning")
