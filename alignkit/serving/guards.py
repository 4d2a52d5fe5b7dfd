"""What both servers check before a request reaches a model: the bearer token and the body size.

Both are refused before the body is parsed, so an oversize or unauthorised request costs nothing
and never joins a batch. A body sent without Content-Length (chunked) is counted as it arrives.
"""

from __future__ import annotations

import secrets

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

__all__ = ["add_body_limit", "check_bearer"]


def check_bearer(request: Request, token: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <token>` (no check when token is None)."""
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise HTTPException(status_code=401, detail="missing or wrong bearer token")


def add_body_limit(app: FastAPI, max_body_bytes: int, error) -> None:
    """A 413 for a request body over `max_body_bytes`; `error(message) -> dict` shapes the reply."""

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            message = f"request body of {length} bytes; the limit is {max_body_bytes}"
            return JSONResponse(status_code=413, content=error(message))
        if length is None and request.method == "POST":  # chunked: read it here, up to the limit
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    message = f"request body over {max_body_bytes} bytes, the limit"
                    return JSONResponse(status_code=413, content=error(message))
            request._body = body  # starlette reads a consumed stream from here
        return await call_next(request)
