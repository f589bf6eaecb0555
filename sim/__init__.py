"""Exchange simulator for QuantLab Collector: Binance USD-M, Bybit v5 linear, OKX v5 SWAP.

Why: the collector must be tested against the exchanges' real protocol quirks (silent ACKs,
per-arg ACKs, keepalive rules, sequence gaps, rate limits) and reconciled against exact
counts of what was sent.  `Simulator` runs WebSocket + REST servers for each exchange on
loopback in a background thread and exposes fault injection and counters to the test thread.

    sim = Simulator(exchanges=("binance", "bybit", "okx"), symbols=None, rate=20.0)
    sim.start(); sim.urls["okx"]["ws"] + "/ws/v5/public"; ...; sim.stats(); sim.stop()

Topics are named the way the collector names streams: Binance `btcusdt@bookTicker`, Bybit
`orderbook.1.BTCUSDT`, OKX `bbo-tbt:BTC-USDT-SWAP`.  Symbols are native: `BTCUSDT` (Binance,
Bybit; `BTCPERP` for Bybit USDC), `BTC-USDT-SWAP` (OKX).
"""
from __future__ import annotations

import asyncio
import time

from .binance import Binance
from .bybit import Bybit
from .core import LoopThread, start_exchange
from .okx import Okx
from .sources import universe

__all__ = ["Simulator"]

EXCHANGES = {"binance": Binance, "bybit": Bybit, "okx": Okx}


