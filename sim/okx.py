"""OKX v5 SWAP simulator (`BTC-USDT-SWAP`, `BTC-USDC-SWAP`).

Production endpoints this stands in for: `wss://ws.okx.com/ws/v5/{public,business,private}`
(port 443; the docs have long listed `:8443`, which many networks filter; see okx.md §2).

Why the rules below (see /work/shared/exchanges/okx.md, "Simulator checklist"):

* Paths `/ws/v5/public`, `/ws/v5/business`, `/ws/v5/private` (else HTTP 404).  More than
  `okx_max_conn_per_sec` (default 3) new connections in one second are refused with HTTP 429 on
  the handshake (the documented limit; refusing at the handshake is what a client can observe
  cheapest and needs no close-code guess).
* `subscribe`/`unsubscribe` answer one event per arg; a bad arg gives an `error` event (60018
  unknown instId/channel, 64001 business channel on /public, 64002 public channel on /business)
  while the other args of the request still succeed and the socket stays open.  Bad JSON 60012,
  bad op 60019, > 480 (un)subscribe requests per hour on a socket 60014.
* Rejected topics (`Simulator.reject`, topic `<channel>:<instId>`) are answered like an unknown
  instId: one `error` event 60018 (no `arg` key) for that arg, the other args still succeed.
* Text `ping` -> text `pong`.  Close 4004 when nothing was pushed and nothing received for
  `okx_idle_timeout` s, and also when no subscription was made within that time.
* All numbers are strings except `seqId`; sizes are contracts (`ctVal` from instruments).
  `bbo-tbt` resent with the same `seqId` after 60 s (x `cadence_scale`) unchanged; `trades` aggregate 1..3 fills per
  taker order with `tradeId` = last id and `count` so `tradeId - count == previous tradeId`;
  `trades-all` (/business) one fill per message with consecutive ids.  mark-price each mark
  period (it changes every period, so the 10 s heartbeat never triggers), funding-rate every
  30-90 s, open-interest every 3 s (x `cadence_scale`).  Initial push on subscribe for bbo-tbt,
  mark-price, funding-rate and open-interest.
* Quiet symbols: no bbo-tbt changes (initial push and 60 s resends only), no trades, no
  open-interest pushes (OI does not change without trades); mark-price, funding-rate go on.
* `seqId` restarts lower (one counter per instId feeds bbo-tbt and trades) on
  `Simulator.okx_seq_reset(instId)`, and for every instId when a notice-triggered close happens
  with `okx_notice_seq_reset` (okx.md: "may be reset due to maintenance").
* Rows: each `data[]` item -> one row of the channel's dataset.
* REST: instruments (USDT + USDC linear, `-USD_UM-SWAP` rows with settleCcy "USD", inverse
  `-USD-SWAP` rows), market/trades (per fill, newest first), time, open-interest, funding-rate,
  mark-price; 51001 for a bad instId; per-endpoint limits per 2 s -> HTTP 429 code 50011.
"""
from __future__ import annotations

import collections
import time

import ujson

from .core import ExchangeBase, dumps
from .sources import Inst, next_funding

PUBLIC = {"bbo-tbt", "trades", "mark-price", "funding-rate", "open-interest", "tickers", "books",
          "books5", "index-tickers", "price-limit", "books-l2-tbt", "books50-l2-tbt"}
BUSINESS = {"trades-all", "mark-price-candle1m", "candle1m", "candle1s", "candle5m", "candle1H"}
GENERATED = {"bbo-tbt", "trades", "trades-all", "mark-price", "funding-rate", "open-interest"}
DATASET = {"bbo-tbt": "bbo", "trades": "trades", "trades-all": "trades", "mark-price": "mark_price",
           "funding-rate": "funding", "open-interest": "open_interest"}
REST_LIMITS = {"/api/v5/public/instruments": 20, "/api/v5/market/trades": 100,
               "/api/v5/public/time": 10, "/api/v5/public/open-interest": 20,
               "/api/v5/public/funding-rate": 10, "/api/v5/public/mark-price": 10}
BBO = ('{"arg":{"channel":"bbo-tbt","instId":"%s"},"data":[{"asks":[["%s","%d","0","%d"]],'
       '"bids":[["%s","%d","0","%d"]],"ts":"%d","seqId":%d}]}')
TRD = ('{"arg":{"channel":"trades","instId":"%s"},"data":[{"instId":"%s","tradeId":"%d","px":"%s",'
       '"sz":"%d","side":"%s","ts":"%d","count":"%d","source":"0","seqId":%d}]}')
