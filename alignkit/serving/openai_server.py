"""An OpenAI-compatible generation server: `alignkit serve generate --model DIR`.

    GET  /v1/models
    POST /v1/completions        {"model", "prompt": str | [str] | [int] | [[int]], "max_tokens", "temperature",
                                 "top_p", "top_k", "n", "stop": str | [str], "seed", "logprobs": k, "stream",
                                 "prompt_logprobs": k}
    POST /v1/chat/completions   {"model", "messages": [{"role", "content": str | [{"type": "text", "text"}]}],
                                 same sampling fields, "logprobs": bool, "top_logprobs": k, "stream"}

so that any OpenAI client (the `openai` package, LangChain, curl) can use a model trained here.
Chat requests are rendered with the model's own chat template (roles system, developer (as
system), user, assistant, tool). Sampling runs in one worker thread (a model serves one batch at a
time) on alignkit's KV-cache engine or, with `--backend vllm`, on an in-process vLLM engine (the
`generation.engine` interface the trainers use), and stops at the model's own end-of-turn tokens;
`finish_reason` is "stop" when the answer ended on one of them or on a stop string and "length"
when `max_tokens` cut it. `stream: true` sends server-sent events as tokens are sampled
(`stream_options.include_usage` adds a usage chunk); a client that disconnects stops its
generation. (With vLLM the tokens of a request arrive together once its batch is done, and a
disconnect is noticed then.) Log-probs are the model's own (temperature 1, before top-k/top-p), the numbers
a training forward pass computes.

`prompt_logprobs: k` (vLLM's extension, in vLLM's shape) scores the prompt itself: each choice
gets `prompt_logprobs`, one entry per prompt token, `null` for the first and otherwise
{token id: {"logprob", "rank", "decoded_token"}} for the token that is there and the k most likely
ones. This is how a teacher behind an endpoint scores a student's tokens (on-policy distillation,
`reinforce.estimator=onpolicy_distill` with `teacher_server`): the ids are exact, where the
text-keyed `logprobs` of the legacy API would be ambiguous.

Refused with a 4xx naming the problem, before any generation: a prompt plus `max_tokens` beyond
the model's context (its position limit), `max_tokens` above the server's limit, token ids outside
the vocabulary, non-text content parts, `tools`, an unknown role, a template that rejects the
conversation; with `--token-env`, a missing bearer token (401); an oversize body (413).

SteerLM models (config.json has a `steerlm` entry) are steered through an extra chat field,
`attributes`: `{"verbosity": 0, "politeness": 4}` or a label string; attributes left out take the
model's defaults. With the `openai` package: `extra_body={"attributes": {"verbosity": 0}}`. The
response's `alignkit_label` field is the full label the answer was conditioned on. Asking a model
that is not a SteerLM model for attributes is a 400.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from alignkit.config import SamplingConfig
from alignkit.data.steerlm import LabelError, SteerLMFormat, steered_prompt
from alignkit.generation.engine import Engine, build_engine
from alignkit.generation.native import NativeEngine
from alignkit.generation.sampler import Completion, stop_token_ids
from alignkit.models.loading import load_for_eval, position_limit
from alignkit.serving.guards import add_body_limit, check_bearer

__all__ = ["create_app", "serve_model"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # vLLM's extension; 0 or -1: off
    n: int = Field(default=1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_call_id, name, tool_calls: for the chat template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    attributes: dict[str, float] | str | None = None  # SteerLM target attributes
    tools: list[dict[str, Any]] | None = None


def _bad(message: str) -> HTTPException:
    return HTTPException(status_code=400, detail=message)


def _message(message: ChatMessage, index: int) -> dict[str, Any]:
    """A request message as the chat template takes it: text parts joined, `developer` as `system`."""
    content = message.content
    if isinstance(content, list):
        kinds = sorted({part.type for part in content if part.type != "text"})
        if kinds:
            raise _bad(f"messages[{index}]: content parts of type {', '.join(kinds)}: this server serves a text model")
        content = "\n".join(part.text or "" for part in content)
    extra = {k: v for k, v in (message.model_extra or {}).items() if v is not None}
    role = "system" if message.role == "developer" else message.role
    return {**extra, "role": role, "content": content if content is not None else ""}


@dataclass
class _Job:
    """One request's generation: its prompts, sampling and log-prob settings."""

    ids: list[list[int]]
    sampling: SamplingConfig
    top_logprobs: int = 0
    want_logprobs: bool = False


