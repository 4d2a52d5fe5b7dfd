"""An HTTP reward server: `alignkit serve reward --model RM [--host 127.0.0.1] [--port 5555]`.

    POST /score   {"prompts": [str | messages, ...], "responses": [str, ...]}
                  -> {"rewards": [float, ...], "attributes": [[float, ...], ...], "names": [str, ...]}
    GET  /health  -> {"status": "ok", "model": ..., "names": [...], "batches": n, "requests": n}

Requests from concurrent clients are batched: a request waits at most `max_delay_ms` for others
to join, and a batch holds at most `max_batch` responses (a larger request is scored alone), so
the model runs full batches under load (NeMo-Aligner's PyTriton server does the same with a
2 ms queue delay). Scoring runs in one worker thread, never blocking the event loop.

Guard rails: binds to loopback unless told otherwise; an optional bearer token (401 without it);
at most `max_items` responses per request (413); malformed JSON, fields or conversations (a
message without role or content, an unknown role) get a 422 naming the problem before the request
joins a batch. If scoring a batch fails anyway, each request in it is scored alone, so only the
request that fails gets the 500. `RemoteRewardModel` in `alignkit.rewards` is the client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from alignkit.data.formats import messages_from_value
from alignkit.data.io import DataError
from alignkit.rewards import LocalRewardModel
from alignkit.serving.guards import add_body_limit, check_bearer

__all__ = ["ScoreRequest", "create_app", "serve_reward_model"]

Scorer = Callable[[list, list], Any]  # (prompts, responses) -> RewardOutput


class ScoreRequest(BaseModel):
    prompts: list[str | list[dict[str, str]]]
    responses: list[str]


@dataclass
class _Pending:
    request: ScoreRequest
    future: asyncio.Future
    size: int = field(init=False)

    def __post_init__(self):
        self.size = len(self.request.responses)


def create_app(
    scorer: Scorer,
    model_name: str = "reward_model",
    names: list[str] | None = None,
    max_batch: int = 64,
    max_delay_ms: float = 5.0,
    max_items: int = 1024,
    max_body_bytes: int = 8 * 2**20,
    token: str | None = None,
) -> FastAPI:
    """A FastAPI app serving `scorer` (a reward source) with request batching."""
    stats = {"batches": 0, "requests": 0}
    queue: asyncio.Queue[_Pending] = asyncio.Queue()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        task = asyncio.create_task(batcher())
        yield
        task.cancel()

    app = FastAPI(title="alignkit reward server", lifespan=lifespan)

    async def batcher() -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await queue.get()
            batch, size = [first], first.size
            deadline = loop.time() + max_delay_ms / 1000
            while size < max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    break
                if size + nxt.size > max_batch:  # keep it for the next batch
                    queue.put_nowait(nxt)
                    break
                batch.append(nxt)
                size += nxt.size
            try:
                await score_together(batch)
            except Exception:  # noqa: BLE001 - one request's failure must not fail the others
                for item in batch:  # score each alone: only the failing one hears of it
                    try:
                        await score_together([item])
                    except Exception as exc:  # noqa: BLE001
                        if not item.future.done():
                            item.future.set_exception(exc)

    async def score_together(batch: list[_Pending]) -> None:
        prompts = [p for item in batch for p in item.request.prompts]
        responses = [r for item in batch for r in item.request.responses]
        out = await asyncio.get_running_loop().run_in_executor(None, scorer, prompts, responses)
        stats["batches"] += 1
        start = 0
        for item in batch:
            end = start + item.size
            result = {"rewards": out.rewards[start:end].tolist(), "names": out.names or []}
            if out.attributes is not None:
                result["attributes"] = out.attributes[start:end].tolist()
            if not item.future.done():
                item.future.set_result(result)
            start = end

    add_body_limit(app, max_body_bytes, lambda message: {"error": message})

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": exc.detail})

    @app.get("/health")
    async def health(request: Request) -> dict:
        check_bearer(request, token)
        return {"status": "ok", "model": model_name, "names": names or [], **stats}

    @app.post("/score")
    async def score(body: ScoreRequest, request: Request) -> dict:
        check_bearer(request, token)
        if len(body.prompts) != len(body.responses):
            raise HTTPException(
                status_code=422,
                detail=f"{len(body.prompts)} prompts but {len(body.responses)} responses: they must pair up",
            )
        if len(body.responses) > max_items:
            raise HTTPException(
                status_code=413, detail=f"{len(body.responses)} responses in one request; the limit is {max_items}"
            )
        for i, prompt in enumerate(body.prompts):  # a malformed conversation never joins a batch
            try:
                messages_from_value(prompt, "user", f"prompts[{i}]")
            except DataError as exc:
                raise HTTPException(status_code=422, detail=str(exc)) from None
        stats["requests"] += 1
        if not body.responses:
            return {"rewards": [], "names": names or []}
        future = asyncio.get_running_loop().create_future()
        await queue.put(_Pending(body, future))
        try:
            return await future
        except Exception as exc:  # noqa: BLE001
            raise HTTPException(status_code=500, detail=f"scoring failed: {type(exc).__name__}: {exc}") from None

    return app


def serve_reward_model(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 5555,
    token: str | None = None,
    normalize: bool = False,
    max_batch: int = 64,
    max_delay_ms: float = 5.0,
    max_items: int = 1024,
) -> None:
    """`alignkit serve reward`: the reward model in `model_dir` behind `create_app`, until stopped."""
    rm = LocalRewardModel(model_dir, batch_size=min(max_batch, 32), normalize=normalize)
    server = create_app(
        rm.score,
        model_name=str(model_dir),
        names=rm.names,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_items=max_items,
        token=token,
    )
    uvicorn.run(server, host=host, port=port, log_level="warning")
