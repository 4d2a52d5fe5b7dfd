"""One POST with retries, for every HTTP client of a reward source (the reward server's client, the
LLM judge's): connection errors, timeouts and 5xx answers are retried with exponential back-off,
a 4xx is reported at once, and a server that stays down is one error naming its URL."""

from __future__ import annotations

import time

from alignkit.rewards.local import RewardSourceError

__all__ = ["post_json"]


def post_json(
    http,
    who: str,
    base_url: str,
    endpoint: str,
    body: dict,
    retries: int,
    backoff_s: float,
    error: type[RewardSourceError] = RewardSourceError,
):
    """POST `body` to `base_url/endpoint` with `http` (an httpx.Client); the answer's JSON. Errors
    name `who` (e.g. "reward server") and the URL."""
    import httpx  # local: a quarter second of start-up, for remote sources only

    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            answer = http.post(f"{base_url}/{endpoint}", json=body)
        except httpx.HTTPError as exc:  # connection refused, timeout, ...
            last = f"{type(exc).__name__}: {exc}"
            continue
        if answer.status_code >= 500:
            last = f"HTTP {answer.status_code}: {answer.text[:200]}"
            continue
        if answer.status_code != 200:
            raise error(
                f"{who} {base_url}/{endpoint} refused the request: HTTP {answer.status_code}: {answer.text[:300]}"
            )
        return answer.json()
    raise error(f"{who} {base_url} unreachable after {retries + 1} attempts ({last})")