class _RowText:
    """The text of one streamed completion, released as it becomes final: a trailing partial UTF-8
    character waits for its next byte, and the last (longest stop string - 1) characters wait
    until no stop string can start in them (the final text is cut before a stop string)."""

    def __init__(self, decode: Callable[[list[int]], str], end_ids: set[int], stops: tuple[str, ...]):
        self.decode, self.end_ids, self.stops = decode, end_ids, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        if token in self.end_ids:
            return ""
        self.tokens.append(token)
        text = self.decode(self.tokens)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:  # this token completed a stop string: the text ends before it
            ready = text[: min(cuts)]
        else:
            ready = (text[: len(text) - self.hold] if self.hold else text).rstrip("\ufffd")
        if len(ready) <= len(self.sent) or not ready.startswith(self.sent):
            return ""
        delta, self.sent = ready[len(self.sent) :], ready
        return delta

    def finish(self, final_text: str) -> str:
        rest = final_text[len(self.sent) :] if final_text.startswith(self.sent) else ""
        self.sent = final_text
        return rest


class _Cancelled(Exception):
    """The streaming client went away: stop generating for it."""


def create_app(
    model,
    tokenizer,
    model_name: str,
    max_tokens_limit: int = 1024,
    default_max_tokens: int = 128,
    token: str | None = None,
    max_body_bytes: int = 8 * 2**20,
    engine: Engine | None = None,
) -> FastAPI:
    """The app serving `model` (its config, vocabulary and prompt log-probs); `engine` samples
    (default: the native engine on `model` itself)."""
    app = FastAPI(title="alignkit OpenAI-compatible server")
    engine = engine or NativeEngine(model, tokenizer)
    lock = threading.Lock()  # one generation at a time on the one model
    steer = SteerLMFormat.from_config(model.config)
    stops = stop_token_ids(model, tokenizer)  # the model's end-of-turn tokens too, not only EOS
    context = position_limit(model.config)
    vocab = model.get_input_embeddings().num_embeddings

    def error_body(message: str) -> dict:
        return {"error": {"message": message, "type": "invalid_request_error"}}

    add_body_limit(app, max_body_bytes, error_body)

    @app.exception_handler(HTTPException)
    async def _error(_request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content=error_body(exc.detail))

    def sampling_of(req: _Sampling, ids: list[list[int]]) -> SamplingConfig:
        asked = req.max_completion_tokens or req.max_tokens
        wanted = asked or min(default_max_tokens, max_tokens_limit)
        if wanted > max_tokens_limit:
            raise _bad(f"max_tokens={wanted} is above this server's limit {max_tokens_limit}")
        longest = max(len(p) for p in ids)
        if context is not None:
            if longest >= context:
                raise _bad(f"this model's maximum context length is {context} tokens; the prompt has {longest}")
            if asked is None:  # not asked for: as many as fit
                wanted = min(wanted, context - longest)
            elif longest + wanted > context:
                raise _bad(
                    f"this model's maximum context length is {context} tokens; the prompt has {longest} "
                    f"and max_tokens asks for {wanted} more"
                )
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return SamplingConfig(
            max_new_tokens=wanted,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=max(req.top_k, 0),
            n=req.n,
            stop=stop,
            seed=req.seed,
        )

    def run(job: _Job, on_token=None) -> list[Completion]:
        with lock:
            return engine.generate(job.ids, job.sampling, top_logprobs=job.top_logprobs, on_token=on_token)

    def usage(job: _Job, completions: list[Completion]) -> dict[str, int]:
        prompt = sum(len(p) for p in job.ids)
        completion = sum(len(c.token_ids) for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def piece(token_id: int) -> str:
        return tokenizer.decode([token_id])

    def chat_logprob(token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            text = piece(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {**entry(token_id, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]}

    def chat_logprobs(c: Completion) -> dict[str, Any]:
        kept = [i for i, t in enumerate(c.token_ids) if t not in stops]
        tops = c.top_logprobs or [[] for _ in c.token_ids]
        return {"content": [chat_logprob(c.token_ids[i], c.logprobs[i], tops[i]) for i in kept]}

    def completion_logprobs(c: Completion, k: int) -> dict[str, Any]:
        kept = [i for i, t in enumerate(c.token_ids) if t not in stops]
        tokens = [piece(c.token_ids[i]) for i in kept]
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        top = [{piece(t): lp for t, lp in c.top_logprobs[i]} for i in kept] if k else None
        return {
            "tokens": tokens,
            "token_logprobs": [c.logprobs[i] for i in kept],
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def finish_reason(c: Completion) -> str:
        return "stop" if c.is_end else "length"

    def prompt_ids(req: CompletionRequest) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise _bad("prompt is empty")
        if isinstance(prompt[0], int):  # one prompt of token ids
            prompt = [prompt]
        ids = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                p = tokenizer(p, add_special_tokens=False)["input_ids"]
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise _bad(f"prompt {i}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
            ids.append(p or [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id])
        return ids

    async def complete(job: _Job) -> list[Completion]:
        return await asyncio.get_running_loop().run_in_executor(None, run, job)

    def score_prompts(ids: list[list[int]], k: int) -> list[list[dict | None]]:
        with lock:
            return [[None] + _prompt_entries(model, p, k, piece) for p in ids]

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_bearer(request, token)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "alignkit"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_bearer(request, token)
        ids = prompt_ids(req)
        job = _Job(ids, sampling_of(req, ids), top_logprobs=req.logprobs or 0, want_logprobs=req.logprobs is not None)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if req.prompt_logprobs is not None and req.stream:
            raise _bad("prompt_logprobs is not available with stream=true")

        def choice(i: int, text: str, c: Completion | None, lp: dict | None) -> dict[str, Any]:
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish_reason(c) if c else None}

        if req.stream:

            def token_chunk(row: int, delta: str, tok: int, lp: float, top: list) -> dict[str, Any] | None:
                if not delta and not job.want_logprobs:
                    return None
                logprobs = None
                if job.want_logprobs:
                    text = piece(tok)
                    logprobs = {
                        "tokens": [text],
                        "token_logprobs": [lp],
                        "top_logprobs": [{piece(t): v for t, v in top}] if job.top_logprobs else None,
                        "text_offset": [0],
                    }
                return {**head, "object": "text_completion", "choices": [choice(row, delta, None, logprobs)]}

            def last_chunk(row: int, rest: str, c: Completion) -> dict[str, Any]:
                return {**head, "object": "text_completion", "choices": [choice(row, rest, c, None)]}

            return stream(job, req, head, "text_completion", None, token_chunk, last_chunk)
        out = await complete(job)
        choices = [
            choice(i, c.text, c, completion_logprobs(c, job.top_logprobs) if job.want_logprobs else None)
            for i, c in enumerate(out)
        ]
        if req.prompt_logprobs is not None:  # choice i answers prompt i // n
            loop = asyncio.get_running_loop()
            scored = await loop.run_in_executor(None, score_prompts, ids, req.prompt_logprobs)
            for i, c in enumerate(choices):
                c["prompt_logprobs"] = scored[i // req.n]
        return {**head, "object": "text_completion", "usage": usage(job, out), "choices": choices}

    def chat_prompt(req: ChatRequest) -> list[int]:
        if req.tools:
            raise _bad("tools are not supported by this server")
        messages = [_message(m, i) for i, m in enumerate(req.messages)]
        try:
            text = steered_prompt(tokenizer, messages, steer, req.attributes, where="the request")
        except LabelError as exc:
            raise _bad(f"attributes: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a template error is the request's problem
            raise _bad(f"cannot render these messages with the model's chat template: {exc}") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_bearer(request, token)
        if req.top_logprobs and not req.logprobs:
            raise _bad("top_logprobs needs logprobs=true")
        ids = [chat_prompt(req)]
        job = _Job(ids, sampling_of(req, ids), top_logprobs=req.top_logprobs or 0, want_logprobs=req.logprobs)
        label = {"alignkit_label": steer.label(req.attributes)} if steer else {}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name, **label}
        if req.stream:

            def first_chunk(row: int) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""}
                return chunk(row, delta, None, None)

            def chunk(row: int, delta: dict, logprobs: dict | None, reason: str | None) -> dict[str, Any]:
                body = {"index": row, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
                return {**head, "object": "chat.completion.chunk", "choices": [body]}

            def token_chunk(row: int, delta: str, tok: int, lp: float, top: list) -> dict[str, Any] | None:
                if job.want_logprobs and tok not in stops:
                    return chunk(row, {"content": delta}, {"content": [chat_logprob(tok, lp, top)]}, None)
                return chunk(row, {"content": delta}, None, None) if delta else None

            def last_chunk(row: int, rest: str, c: Completion) -> dict[str, Any]:
                return chunk(row, {"content": rest} if rest else {}, None, finish_reason(c))

            return stream(job, req, head, "chat.completion.chunk", first_chunk, token_chunk, last_chunk)
        out = await complete(job)
        return {
            **head,
            "object": "chat.completion",
            "usage": usage(job, out),
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c) if job.want_logprobs else None,
                    "finish_reason": finish_reason(c),
                }
                for i, c in enumerate(out)
            ],
        }

    def stream(job: _Job, req: _Sampling, head: dict, kind: str, first_chunk, token_chunk, last_chunk):
        """Server-sent events: the generation runs in the worker thread and hands each sampled
        token to the event loop, which sends the text that became final."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple] = asyncio.Queue()
        cancelled = threading.Event()
        rows = [_RowText(tokenizer.decode, set(stops), job.sampling.stop) for _ in range(len(job.ids) * job.sampling.n)]

        def on_token(row: int, tok: int, lp: float, top: list) -> None:
            if cancelled.is_set():
                raise _Cancelled
            loop.call_soon_threadsafe(queue.put_nowait, ("token", row, tok, lp, top))

        def work() -> None:
            try:
                result = ("done", run(job, on_token))
            except _Cancelled:
                return
            except Exception as exc:  # noqa: BLE001 - reported to this client, the server goes on
                result = ("error", exc)
            loop.call_soon_threadsafe(queue.put_nowait, result)

        async def events() -> AsyncIterator[str]:
            worker = loop.run_in_executor(None, work)
            try:
                for row in range(len(rows)) if first_chunk else ():
                    yield _event(first_chunk(row))
                while True:
                    item = await queue.get()
                    if item[0] == "token":
                        _, row, tok, lp, top = item
                        body = token_chunk(row, rows[row].push(tok), tok, lp, top)
                        if body is not None:
                            yield _event(body)
                    elif item[0] == "error":
                        yield _event(error_body(f"generation failed: {type(item[1]).__name__}: {item[1]}"))
                        break
                    else:
                        out = item[1]
                        for row, c in enumerate(out):
                            yield _event(last_chunk(row, rows[row].finish(c.text), c))
                        if req.stream_options and req.stream_options.include_usage:
                            yield _event({**head, "object": kind, "choices": [], "usage": usage(job, out)})
                        break
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()  # a client gone mid-stream frees the model at its next token
                del worker

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@torch.no_grad()
def _prompt_entries(model, ids: list[int], k: int, piece: Callable[[int], str]) -> list[dict]:
    """vLLM's prompt log-probs for prompt positions 1..L-1: {id: {"logprob", "rank", "decoded_token"}}
    for the token there and the k most likely, under the model's own distribution (temperature 1)."""
    logits = model(torch.tensor([ids], device=model.device)).logits[0, :-1].float()  # (L-1, V)
    logps = torch.log_softmax(logits, dim=-1)
    actual = torch.tensor(ids[1:], device=logps.device)  # (L-1,)
    chosen = logps.gather(-1, actual[:, None])  # (L-1, 1)
    ranks = (logps > chosen).sum(-1) + 1  # (L-1,) 1: the most likely token
    top_lp, top_ids = logps.topk(k, dim=-1) if k else (logps[:, :0], actual[:, None][:, :0])
    out = []
    for t, token in enumerate(ids[1:]):
        entry = {token: (float(chosen[t]), int(ranks[t]))}
        for r, (i, lp) in enumerate(zip(top_ids[t].tolist(), top_lp[t].tolist())):
            entry.setdefault(i, (lp, r + 1))
        out.append({str(i): {"logprob": v, "rank": rank, "decoded_token": piece(i)} for i, (v, rank) in entry.items()})
    return out


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def serve_model(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    max_tokens_limit: int = 1024,
    token: str | None = None,
    backend: Literal["native", "vllm"] = "native",
) -> None:
    """`alignkit serve generate`: the causal LM in `model_dir` behind `create_app`, until stopped;
    `backend` samples (vllm: an in-process vLLM engine fed the model's weights in memory)."""
    model, tokenizer = load_for_eval(model_dir)
    engine = build_engine(model, tokenizer, SamplingConfig(backend=backend))
    server = create_app(
        model, tokenizer, name or str(model_dir), max_tokens_limit=max_tokens_limit, token=token, engine=engine
    )
    uvicorn.run(server, host=host, port=port, log_level="warning")