class Simulator:
    def __init__(self, exchanges=("binance", "bybit", "okx"), symbols=None, rate=20.0, seed=1,
                 binance_ping_interval=180.0, binance_pong_timeout=600.0,
                 binance_max_conn_age=86400.0, bybit_idle_timeout=600.0, okx_idle_timeout=30.0,
                 cadence_scale=1.0, replay=None, replay_rate=100.0, replay_loop=False,
                 host="127.0.0.1", port_base=None,
                 binance_max_streams=1024, binance_max_msgs_per_sec=10,
                 binance_weight_limit=2400, binance_ban_seconds=120.0,
                 bybit_max_args_chars=21000, bybit_ip_limit=600, bybit_endpoint_limit=50,
                 bybit_ban_seconds=600.0, okx_max_conn_per_sec=3, okx_max_sub_per_hour=480,
                 okx_rest_limit_factor=1.0, rest_history=500,
                 reject_topics=None, quiet_symbols=None, binance_error_form="wrapped",
                 binance_reject_close=False, okx_notice_seq_reset=False):
        """New options (all default to the previous behaviour except `binance_error_form`):

        reject_topics         {"bybit": ["publicTrade.BTCUSDT"], ...}: subscribes naming these
                              topics get the exchange's rejection (see `reject`); a dict
                              {topic: reason} per exchange sets the message text too.
        quiet_symbols         {"okx": ["ETH-USDT-SWAP"], ...}: quiet from the start (see `quiet`).
        binance_error_form    "wrapped" (live server: {"error":{"code","msg"},"id"}) or "flat"
                              (the docs' table: {"code","msg","id"}), for every Binance error reply.
        binance_reject_close  close a Binance socket after rejecting a SUBSCRIBE (1008).
        okx_notice_seq_reset  okx_notice's close also restarts every instId's seqId lower.
        """
        for e in exchanges:
            if e not in EXCHANGES:
                raise ValueError(f"unknown exchange {e!r}")
        for opt, val in (("reject_topics", reject_topics), ("quiet_symbols", quiet_symbols)):
            for e in (val or {}):
                if e not in EXCHANGES:
                    raise ValueError(f"{opt}: unknown exchange {e!r}")
        if binance_error_form not in ("wrapped", "flat"):
            raise ValueError(f"binance_error_form must be 'wrapped' or 'flat', not {binance_error_form!r}")
        self.exchanges = tuple(exchanges)
        self.cfg = dict(seed=seed, rate=rate, cadence_scale=cadence_scale,
                        binance_ping_interval=binance_ping_interval,
                        binance_pong_timeout=binance_pong_timeout,
                        binance_max_conn_age=binance_max_conn_age,
                        bybit_idle_timeout=bybit_idle_timeout, okx_idle_timeout=okx_idle_timeout,
                        binance_max_streams=binance_max_streams,
                        binance_max_msgs_per_sec=binance_max_msgs_per_sec,
                        binance_weight_limit=binance_weight_limit,
                        binance_ban_seconds=binance_ban_seconds,
                        bybit_max_args_chars=bybit_max_args_chars, bybit_ip_limit=bybit_ip_limit,
                        bybit_endpoint_limit=bybit_endpoint_limit,
                        bybit_ban_seconds=bybit_ban_seconds,
                        okx_max_conn_per_sec=okx_max_conn_per_sec,
                        okx_max_sub_per_hour=okx_max_sub_per_hour,
                        okx_rest_limit_factor=okx_rest_limit_factor, rest_history=rest_history,
                        reject_topics=dict(reject_topics or {}),
                        quiet_symbols=dict(quiet_symbols or {}),
                        binance_error_form=binance_error_form,
                        binance_reject_close=bool(binance_reject_close),
                        okx_notice_seq_reset=bool(okx_notice_seq_reset))
        self.symbols = symbols
        self.replay = replay or {}
        self.replay_rate = replay_rate
        self.replay_loop = replay_loop
        self.host = host
        self.port_base = port_base
        self.urls: dict = {}
        self._ex: dict = {}
        self._lt = None

    # ------------------------------------------------------------------ lifecycle
    def start(self):
        if self._lt is not None:
            raise RuntimeError("already started")
        uni = universe(self.symbols, self.cfg["seed"])
        self._lt = LoopThread()
        self._lt.start()

        async def _start():
            urls = {}
            for n, name in enumerate(self.exchanges):
                ex = EXCHANGES[name](self, self.cfg, uni)
                if name in self.replay:
                    files = self.replay[name]
                    ex.load_replay([files] if isinstance(files, str) else files,
                                   self.replay_rate, self.replay_loop)
                self._ex[name] = ex
                wp = rp = 0
                if self.port_base:
                    wp, rp = self.port_base + 2 * n, self.port_base + 2 * n + 1
                urls[name] = await start_exchange(ex, self.host, wp, rp)
            return urls
        try:
            self.urls = self._lt.call(_start, timeout=30)
        except BaseException:
            self.stop()                  # e.g. an unknown quiet symbol: no half-started loop
            raise
        return self

    def stop(self):
        if self._lt is None:
            return

        async def _stop():
            for ex in self._ex.values():
                for t in ex.tasks:
                    t.cancel()
                if ex.ws_server is not None:
                    ex.ws_server.close(close_connections=False)
                for c in list(ex.conns.values()):
                    c.transport.abort()
                if ex.rest_server is not None:
                    ex.rest_server.close()
            await asyncio.sleep(0.05)
        try:
            self._lt.call(_stop, timeout=10)
        finally:
            self._lt.stop()
            self._lt = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ inspection
    def _get(self, exchange):
        try:
            return self._ex[exchange]
        except KeyError:
            raise ValueError(f"exchange {exchange!r} not running") from None

    def stats(self) -> dict:
        """Thread-safe snapshot (C-level dict copies; never waits for the loop)."""
        out = {}
        for name, ex in self._ex.items():
            d = ex.c.snapshot()
            d["connections_open"] = len(ex.conns)
            rp = ex.replay
            if rp is not None:
                d["replay_remaining"] = max(0, len(rp["items"]) - rp["pos"])
            out[name] = d
        return out

    def connections(self, exchange):
        return self._lt.call(self._get(exchange).conn_info)

    # ------------------------------------------------------------------ faults
    def drop_connections(self, exchange):
        self._lt.call(self._get(exchange).drop_connections)

    def close_connections(self, exchange, code=1000, reason=""):
        self._lt.call(self._get(exchange).close_connections, code, reason)

    def half_open(self, exchange, seconds):
        return self._lt.call(self._get(exchange).half_open, seconds)

    def silence(self, exchange, topic, seconds=None):
        self._lt.call(self._get(exchange).silence, topic, seconds)

    def unsilence(self, exchange, topic):
        self._lt.call(self._get(exchange).unsilence, topic)

    def skip_ids(self, exchange, topic, n):
        ex = self._get(exchange)

        def _f():
            ex.skip[topic] = ex.skip.get(topic, 0) + int(n)
        self._lt.call(_f)

    def send_raw(self, exchange, payload, n=1):
        return self._lt.call(self._get(exchange).send_raw, payload, n)

    def okx_notice(self, delay=60.0, seq_reset=None):
        """OKX 64008 notice `{"event":"notice","code":"64008","msg":"The connection will soon be
        closed for a service upgrade. Please reconnect.","connId":…}` on every /ws/v5/public and
        /ws/v5/private socket, which are closed `delay` s later; returns how many got it.
        `seq_reset` (None: the `okx_notice_seq_reset` option) restarts every instId's seqId lower
        at that close, as after maintenance."""
        return self._lt.call(self._get("okx").notice, delay, seq_reset)

    def reject(self, exchange, topic, reason=None):
        """From now on a subscribe naming `topic` gets the exchange's real rejection:
        Bybit: the whole request fails `{"success":false,"ret_msg":"error:handler not found,
        topic:<topic>",…}`, nothing of it is subscribed.  OKX: that arg alone gets `{"id":…,
        "event":"error","code":"60018","msg":"Wrong URL or channel:<ch>,instId:<id> doesn't exist.
        …","connId":…}` (no `arg`), the other args are ACKed.  Binance: a JSON SUBSCRIBE naming it
        gets `{"error":{"code":2,"msg":"Invalid request: invalid stream"},"id":N}` and nothing of
        that request is subscribed; streams named in the URL are accepted and stay silent.
        `reason` replaces the message text (ret_msg / msg).  Existing subscriptions are kept."""
        self._lt.call(self._get(exchange).reject, topic, reason)

    def unreject(self, exchange, topic):
        self._lt.call(self._get(exchange).unreject, topic)

    def quiet(self, exchange, symbol, seconds=None):
        """`symbol` (native) has no trades and no book changes for `seconds` (None: until
        `unquiet`): no event-driven frames (Binance bookTicker/aggTrade/trade, Bybit publicTrade
        and orderbook.1 changes, OKX bbo-tbt changes/trades/trades-all/open-interest); periodic
        channels go on (Binance markPrice, Bybit tickers, OKX mark-price/funding-rate), and so do
        the documented resends of an unchanged book (Bybit orderbook.1 after 3 s, OKX bbo-tbt
        after 60 s, both x cadence_scale) and the initial snapshots on subscribe."""
        self._lt.call(self._get(exchange).quiet, symbol, seconds)

    def unquiet(self, exchange, symbol):
        self._lt.call(self._get(exchange).unquiet, symbol)

    def okx_seq_reset(self, symbol):
        """The next seqId of OKX `symbol` (bbo-tbt; trades share the counter) starts lower, as
        after maintenance; returns the new base (the next seqId is above it)."""
        return self._lt.call(self._get("okx").seq_reset, symbol)

    def bybit_ob_restart(self, symbol):
        """Push an orderbook.1 snapshot of Bybit `symbol` with u=1 now (as after a service
        restart); later changes go on u=2, 3, ….  Returns the sockets it went to (0 if the topic
        is silenced or the exchange paused: then the next change carries u=1)."""
        return self._lt.call(self._get("bybit").ob_restart, symbol)

    def rest_fail(self, exchange, status, n, body=None, headers=None):
        """The next `n` REST requests get `status` (with `body` and `headers`, e.g. Retry-After)."""
        self._lt.call(self._get(exchange).rest_fail, status, n, body, headers)

    def refuse_connections(self, exchange, seconds):
        """Refuse new WebSocket handshakes (HTTP 503) for `seconds`; 0 accepts again at once.
        Generation goes on: with drop_connections this is an outage of exactly that length."""
        self._lt.call(self._get(exchange).refuse_connections, float(seconds))

    def rest_log(self, exchange) -> list:
        """Every REST answer so far as (wall time, path, status), oldest first."""
        return self._lt.call(lambda: list(self._get(exchange).rest_log))

    def pause(self, exchange):
        ex = self._get(exchange)
        self._lt.call(setattr, ex, "paused", True)

    def resume(self, exchange):
        ex = self._get(exchange)
        self._lt.call(setattr, ex, "paused", False)

    def set_rate(self, rate):
        def _f():
            for ex in self._ex.values():
                ex.rate = float(rate)
        self._lt.call(_f)

    def wait_idle(self, seconds=0.1):
        """Helper for reconciliation: let in-flight frames drain."""
        time.sleep(seconds)
