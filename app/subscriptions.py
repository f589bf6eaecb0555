"""Subscription bookkeeping of one connection: every requested stream is pending, live or rejected.

Why a book: an exchange may refuse a topic (Bybit fails a whole request for one bad topic; OKX
answers `60018` per bad arg; Binance wraps errors as `{"error":{...},"id":N}`), or never answer.
A stream that was asked for and never delivers is a silent loss unless something remembers it
was asked for. The book does, and decides what to send next:

* a request that fails as a whole is split: each of its topics is sent again on its own, after a
  back-off, so one bad topic costs only itself; a topic that fails on its own is `rejected`, with
  the exchange's message;
* a request that gets no answer within `ack_timeout` is sent again (up to `retries` times, the
  back-off doubling); after that its topics are `rejected` as unacknowledged;
* a topic becomes `live` when the exchange acknowledges it or when its data arrives (an exchange
  may send data before the ACK, and a connection that named its streams in the URL gets none).

Sans-I/O: no sockets, threads or clocks of its own. The connection's subscriber thread asks
`take_due(now)` for the messages to send; the writer's control path reports ACKs and errors; the
watchdog reports data seen and lets time pass. Log-worthy outcomes (a finished round, each
rejection) are queued as events for the caller to log, one line each.
"""
from __future__ import annotations

import threading
from typing import Callable

from app.exchanges import Stream

PENDING, LIVE, REJECTED = "pending", "live", "rejected"
RETRY_BACKOFF_S = 1.0          # first wait before a split or timed-out request is sent again
RETRY_BACKOFF_MAX_S = 30.0


