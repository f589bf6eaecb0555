"""Post-reconnect alignment over REST: reference points in RAM, never data (CONTRACT §1).

After a connection comes back, the gap detector (app/gaps.py) hands the symbols whose trade
streams were interrupted to this exchange's AlignmentWorker. The worker waits until the new
connection has acknowledged those streams, measures the server clock, and asks for the latest
trade of each symbol (the adapter says how: `alignment_request`, `parse_recent_trades`). The
answers go back to the detector, which compares them with the last WebSocket trade before the
disconnect and the first one after (`measure` below) and reports the missed trades once
(`gap_detected` kind `disconnect`, `alignment_done`). Nothing fetched here is ever written.

Rate limits: every request first takes its weight from a per-exchange TokenBucket
(`rest_budget_per_min` in the exchange's own units: Binance request weight, one per request
elsewhere; the bucket holds at most 15 s of budget, so any 60 s see at most 1.25 x the budget).
A rate-limit answer (the adapter's `rest_throttle`: 429/418 and Retry-After, Bybit 403/10006,
OKX 50011) stops every request to that exchange for the time it names. A symbol that cannot get
its turn within `alignment_max_wait` seconds is skipped and counted (`alignments_skipped`):
a reconnect of hundreds of symbols costs a bounded number of calls and never a ban.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import requests

from app import logs

log = logs.get()

BURST_S = 15.0           # the bucket holds this many seconds of budget
BATCH_WINDOW_S = 0.5     # reconnects this close together are aligned as one batch


class TokenBucket:
    """`per_min` units per minute, bursts of at most BURST_S seconds' worth (and at least one
    request of `min_capacity`, so a weight-20 call always fits). Clock injectable for tests."""

    def __init__(self, per_min: float, *, burst_s: float = BURST_S, min_capacity: float = 1.0,
                 clock=time.monotonic):
        self.rate = per_min / 60.0
        self.capacity = max(self.rate * burst_s, min_capacity)
        self.clock = clock
        self.tokens = self.capacity
        self.t = clock()
        self._lock = threading.Lock()

    def _refill(self, now: float) -> None:
        if now > self.t:
            self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
            self.t = now

    def wait_time(self, n: float) -> float:
        """Seconds until `n` units are available (0: now); inf if `n` can never fit."""
        if n > self.capacity:
            return float("inf")
        with self._lock:
            self._refill(self.clock())
            return 0.0 if self.tokens >= n else (n - self.tokens) / self.rate

    def try_take(self, n: float) -> bool:
        with self._lock:
            self._refill(self.clock())
            if self.tokens >= n:
                self.tokens -= n
                return True
            return False


class OverBudget(Exception):
    """The request could not be made before its deadline (budget or back-off)."""


class RestError(Exception):
    pass


class RestClient:
    """requests on one exchange's REST base URL, paced by a TokenBucket and honouring back-offs.

    `get` returns (JSON body, t_sent_ns, t_received_ns); it retries after a rate-limit answer
    once the back-off is over, as long as the deadline allows. `sleep(seconds)` returns True if
    the caller is stopping (a threading.Event's wait)."""

    def __init__(self, exchange: str, adapter, base_url: str, bucket: TokenBucket, state=None,
                 *, session: requests.Session | None = None, timeout: float = 5.0,
                 clock=time.monotonic, wall=time.time, sleep=None):
        self.exchange = exchange
        self.adapter = adapter
        self.base_url = base_url.rstrip("/")
        self.bucket = bucket
        self.state = state
        self.session = session or requests.Session()
        self.timeout = timeout
        self.clock = clock
        self.wall = wall
        self.sleep = sleep or (lambda s: time.sleep(s) or False)
        self.blocked_until = 0.0        # monotonic: no request before this (back-off)
        self.requests = 0
        self.weight_used = 0

    def _wait_turn(self, weight: float, deadline: float) -> None:
        while True:
            now = self.clock()
            wait = max(self.blocked_until - now, 0.0)
            if wait <= 0:
                if self.bucket.try_take(weight):
                    return
                wait = self.bucket.wait_time(weight)
            if now + wait > deadline:
                raise OverBudget(f"needs {wait:.1f}s more")
            if self.sleep(min(wait, 0.5) if wait > 0 else 0.01):
                raise OverBudget("stopping")

    def get(self, path: str, params: dict, weight: float, deadline: float):
        while True:
            self._wait_turn(weight, deadline)
            t0 = time.time_ns()
            try:
                resp = self.session.get(self.base_url + path, params=params, timeout=self.timeout)
            except requests.RequestException as e:
                raise RestError(repr(e)) from None
            t1 = time.time_ns()
            self.requests += 1
            self.weight_used += weight
            try:
                body = resp.json()
            except ValueError:
                body = None
            headers = {k.lower(): v for k, v in resp.headers.items()}
            pause = self.adapter.rest_throttle(resp.status_code, headers, body, self.wall())
            if pause is not None:
                self.blocked_until = max(self.blocked_until, self.clock() + pause)
                if self.state is not None:
                    self.state.count("rest_throttled", self.exchange)
                log.warning("rest_backoff", extra={"exchange": self.exchange, "path": path,
                                                   "status": resp.status_code, "backoff_s": round(pause, 3),
                                                   "until": round(self.wall() + pause, 3),
                                                   "retry_after": headers.get("retry-after")})
                continue
            if resp.status_code != 200:
                raise RestError(f"HTTP {resp.status_code}: {resp.text[:200]}")
            return body, t0, t1


def measure(exact_ids: bool, last_ws: str | None, first_ws: str | None,
            rest_trades: list[tuple[str, int]] | None) -> dict:
    """Trades missed between the last WebSocket trade before a disconnect and the first after.

    exact_ids: the exchange's trade ids are consecutive integers (GAP_RULES has `trades`), so the
    count is arithmetic: with the first WS id after, `first - last - 1` (exact, no REST needed);
    without it, REST's latest id - last. Otherwise (UUIDs) the REST list is searched for both ids
    and the trades between them counted; if the last WS id is older than the list, the count is a
    lower bound. Returns {"missed", "method", "exact", "rest_latest_id", "rest_missed"}."""
    out = {"missed": None, "method": None, "exact": False, "rest_latest_id": None, "rest_missed": None}
    if rest_trades:
        out["rest_latest_id"] = rest_trades[-1][0]
    if exact_ids:
        last = int(last_ws) if last_ws is not None else None
        first = int(first_ws) if first_ws is not None else None
        latest = int(rest_trades[-1][0]) if rest_trades else None
        if last is not None and latest is not None:
            upto = latest if first is None else min(latest, first - 1)
            out["rest_missed"] = max(0, upto - last)
        if last is not None and first is not None:
            out.update(missed=max(0, first - last - 1), method="ws_ids", exact=True)
        elif last is not None and latest is not None:
            out.update(missed=max(0, latest - last), method="rest_ids", exact=True)
        return out
    if rest_trades is None or last_ws is None:
        return out
    ids = [t[0] for t in rest_trades]
    pos = {tid: i for i, tid in enumerate(ids)}
    i_last = pos.get(last_ws)
    i_first = pos.get(first_ws) if first_ws is not None else None
    end = i_first if i_first is not None else len(ids)
    if i_last is not None:
        n = max(0, end - i_last - 1)
        out.update(missed=n, rest_missed=n, method="rest_list", exact=True)
    else:        # more trades since than the list holds: at least everything before `end`
        out.update(missed=end, rest_missed=end, method="rest_list_lower_bound", exact=False)
    return out


@dataclass
class AlignJob:
    outage_id: int
    conn: object                     # feed.Connection (its `subscribed` and `connected`)
    symbols: list[tuple[str, str]]   # (symbol, stream key)
    created: float = field(default_factory=time.monotonic)


class AlignmentWorker(threading.Thread):
    """One per exchange: REST reference points for interrupted trade streams, and the clock.

    `post(kind, outage_id, symbol, result)` hands results back to the gap detector thread:
    result = {"status": "ok", "trades": [(id, ts_ms)], "at_ns"} | {"status": "skipped"|"failed",
    "reason"}."""

    def __init__(self, exchange: str, adapter, base_url: str, settings, state, post, *,
                 session: requests.Session | None = None):
        super().__init__(name=f"align-{exchange}", daemon=True)
        self.exchange = exchange
        self.adapter = adapter
        self.settings = settings
        self.state = state
        self.post = post
        self.jobs: queue.Queue = queue.Queue()
        self._stop_event = threading.Event()
        weights = [adapter.alignment_request("X")[2], adapter.time_request()[2]]
        self.bucket = TokenBucket(settings.rest_budget_per_min, min_capacity=max(weights))
        self.client = RestClient(exchange, adapter, base_url, self.bucket, state, session=session,
                                 sleep=self._stop_event.wait)
        self.next_clock_check = 0.0

    def submit(self, job: AlignJob) -> None:
        self.jobs.put(job)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        self.jobs.put(None)
        self.join(timeout)

    def run(self) -> None:
        while not self._stop_event.is_set():
            if time.monotonic() >= self.next_clock_check:
                self.next_clock_check = time.monotonic() + self.settings.clock_check_interval
                self.check_clock(time.monotonic() + self.settings.alignment_max_wait)
            try:
                job = self.jobs.get(timeout=1.0)
            except queue.Empty:
                continue
            batch = [job]
            if job is not None:               # connections that come back together: one batch
                self._stop_event.wait(BATCH_WINDOW_S)
            while job is not None:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                batch.append(job)
            stopping = None in batch
            try:
                self.align([j for j in batch if j is not None])
            except Exception as e:  # noqa: BLE001 - the worker must survive anything
                log.error("alignment_error", extra={"exchange": self.exchange, "error": repr(e)})
            if stopping:
                break

    def check_clock(self, deadline: float) -> dict | None:
        """Server time minus our wall clock at the request's midpoint (ms), with the round trip."""
        path, params, weight = self.adapter.time_request()
        try:
            body, t0, t1 = self.client.get(path, params, weight, deadline)
            server = self.adapter.parse_server_time(body)
        except (OverBudget, RestError, ValueError, KeyError, TypeError, IndexError) as e:
            log.info("clock_check_failed", extra={"exchange": self.exchange, "error": str(e)[:200]})
            return None
        offset = {"offset_ms": round((server - (t0 + t1) / 2) / 1e6, 3),
                  "rtt_ms": round((t1 - t0) / 1e6, 3), "measured_at": round(t1 / 1e9, 3)}
        self.state.clock_offset[self.exchange] = offset
        level = 30 if abs(offset["offset_ms"]) > 1000 + offset["rtt_ms"] else 20
        log.log(level, "clock_offset", extra={"exchange": self.exchange, **offset})
        return offset

    def _wait_subscribed(self, jobs: list[AlignJob]) -> None:
        """REST after the ACKs: a trade after that moment reaches us on the WebSocket."""
        deadline = time.monotonic() + max(2.0, self.settings.alignment_max_wait)
        waiting = list(jobs)
        while waiting and time.monotonic() < deadline and not self._stop_event.is_set():
            still = []
            for job in waiting:
                conn = job.conn
                subscribed = getattr(conn, "subscribed", None)
                if subscribed is None or not getattr(conn, "connected", True):
                    continue
                if not all(k in subscribed for _s, k in job.symbols):
                    still.append(job)
            waiting = still
            if waiting:
                self._stop_event.wait(0.05)

    def align(self, jobs: list[AlignJob]) -> None:
        """One batch (connections that came back together) shares one deadline: whatever does
        not get its turn within alignment_max_wait is skipped, however many symbols there are."""
        if not jobs:
            return
        self._wait_subscribed(jobs)
        deadline = time.monotonic() + self.settings.alignment_max_wait
        self.next_clock_check = time.monotonic() + self.settings.clock_check_interval
        self.check_clock(deadline)
        pending = [(job.outage_id, sym) for job in jobs for sym, _key in job.symbols]
        while pending:
            outage_id, symbol = pending[0]
            path, params, weight = self.adapter.alignment_request(symbol)
            try:
                body, _t0, t1 = self.client.get(path, params, weight, deadline)
                trades = self.adapter.parse_recent_trades(body)
            except OverBudget as e:
                self.state.count("alignments_skipped", self.exchange, len(pending))
                log.info("alignment_skipped", extra={"exchange": self.exchange, "symbols": len(pending),
                                                     "reason": f"over budget: {e}"})
                for oid, sym in pending:
                    self.post("aligned", oid, sym, {"status": "skipped", "reason": "budget"})
                return
            except (RestError, ValueError, KeyError, TypeError) as e:
                self.state.count("alignments_failed", self.exchange)
                self.post("aligned", outage_id, symbol, {"status": "failed", "reason": str(e)[:200]})
                pending.pop(0)
                continue
            self.post("aligned", outage_id, symbol, {"status": "ok", "trades": trades, "at_ns": t1})
            pending.pop(0)
