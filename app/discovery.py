"""Instrument discovery over REST (requests): reference data only, never written to raw/.

The exchange module builds the request and parses the answer; this module only does the I/O,
with retries and backoff, following cursors until the exchange says there is no next page.
"""
from __future__ import annotations

import random
import time

import requests

from app import logs
from app.exchanges import Discovery
from app.exchanges.common import retry_after

log = logs.get()


class DiscoveryError(RuntimeError):
    """retry_after: the seconds the exchange asked us to wait (a 429/418 Retry-After), if any:
    a caller that retries later must not come back sooner, or Binance bans the IP."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def fetch_json(session: requests.Session, url: str, params: dict, *, attempts: int = 5,
               timeout: float = 10.0, base_delay: float = 0.5) -> dict:
    last, delay = None, None
    for attempt in range(attempts):
        try:
            resp = session.get(url, params=params, timeout=timeout)
            if resp.status_code == 200:
                return resp.json()
            last = f"HTTP {resp.status_code}: {resp.text[:200]}"
            delay = retry_after(resp.headers)      # requests' headers ignore case
        except (requests.RequestException, ValueError) as e:
            last, delay = repr(e), None
        if attempt + 1 < attempts:
            time.sleep(delay if delay is not None else base_delay * 2 ** attempt * random.uniform(0.5, 1))
    raise DiscoveryError(f"{url}: {last}", retry_after=delay)


def discover(adapter, rest_url: str, session: requests.Session | None = None, **kw) -> Discovery:
    """Every page of the adapter's instrument listing, merged."""
    session = session or requests.Session()
    instruments, skipped, cursor = [], {}, None
    for _page in range(100):
        path, params = adapter.discovery_request(cursor)
        body = fetch_json(session, rest_url.rstrip("/") + path, params, **kw)
        try:
            page = adapter.parse_discovery(body)
        except (ValueError, KeyError, TypeError) as e:
            raise DiscoveryError(f"{rest_url}{path}: unexpected answer: {e}") from None
        instruments.extend(page.instruments)
        for reason, n in page.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
        cursor = page.next_cursor
        if not cursor:
            break
    return Discovery(instruments, skipped, None)