class SubscriptionBook:
    def __init__(self, adapter, streams: list[Stream], *, now: float, ack_timeout: float,
                 retries: int, next_request_id: Callable[[int], int]):
        self.adapter = adapter
        self.ack_timeout = ack_timeout
        self.retries = retries
        self._next_request_id = next_request_id
        self._lock = threading.Lock()
        self.streams: dict[str, Stream] = {s.key: s for s in streams}
        self.status: dict[str, str] = dict.fromkeys(self.streams, PENDING)
        self.reason: dict[str, str] = {}
        self.live_at: dict[str, float] = {}           # key -> when it became live (silence check)
        self._attempts: dict[str, int] = dict.fromkeys(self.streams, 0)
        self._alone: set[str] = set()                 # keys whose latest request held them alone
        self._due: list[tuple[float, tuple[str, ...]]] = [(now, tuple(self.streams))]
        self._requests: dict[str, tuple[float, tuple[str, ...]]] = {}   # request id -> (sent, keys)
        self._round_started = now
        self.round_requests = 0
        self._round_open = True
        self.events: list[tuple[str, dict]] = []

    # ---- what to send ---------------------------------------------------------------------------
    def take_due(self, now: float) -> list[tuple[str, object, tuple[str, ...]]]:
        """Messages to send now: [(text, request id, keys)]; also times out unanswered requests."""
        with self._lock:
            self._expire(now)
            due = [d for d in self._due if d[0] <= now]
            if not due:
                return []
            self._due = [d for d in self._due if d[0] > now]
            out = []
            for _at, keys in due:
                keys = tuple(k for k in keys if self.status.get(k) == PENDING)
                if not keys:
                    continue
                streams = [self.streams[k] for k in keys]
                first = self._next_request_id(len(streams))
                for text, rid, part in self.adapter.subscribe_messages(streams, first):
                    self._requests[str(rid)] = (now, part)
                    for k in part:
                        self._attempts[k] += 1
                        if len(part) == 1:
                            self._alone.add(k)
                        else:
                            self._alone.discard(k)
                    out.append((text, rid, part))
            self.round_requests += len(out)
            return out

    def next_due(self) -> float | None:
        """When take_due next has something to do (a queued send or a request's timeout)."""
        with self._lock:
            times = [d[0] for d in self._due]
            times += [sent + self.ack_timeout for sent, _k in self._requests.values()]
        return min(times) if times else None

    def _expire(self, now: float) -> None:
        for rid, (sent, keys) in list(self._requests.items()):
            if now - sent < self.ack_timeout:
                continue
            del self._requests[rid]
            waiting = tuple(k for k in keys if self.status.get(k) == PENDING)
            retry = []
            for k in waiting:
                if self._attempts[k] > self.retries:
                    self._reject(k, f"no acknowledgement within {self.ack_timeout:g} s "
                                    f"({self._attempts[k]} attempts)")
                else:
                    retry.append(k)
            if retry:
                self._due.append((now + self._backoff(retry[0]), tuple(retry)))
        self._check_round(now)

    def _backoff(self, key: str) -> float:
        return min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_S * 2 ** max(0, self._attempts[key] - 1))

    # ---- what the exchange said -----------------------------------------------------------------
    def on_ack(self, request_id, keys: tuple[str, ...], now: float) -> None:
        """An ACK naming its keys (OKX, per arg) or only its request (Bybit, Binance)."""
        with self._lock:
            rid = str(request_id)
            if not keys:
                keys = self._requests.pop(rid, (0, ()))[1]
            for k in keys:
                self._live(k, now)
            if rid in self._requests and not any(self.status.get(k) == PENDING
                                                 for k in self._requests[rid][1]):
                del self._requests[rid]
            self._check_round(now)

    def on_error(self, request_id, keys: tuple[str, ...], detail: str, now: float) -> bool:
        """An error naming its keys (OKX, per arg) or only its request (Bybit and Binance fail a
        whole request). -> False if it concerns none of ours."""
        with self._lock:
            rid = str(request_id)
            req = self._requests.get(rid)
            named = keys or (req[1] if req is not None else ())
            affected = [k for k in named if self.status.get(k) == PENDING]
            # the request stays open (its timeout pending) while others of its keys await an answer
            if req is not None and not any(self.status.get(k) == PENDING and k not in affected for k in req[1]):
                del self._requests[rid]
            if not affected:
                return req is not None
            retry = []
            for k in affected:
                if k in self._alone:
                    self._reject(k, detail)
                else:
                    retry.append(k)
            for k in retry:       # one request each: a bad topic can only fail itself now
                self._due.append((now + RETRY_BACKOFF_S, (k,)))
            if retry:
                self.events.append(("subscription_split", {"streams": len(retry), "detail": detail}))
            self._check_round(now)
            return True

    def on_data(self, seen: dict[str, int], since_ns: int, now: float) -> None:
        """Streams whose data arrived after `since_ns` (the writer's last_seen map) are live."""
        with self._lock:
            for k, st in self.status.items():
                if st != LIVE and seen.get(k, 0) >= since_ns:
                    if st == REJECTED:
                        self.events.append(("subscription_recovered", {"stream": k}))
                        self.reason.pop(k, None)
                    self._live(k, now)
            self._check_round(now)

    def all_live(self, now: float) -> None:
        """The connection URL named every stream: the handshake is the acknowledgement."""
        with self._lock:
            for k in self.status:
                self._live(k, now)
            self._check_round(now)

    def remove(self, keys) -> None:
        """Streams no longer wanted (delisted)."""
        with self._lock:
            for k in keys:
                for table in (self.streams, self.status, self.reason, self.live_at, self._attempts):
                    table.pop(k, None)
                self._alone.discard(k)

    # ---- read model -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self._lock:
            values = list(self.status.values())
        return {"requested": len(values), LIVE: values.count(LIVE), PENDING: values.count(PENDING),
                REJECTED: values.count(REJECTED)}

    def snapshot(self) -> dict[str, tuple[str, str]]:
        """stream key -> (status, reason)."""
        with self._lock:
            return {k: (st, self.reason.get(k, "")) for k, st in self.status.items()}

    def take_events(self) -> list[tuple[str, dict]]:
        with self._lock:
            out, self.events = self.events, []
        return out

    # ---- internals ----------------------------------------------------------------------------------
    def _live(self, key: str, now: float) -> None:
        if key in self.status and self.status[key] != LIVE:
            self.status[key] = LIVE
            self.live_at[key] = now

    def _reject(self, key: str, reason: str) -> None:
        self.status[key] = REJECTED
        self.reason[key] = reason
        self.events.append(("subscription_rejected", {"stream": key, "reason": reason,
                                                      "attempts": self._attempts.get(key, 0)}))

    def _check_round(self, now: float) -> None:
        """Once nothing is pending, summarise the round (one event), until a new round starts."""
        if not self._round_open or PENDING in self.status.values():
            return
        self._round_open = False
        values = list(self.status.values())
        self.events.append(("subscribed", {
            "requested": len(values), "live": values.count(LIVE), "rejected": values.count(REJECTED),
            "requests": self.round_requests, "seconds": round(now - self._round_started, 3)}))