TRA = ('{"arg":{"channel":"trades-all","instId":"%s"},"data":[{"instId":"%s","tradeId":"%d","px":"%s",'
       '"sz":"%d","side":"%s","source":"0","ts":"%d"}]}')
MARK = ('{"arg":{"channel":"mark-price","instId":"%s"},"data":[{"instId":"%s","instType":"SWAP",'
        '"markPx":"%s","ts":"%d"}]}')
OI = ('{"arg":{"channel":"open-interest","instId":"%s"},"data":[{"instId":"%s","instType":"SWAP",'
      '"oi":"%s","oiCcy":"%s","oiUsd":"%.2f","ts":"%d"}]}')
MSG_64001 = ("This channel has been migrated to the '/business' URL. Please subscribe using the new "
             "URL. More details can refer to: https://www.okx.com/help-center/changes-to-v5-api-"
             "websocket-subscription-parameter-and-url")
MSG_64002 = "This channel is not supported by business URL. Please use \"/public\" URL."


def ct_val(base, quote, price):
    if quote == "USDC":
        return {"BTC": 0.0001, "ETH": 0.001}.get(base) or 10.0 ** round(__import__("math").log10(10 / price))
    special = {"BTC": 0.01, "ETH": 0.1}
    if base in special:
        return special[base]
    return 10.0 ** round(__import__("math").log10(100 / price))


def fmt_num(v: float) -> str:
    s = ("%.10f" % v).rstrip("0").rstrip(".")
    return s or "0"


class Okx(ExchangeBase):
    name = "okx"

    # ------------------------------------------------------------ instruments
    def build_instruments(self):
        insts = []
        self.by_id = {}
        rng = self.rng
        for base, quote, price in self.universe:
            iid = f"{base}-{quote}-SWAP"
            i = Inst(base, quote, price, iid, rng)
            cv = ct_val(base, quote, price)
            i.ex.update(ct=cv, seq=rng.randint(10**9, 10**11), tid=rng.randint(10**8, 10**9),
                        bbo_last=0.0, fr_next=0.0, sett=0.0,
                        bbo_n=(rng.randint(1, 30), rng.randint(1, 30)),
                        t_bbo="bbo-tbt:" + iid, t_tr="trades:" + iid, t_ta="trades-all:" + iid,
                        t_mk="mark-price:" + iid, t_fr="funding-rate:" + iid, t_oi="open-interest:" + iid,
                        hist=collections.deque(maxlen=self.cfg["rest_history"]))
            self.by_id[iid] = i
            insts.append(i)
        self.extra = []                          # REST-only rows: ACKed, never streamed
        for b in [x.base for x in insts if x.quote == "USDT"][:2]:
            self.extra.append((f"{b}-USD_UM-SWAP", b, "USD", "linear"))
            self.extra.append((f"{b}-USD-SWAP", b, b, "inverse"))
        self.known = set(self.by_id) | {e[0] for e in self.extra}
        self.mark_bucket = self.oi_bucket = self.sec_bucket = self.rs_bucket = None
        self.conn_times = collections.deque()
        self.ep_window = {}
        return insts

    def contracts(self, inst, lots):
        return max(1, int(round(lots * inst.lot / inst.ex["ct"])))

    # -------------------------------------------------------------- websocket
    def parse_path(self, path):
        p = path.rstrip("/")
        return {"/ws/v5/public": "public", "/ws/v5/business": "business",
                "/ws/v5/private": "private"}.get(p)

    def admit(self, conn):
        lim = self.cfg["okx_max_conn_per_sec"]
        if not lim:
            return None
        m = time.monotonic()
        w = self.conn_times
        while w and w[0] < m - 1.0:
            w.popleft()
        if len(w) >= lim:
            return conn.respond(429, "Too Many Requests\n")
        w.append(m)
        return None

    def on_open(self, conn):
        conn.st["connId"] = "%08x" % self.rng.getrandbits(32)
        conn.st["subscribed"] = False
        conn.st["req_times"] = collections.deque()

    def _event(self, conn, d):
        d["connId"] = conn.st["connId"]
        self.control(conn, dumps(d))

    def _error(self, conn, rid, code, msg):
        d = {}
        if rid is not None:
            d["id"] = rid
        d.update(event="error", code=code, msg=msg)
        self._event(conn, d)

    def on_text(self, conn, msg):
        if isinstance(msg, bytes):
            msg = msg.decode("utf-8", "replace")
        if msg == "ping":
            conn.client_pings += 1
            conn.last_client_ping = time.monotonic()
            self.control(conn, "pong")
            return
        try:
            req = ujson.loads(msg)
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            self._error(conn, None, "60012", "Invalid request: " + msg[:500])
            return
        rid = req.get("id")
        op = req.get("op")
        if op is None:
            self._error(conn, rid, "60012", "Invalid request: " + msg[:500])
            return
        if op not in ("subscribe", "unsubscribe"):
            self._error(conn, rid, "60019", "Invalid op: op :%s" % op)
            return
        args = req.get("args")
        if not isinstance(args, list) or not args or not all(isinstance(a, dict) for a in args):
            self._error(conn, rid, "60012", "Invalid request: " + msg[:500])
            return
        rt = conn.st["req_times"]
        m = time.monotonic()
        while rt and rt[0] < m - 3600:
            rt.popleft()
        if len(rt) >= self.cfg["okx_max_sub_per_hour"]:
            self._error(conn, rid, "60014", "Requests too frequent.")
            return
        rt.append(m)
        kind = conn.st["kind"]
        for a in args:
            ch, iid = a.get("channel"), a.get("instId")
            if not isinstance(ch, str) or not isinstance(iid, str):
                self._error(conn, rid, "60013", "Invalid args")
                continue
            topic = f"{ch}:{iid}"
            if op == "unsubscribe":
                if conn.subs.pop(topic, None) is not None:
                    self.undeliver(conn, topic)
                self._ack(conn, rid, "unsubscribe", ch, iid)
                continue
            if topic in self.rejected:                 # same answer as an unknown instId
                self._error(conn, rid, "60018", self.rejected[topic] or self._msg_60018(ch, iid))
                continue
            is_biz = ch in BUSINESS or ch.startswith(("candle", "mark-price-candle", "index-candle"))
            if kind == "public" and is_biz:
                self._error(conn, rid, "64001", MSG_64001)
                continue
            if kind == "business" and ch in PUBLIC:
                self._error(conn, rid, "64002", MSG_64002)
                continue
            if kind == "private" or iid not in self.known or not (ch in PUBLIC or is_biz):
                self._error(conn, rid, "60018", self._msg_60018(ch, iid))
                continue
            self._ack(conn, rid, "subscribe", ch, iid)
            conn.st["subscribed"] = True
            gen = ch in GENERATED and iid in self.by_id
            conn.subs[topic] = gen
            if gen:
                self.deliver(conn, topic)
                if self.replay is None and not self.paused:
                    self._initial(conn, ch, topic, self.by_id[iid])

    @staticmethod
    def _msg_60018(ch, iid):
        return ("Wrong URL or channel:%s,instId:%s doesn't exist. Please use the correct URL, "
                "channel and parameters referring to API document." % (ch, iid))

    def lookup(self, symbol):
        return self.by_id.get(symbol)

    def quiet_start(self, inst):
        if not inst.ex["bbo_last"]:                  # never changed yet: resend timer starts now
            inst.ex["bbo_last"] = time.monotonic()

    def _lower_seq(self, v):
        """A seqId clearly below `v` (a restart after maintenance), keeping room to grow."""
        return self.rng.randint(v // 10000, v // 1000) if v >= 10000 else 0

    def seq_reset(self, symbol):
        """The next seqId of `symbol` (bbo-tbt, trades) starts lower; returns the new base."""
        inst = self.lookup(symbol)
        if inst is None:
            raise ValueError(f"okx: unknown instId {symbol!r}")
        x = inst.ex
        x["seq"] = self._lower_seq(x["seq"])
        return x["seq"]

    def _ack(self, conn, rid, ev, ch, iid):
        d = {}
        if rid is not None:
            d["id"] = rid
        d.update(event=ev, arg={"channel": ch, "instId": iid})
        self._event(conn, d)

    def _initial(self, conn, ch, topic, inst):
        now_ms = int(time.time() * 1000)
        so = inst.silent_other
        if ch == "bbo-tbt" and not inst.silent_bbo:
            self.send_to(conn, topic, self._bbo(inst, now_ms), (("bbo", 1),))
        elif ch == "mark-price" and "mark" not in so:
            self.send_to(conn, topic, MARK % (inst.sym, inst.sym, inst.fpx(inst.mark), now_ms),
                         (("mark_price", 1),))
        elif ch == "funding-rate" and "funding" not in so:
            self.send_to(conn, topic, self._funding(inst, now_ms), (("funding", 1),))
        elif ch == "open-interest" and "oi" not in so:
            self.send_to(conn, topic, self._oi(inst, now_ms), (("open_interest", 1),))

    def keepalive(self, conn, mono):
        t = self.cfg["okx_idle_timeout"]
        if not conn.st["subscribed"] and mono - conn.opened_mono >= t:
            self.close_conn(conn, 4004, "No data received in 30s.", "closed_idle")
        elif mono - max(conn.last_push, conn.last_client_msg) >= t:
            self.close_conn(conn, 4004, "No data received in 30s.", "closed_idle")

    # ------------------------------------------------------------- generation
    def _bbo(self, inst, now_ms):
        x = inst.ex
        na, nb = x["bbo_n"]                       # order counts: part of the book, kept on resend
        return BBO % (inst.sym, inst.px(inst.bid + inst.spread), self.contracts(inst, inst.asz),
                      na, inst.px(inst.bid), self.contracts(inst, inst.bsz),
                      nb, now_ms - self.rng.randint(0, 3), x["seq"])

    def _funding(self, inst, now_ms):
        ft = next_funding(now_ms, 8)
        x = inst.ex
        return dumps({"arg": {"channel": "funding-rate", "instId": inst.sym}, "data": [{
            "formulaType": "withRate", "fundingRate": "%.16f" % inst.fr, "fundingTime": str(ft),
            "impactValue": "", "instId": inst.sym, "instType": "SWAP", "interestRate": "0.0001",
            "method": "current_period", "maxFundingRate": "0.0075", "minFundingRate": "-0.0075",
            "nextFundingRate": "", "nextFundingTime": str(ft + 8 * 3600_000),
            "premium": "%.16f" % (inst.fr - 0.0001), "settFundingRate": "%.16f" % x.get("sett", 0.0),
            "settState": "settled", "ts": str(now_ms)}]})

    def _oi(self, inst, now_ms):
        base = inst.oi
        return OI % (inst.sym, inst.sym, fmt_num(round(base / inst.ex["ct"], 2)),
                     fmt_num(round(base, 6)), base * inst.mark, now_ms)

    def ev_bbo(self, inst, now_ms):
        inst.move()
        x = inst.ex
        x["bbo_n"] = (self.rng.randint(1, 30), self.rng.randint(1, 30))
        x["seq"] += self.rng.randint(1, 50)
        x["bbo_last"] = self.mono
        t = x["t_bbo"]
        if t in self.index:
            self.publish(t, self._bbo(inst, now_ms), (("bbo", 1),))

    def ev_trade(self, inst, now_ms):
        rng = self.rng
        x = inst.ex
        ttr, tta = x["t_tr"], x["t_ta"]
        c, sk = self.take_skip((ttr, tta), rng.randint(1, 3))
        buy = rng.random() < 0.5
        ticks = inst.bid + inst.spread if buy else inst.bid
        side = "buy" if buy else "sell"
        fills = [self.contracts(inst, inst.lots()) for _ in range(c)]
        first = x["tid"] + 1
        x["tid"] += c
        x["seq"] += rng.randint(1, 50)
        T = now_ms - rng.randint(0, 3)
        hist = x["hist"]
        for k, sz in enumerate(fills):
            hist.append((first + k, ticks, sz, side, T))
        self.count_trades(inst.sym, c)
        p = inst.px(ticks)
        if ttr in sk:
            self.consume_skip(ttr, c)
        elif ttr in self.index:
            self.publish(ttr, TRD % (inst.sym, inst.sym, x["tid"], p, sum(fills), side, T, c, x["seq"]),
                         (("trades", 1),))
        if tta in sk:
            self.consume_skip(tta, c)
        elif tta in self.index:
            for k, sz in enumerate(fills):
                self.publish(tta, TRA % (inst.sym, inst.sym, first + k, p, sz, side, T), (("trades", 1),))

    def periodic(self, now_ms):
        mono = self.mono
        mb = int(now_ms // (1000.0 * self.scale))
        do_mark = mb != self.mark_bucket
        self.mark_bucket = mb
        ob = int(now_ms // (3000.0 * self.scale))
        do_oi = ob != self.oi_bucket
        self.oi_bucket = ob
        sb = now_ms // 1000
        do_sec = sb != self.sec_bucket
        self.sec_bucket = sb
        rs_int = 60.0 * self.scale                   # "~60 s unchanged" resend, compressible
        rb = int(now_ms // (1000.0 * min(1.0, max(0.1, rs_int / 4))))
        do_rs = rb != self.rs_bucket
        self.rs_bucket = rb
        if not (do_mark or do_oi or do_sec or do_rs):
            return
        idx = self.index
        rng = self.rng
        for inst in self.insts:
            x = inst.ex
            so = inst.silent_other
            if do_mark and "mark" not in so:
                inst.update_mark()
                t = x["t_mk"]
                if t in idx:
                    self.publish(t, MARK % (inst.sym, inst.sym, inst.fpx(inst.mark), now_ms),
                                 (("mark_price", 1),))
            if do_oi and "oi" not in so and not inst.quiet:     # OI moves only with trades
                inst.update_oi()
                t = x["t_oi"]
                if t in idx:
                    self.publish(t, self._oi(inst, now_ms), (("open_interest", 1),))
            if do_sec:
                if mono >= x["fr_next"] and "funding" not in so:
                    if x["fr_next"]:
                        inst.update_funding()
                        t = x["t_fr"]
                        if t in idx:
                            self.publish(t, self._funding(inst, now_ms), (("funding", 1),))
                    x["fr_next"] = mono + rng.uniform(30, 90) * self.scale
            if do_rs and not inst.silent_bbo and x["bbo_last"] and mono - x["bbo_last"] >= rs_int:
                x["bbo_last"] = mono                      # 60 s heartbeat, same seqId
                t = x["t_bbo"]
                if t in idx:
                    self.publish(t, self._bbo(inst, now_ms), (("bbo", 1),))

    def topic_target(self, topic):
        ch, _, iid = topic.partition(":")
        inst = self.by_id.get(iid)
        k = {"bbo-tbt": "bbo", "trades": "trades", "trades-all": "trades", "mark-price": "mark",
             "funding-rate": "funding", "open-interest": "oi"}.get(ch)
        return None if inst is None or k is None else (inst, k)

    # ----------------------------------------------------------------- replay
    def replay_items(self, line):
        try:
            obj = ujson.loads(line)
        except ValueError:
            return []
        if not isinstance(obj, dict) or "arg" not in obj or "data" not in obj:
            return []
        ch, iid = obj["arg"].get("channel"), obj["arg"].get("instId")
        ds = DATASET.get(ch)
        rows = ((ds, len(obj["data"])),) if ds else ()
        self.known.add(iid)
        self.by_id_replay = True
        return [(f"{ch}:{iid}", line, rows, None)]

    # ------------------------------------------------------------------- REST
    def fail_body(self, status):
        if status == 429:
            return '{"msg":"Too Many Requests","code":"50011"}'
        if status >= 500:
            return '{"code":"50001","msg":"Service temporarily unavailable. Please try again later.","data":[]}'
        return '{"code":"50000","msg":"Body can not be empty.","data":[]}'

    @staticmethod
    def _ok(data):
        return dumps({"code": "0", "msg": "", "data": data})

    def rest(self, path, q):
        lim = REST_LIMITS.get(path)
        if lim is None:
            return 404, {}, '{"msg":"Not Found","code":"404"}'
        m = time.monotonic()
        w = self.ep_window.setdefault(path, collections.deque())
        while w and w[0] < m - 2.0:
            w.popleft()
        if len(w) >= lim * self.cfg["okx_rest_limit_factor"]:
            return 429, {}, self.fail_body(429)
        w.append(m)
        now_ms = int(time.time() * 1000)
        if path == "/api/v5/public/time":
            return 200, {}, self._ok([{"ts": str(now_ms)}])
        if path == "/api/v5/public/instruments":
            if q.get("instType") != "SWAP":
                return 200, {}, '{"code":"51000","msg":"Parameter instType error","data":[]}'
            rows = self._instrument_rows()
            if q.get("instId"):
                rows = [r for r in rows if r["instId"] == q["instId"]]
                if not rows:
                    return 200, {}, self._bad_inst()
            return 200, {}, self._ok(rows)
        iid = q.get("instId")
        if path in ("/api/v5/public/open-interest", "/api/v5/public/mark-price") and not iid:
            insts = self.insts
        else:
            inst = self.by_id.get(iid or "")
            if inst is None:
                return 200, {}, self._bad_inst()
            insts = [inst]
        if path == "/api/v5/public/open-interest":
            return 200, {}, self._ok([{"instType": "SWAP", "instId": i.sym,
                                       "oi": fmt_num(round(i.oi / i.ex["ct"], 2)),
                                       "oiCcy": fmt_num(round(i.oi, 6)), "oiUsd": "%.2f" % (i.oi * i.mark),
                                       "ts": str(now_ms)} for i in insts])
        if path == "/api/v5/public/mark-price":
            return 200, {}, self._ok([{"instType": "SWAP", "instId": i.sym, "markPx": i.fpx(i.mark),
                                       "ts": str(now_ms)} for i in insts])
        if path == "/api/v5/public/funding-rate":
            return 200, {}, self._ok(ujson.loads(self._funding(insts[0], now_ms))["data"])
        inst = insts[0]
        try:
            limit = max(1, min(500, int(q.get("limit") or 100)))
        except ValueError:
            return 200, {}, '{"code":"51000","msg":"Parameter limit error","data":[]}'
        items = list(inst.ex["hist"])[-limit:]
        items.reverse()
        return 200, {}, self._ok([{"instId": inst.sym, "side": side, "sz": str(sz), "source": "0",
                                   "px": inst.px(t), "tradeId": str(tid), "ts": str(T)}
                                  for tid, t, sz, side, T in items])

    @staticmethod
    def _bad_inst():
        return ('{"code":"51001","data":[],"msg":"Instrument ID, Instrument ID code, or Spread ID '
                'doesn\'t exist."}')

    def _instrument_rows(self):
        if hasattr(self, "_rows"):
            return self._rows
        rows = []
        for i in self.insts:
            rows.append(self._irow(i.sym, i.base, i.quote, i.quote, "linear", i.ex["ct"], i.base,
                                   "%.*f" % (i.pdec, i.tick)))
        for iid, b, settle, ctype in self.extra:
            i = self.by_id.get(f"{b}-USDT-SWAP")
            tick = "%.*f" % (i.pdec, i.tick) if i else "0.1"
            if ctype == "inverse":
                rows.append(self._irow(iid, b, "USD", settle, ctype, 100 if b == "BTC" else 10, "USD", tick))
            else:
                rows.append(self._irow(iid, b, "USD", settle, ctype, i.ex["ct"] if i else 0.01, b, tick))
        self._rows = rows
        return rows

    @staticmethod
    def _irow(iid, base, quote, settle, ctype, ct, ctccy, tick):
        return {"alias": "", "baseCcy": "", "category": "1", "ctMult": "1", "ctType": ctype,
                "ctVal": fmt_num(ct), "ctValCcy": ctccy, "expTime": "", "instFamily": f"{base}-{quote}",
                "instId": iid, "instType": "SWAP", "lever": "100", "listTime": "1611916828000",
                "lotSz": "1", "maxIcebergSz": "100000000", "maxLmtSz": "100000000", "maxMktSz": "10000",
                "maxStopSz": "10000", "maxTriggerSz": "100000000", "maxTwapSz": "100000000",
                "minSz": "1", "optType": "", "quoteCcy": "", "settleCcy": settle, "state": "live",
                "stk": "", "tickSz": tick, "uly": f"{base}-{quote}"}

    # ------------------------------------------------------------------ faults
    def notice(self, delay, seq_reset=None):
        """64008 service-upgrade notice on every /ws/v5/public and /ws/v5/private socket (okx.md
        §3: those two paths; /business unconfirmed, so not sent there), close them `delay` s
        later (close code 1012: unconfirmed).  With `seq_reset` (default: the
        `okx_notice_seq_reset` option) every instId's seqId restarts lower at that close."""
        import asyncio
        if seq_reset is None:
            seq_reset = self.cfg.get("okx_notice_seq_reset", False)
        targets = [c for c in list(self.conns.values())
                   if c.st.get("kind") in ("public", "private") and not c.muted and not c.closing]
        for c in targets:
            self._event(c, {"event": "notice", "code": "64008",
                            "msg": "The connection will soon be closed for a service upgrade. "
                                   "Please reconnect."})

        def _close():
            for c in targets:
                if not c.muted:
                    self.close_conn(c, 1012, "Service upgrade", "closed_by_fault")
            if seq_reset:
                for inst in self.insts:
                    inst.ex["seq"] = self._lower_seq(inst.ex["seq"])
        asyncio.get_running_loop().call_later(delay, _close)
        return len(targets)
