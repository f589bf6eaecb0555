"""Binance USD-M futures simulator (2026 `/public` + `/market` entry-point split).

Why the rules below (see /work/shared/exchanges/binance.md, "Simulator checklist"):

* Paths: `/public|/market` x `/ws|/stream` (+ streams in the URL path or `?streams=`), legacy
  `/ws`, `/stream` routed like `/public`; `/private` accepted but never carries market data.
  Anything else -> HTTP 404 on the handshake.
* The pitfall the collector must survive: a stream on the wrong entry point or an unknown symbol
  is ACKed `{"result":null,"id":N}` and then *silent*.  We record it in the socket's
  subscriptions (LIST_SUBSCRIPTIONS shows it) but never route data to it.
* Errors: the live server nests them, `{"error":{"code":2,"msg":"…"},"id":N}` (`"id":null`
  when the request had none); the docs' tables show a flat `{"code":2,"msg":"…"}`.
  `binance_error_form="flat"` sends the documented flat form (`id` only when the request had
  one).  Evidence in binance.md §4.
* Rejected topics (`Simulator.reject`): a JSON `SUBSCRIBE` naming one gets code 2 ("Invalid
  request: invalid stream" unless a reason is given) and subscribes nothing of that request;
  with `binance_reject_close` the socket is then closed (1008; code unconfirmed), as a third
  party measured after an "invalid stream" error.  Streams named in the URL are never rejected:
  they are accepted and stay silent, like an unknown symbol.
* Quiet symbols: no bookTicker/aggTrade/trade frames; markPrice goes on.
* Keepalive is server-driven: protocol ping every `binance_ping_interval`, close 1008 if no pong
  within `binance_pong_timeout`, close 1001 at `binance_max_conn_age`, close 1008 on > 10 inbound
  messages per second (text messages counted), cap `binance_max_streams` streams per socket
  (beyond: error reply code 2, nothing subscribed).  Close codes are unconfirmed upstream.
* Payloads keep the real key order; decimals are strings, ids/times integers.  aggTrade `a` is +1
  per symbol, `f..l` contiguous; `@trade` `t` +1 per fill; markPrice `E` on whole periods with `T`
  on the 8 h grid and one stale `T` frame after a settlement.
* Rows: bookTicker 1 bbo; aggTrade 1 trades; trade 1 trades; markPrice 1 mark_price + 1 funding.
  Binance has no OI stream (REST only).
* REST weights as documented (exchangeInfo 1, aggTrades 20, trades 5, time 1, openInterest 1,
  premiumIndex 1/10) in a fixed 1-minute window; over the limit -> 429 -1003, any request after
  that in the same window -> 418 and a ban for `binance_ban_seconds`.
"""
from __future__ import annotations

import collections
import time

import ujson

from .core import ExchangeBase, dumps
from .sources import Inst, next_funding

PUBLIC_STREAMS = {"bookTicker": "bbo", "trade": "trades"}
MARKET_STREAMS = {"aggTrade": "trades", "markPrice@1s": "mark1", "markPrice": "mark3"}
METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
WEIGHTS = {"/fapi/v1/exchangeInfo": 1, "/fapi/v1/time": 1, "/fapi/v1/aggTrades": 20,
           "/fapi/v1/trades": 5, "/fapi/v1/openInterest": 1, "/fapi/v1/premiumIndex": 1,
           "/fapi/v1/ping": 1}

BOOK = '{"e":"bookTicker","u":%d,"s":"%s","b":"%s","B":"%s","a":"%s","A":"%s","T":%d,"E":%d}'
AGG = '{"e":"aggTrade","E":%d,"a":%d,"s":"%s","p":"%s","q":"%s","f":%d,"l":%d,"T":%d,"m":%s}'
TRADE = '{"e":"trade","E":%d,"T":%d,"s":"%s","t":%d,"p":"%s","q":"%s","X":"MARKET","m":%s}'
MARK = '{"e":"markPriceUpdate","E":%d,"s":"%s","p":"%.8f","P":"%.8f","i":"%.8f","r":"%.8f","T":%d}'
WRAP = '{"stream":"%s","data":%s}'


class Binance(ExchangeBase):
    name = "binance"

    # ------------------------------------------------------------ instruments
    def build_instruments(self):
        insts = []
        self.by_lsym = {}
        self.by_sym = {}
        for base, quote, price in self.universe:
            sym = base + quote
            i = Inst(base, quote, price, sym, self.rng)
            ls = sym.lower()
            i.ex.update(u=self.rng.randint(10**9, 10**10), agg=self.rng.randint(10**8, 10**9),
                        raw=self.rng.randint(10**9, 4 * 10**9), nft=0,
                        t_bbo=ls + "@bookTicker", t_agg=ls + "@aggTrade", t_trade=ls + "@trade",
                        t_mp1=ls + "@markPrice@1s", t_mp3=ls + "@markPrice",
                        fr_next=0.0, hist=collections.deque(maxlen=self.cfg["rest_history"]))
            self.by_lsym[ls] = i
            self.by_sym[sym] = i
            insts.append(i)
        self.known = set(self.by_lsym)
        self.mark_bucket = None
        self.oi_bucket = None
        self.weight_window = 0
        self.weight_used = 0
        self.in_429 = False
        self.banned_until = 0.0
        return insts

    # -------------------------------------------------------------- websocket
    def parse_path(self, path):
        parts = path.split("/")
        if len(parts) >= 2 and parts[1] in ("public", "market", "private"):
            entry, rest = parts[1], parts[2:]
        else:
            entry, rest = "public", parts[1:]       # legacy /ws, /stream -> /public only
        if not rest or rest[0] not in ("ws", "stream"):
            return None
        if rest[0] == "stream" and len(rest) > 1 and any(rest[1:]):
            return None
        return (entry, rest[0], [s for s in rest[1:] if s])

    def routable(self, entry, stream):
        """True if `stream` carries data on this entry point (else ACK + silence)."""
        if stream == "!bookTicker":
            return entry == "public"
        if stream.startswith("!markPrice@arr"):
            return entry == "market"
        sym, _, kind = stream.partition("@")
        if sym not in self.known:
            return False
        if entry == "public":
            return kind in PUBLIC_STREAMS
        if entry == "market":
            return kind in MARKET_STREAMS
        return False

    def on_open(self, conn):
        entry, mode, streams = conn.st["kind"]
        conn.wrapped = mode == "stream"
        if mode == "stream":
            q = conn.st["query"].get("streams", "")
            streams = [s for s in q.split("/") if s]
        conn.st["win"] = [0, 0]
        if streams:
            self._subscribe(conn, streams[: self.cfg["binance_max_streams"]])

    def _subscribe(self, conn, streams):
        entry = conn.st["kind"][0]
        rej = self.rejected
        for s in streams:
            if s in conn.subs:
                continue
            ok = s not in rej and self.routable(entry, s)     # rejected in the URL: accepted, silent
            conn.subs[s] = ok
            if ok:
                self.deliver(conn, s)

    def lookup(self, symbol):
        return self.by_sym.get(symbol) or self.by_lsym.get(symbol)

    def _err(self, conn, code, msg, rid=None, has_id=False):
        if self.cfg.get("binance_error_form", "wrapped") == "flat":
            d = {"code": code, "msg": msg}
            if has_id:
                d["id"] = rid
        else:
            d = {"error": {"code": code, "msg": msg}, "id": rid if has_id else None}
        self.control(conn, dumps(d))

    def on_text(self, conn, msg):
        win = conn.st["win"]
        sec = int(time.monotonic())
        if win[0] != sec:
            win[0], win[1] = sec, 0
        win[1] += 1
        if win[1] > self.cfg["binance_max_msgs_per_sec"]:
            self.close_conn(conn, 1008, "Too many requests", "closed_policy")
            return
        if isinstance(msg, bytes):
            msg = msg.decode("utf-8", "replace")
        try:
            req = ujson.loads(msg)
        except ValueError:
            self._err(conn, 3, "Invalid JSON: expected value at line 1 column 1")
            return
        if not isinstance(req, dict):
            self._err(conn, 3, "Invalid JSON: expected value at line 1 column 1")
            return
        has_id = "id" in req
        rid = req.get("id")
        if has_id and not (isinstance(rid, int) and not isinstance(rid, bool) and rid >= 0):
            self._err(conn, 2, "Invalid request: request ID must be an unsigned integer", None, True)
            return
        method = req.get("method")
        if method is None:
            self._err(conn, 2, f"Invalid request: missing field `method` at line 1 column {len(msg)}",
                      rid, has_id)
            return
        if method not in METHODS:
            self._err(conn, 2, f"Invalid request: unknown variant `{method}`, expected one of "
                      "`SUBSCRIBE`, `UNSUBSCRIBE`, `LIST_SUBSCRIPTIONS`, `SET_PROPERTY`, "
                      "`GET_PROPERTY` at line 1 column 28", rid, has_id)
            return
        params = req.get("params", [])
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
                self._err(conn, 2, "Invalid request: invalid type: expected a sequence of strings",
                          rid, has_id)
                return
            if method == "SUBSCRIBE":
                bad = [p for p in params if p in self.rejected]
                if bad:
                    self._err(conn, 2, self.rejected[bad[0]] or "Invalid request: invalid stream",
                              rid, has_id)
                    if self.cfg.get("binance_reject_close"):
                        self.close_conn(conn, 1008, "Invalid request", "closed_policy")
                    return
                new = [p for p in params if p not in conn.subs]
                if len(conn.subs) + len(new) > self.cfg["binance_max_streams"]:
                    self._err(conn, 2, "Invalid request: too many parameters", rid, has_id)
                    return
                self._subscribe(conn, params)
            else:
                for p in params:
                    if conn.subs.pop(p, None):
                        self.undeliver(conn, p)
            self.control(conn, '{"result":null,"id":%s}' % dumps(rid))
        elif method == "LIST_SUBSCRIPTIONS":
            self.control(conn, dumps({"result": list(conn.subs), "id": rid}))
        else:
            if not isinstance(params, list) or not params or not isinstance(params[0], str):
                self._err(conn, 2, "Invalid request: property name must be a string", rid, has_id)
                return
            if params[0] != "combined":
                self._err(conn, 0, "Unknown property", rid, has_id)
                return
            if method == "GET_PROPERTY":
                self.control(conn, dumps({"result": conn.wrapped, "id": rid}))
                return
            if len(params) < 2 or not isinstance(params[1], bool):
                self._err(conn, 1, "Invalid value type: expected Boolean", rid, has_id)
                return
            conn.wrapped = params[1]
            self.control(conn, '{"result":null,"id":%s}' % dumps(rid))

    def keepalive(self, conn, mono):
        cfg = self.cfg
        if mono - conn.opened_mono >= cfg["binance_max_conn_age"]:
            self.close_conn(conn, 1001, "Connection max age reached", "closed_idle")
            return
        if conn.ping_outstanding is not None and mono - conn.ping_outstanding >= cfg["binance_pong_timeout"]:
            self.close_conn(conn, 1008, "Pong timeout", "closed_idle")
            return
        if mono - conn.last_server_ping >= cfg["binance_ping_interval"]:
            conn.last_server_ping = mono
            if conn.write_frame(b"\x89\x08" + b"%08d" % (int(mono) % 10**8)):
                self.c.n["control_frames"] += 1
                self.c.n["protocol_pings"] += 1      # not a text frame (see Counters)
                if conn.ping_outstanding is None:
                    conn.ping_outstanding = mono

    # ------------------------------------------------------------- generation
    def ev_bbo(self, inst, now_ms):
        inst.move()
        x = inst.ex
        x["u"] += self.rng.randint(1, 40)
        t = x["t_bbo"]
        if t in self.index:
            raw = BOOK % (x["u"], inst.sym, inst.px(inst.bid), inst.qty(inst.bsz),
                          inst.px(inst.bid + inst.spread), inst.qty(inst.asz),
                          now_ms - self.rng.randint(1, 4), now_ms)
            self.publish(t, raw, (("bbo", 1),), WRAP % (t, raw))

    def ev_trade(self, inst, now_ms):
        rng = self.rng
        x = inst.ex
        c = rng.randint(1, 4)
        c, _ = self.take_skip((x["t_trade"],), c)
        buy = rng.random() < 0.5
        ticks = inst.bid + inst.spread if buy else inst.bid
        lots = max(c, inst.lots())
        x["agg"] += 1
        a = x["agg"]
        f = x["raw"] + 1
        x["raw"] = l = x["raw"] + c
        T = now_ms - rng.randint(1, 4)
        m = "false" if buy else "true"
        x["hist"].append((a, ticks, lots, f, l, T, not buy))
        self.count_trades(inst.sym, 1)
        p = inst.px(ticks)
        t = x["t_agg"]
        if self.skip.get(t):
            self.consume_skip(t, 1)
        elif t in self.index:
            raw = AGG % (now_ms, a, inst.sym, p, inst.qty(lots), f, l, T, m)
            self.publish(t, raw, (("trades", 1),), WRAP % (t, raw))
        t = x["t_trade"]
        if self.skip.get(t):
            self.consume_skip(t, c)
        elif t in self.index:
            q, r = divmod(lots, c)
            for k in range(c):
                raw = TRADE % (now_ms, T, inst.sym, f + k, p, inst.qty(q + (k < r)), m)
                self.publish(t, raw, (("trades", 1),), WRAP % (t, raw))

    def periodic(self, now_ms):
        per = 1000.0 * self.scale
        b = int(now_ms // per)
        if b == self.mark_bucket:
            return
        first = self.mark_bucket is None
        self.mark_bucket = b
        E = int(b * per)
        three = b % 3 == 0
        mono = self.mono
        oi_tick = b % 3 == 0
        for inst in self.insts:
            x = inst.ex
            inst.update_mark()
            if oi_tick and not inst.quiet:          # no trades, no open-interest change
                inst.update_oi()
            if mono >= x["fr_next"]:
                if not first:
                    inst.update_funding()
                x["fr_next"] = mono + self.rng.uniform(30, 90) * self.scale
            if first or x["nft"] == 0:
                x["nft"] = next_funding(E)
            T = x["nft"]
            if E >= T:                      # one stale frame after settlement, then roll
                x["nft"] = next_funding(E)
            so = inst.silent_other
            t1, t3 = x["t_mp1"], x["t_mp3"]
            in1 = t1 in self.index and "mark1" not in so
            in3 = three and t3 in self.index and "mark3" not in so
            if in1 or in3:
                est = inst.mark * (1 + self.rng.gauss(0, 0.0001))
                raw = MARK % (E, inst.sym, inst.mark, est, inst.index, inst.fr, T)
                rows = (("mark_price", 1), ("funding", 1))
                if in1:
                    self.publish(t1, raw, rows, WRAP % (t1, raw))
                if in3:
                    self.publish(t3, raw, rows, WRAP % (t3, raw))

    def topic_target(self, topic):
        sym, _, kind = topic.partition("@")
        inst = self.by_lsym.get(sym)
        if inst is None:
            return None
        k = {"bookTicker": "bbo", "aggTrade": "trades", "trade": "trades",
             "markPrice@1s": "mark1", "markPrice": "mark3"}.get(kind)
        return None if k is None else (inst, k)

    # ----------------------------------------------------------------- replay
    def replay_items(self, line):
        try:
            obj = ujson.loads(line)
        except ValueError:
            return []
        if not isinstance(obj, dict):
            return []
        if "stream" in obj and "data" in obj:
            topic = obj["stream"]
            data = obj["data"]
            prefix = '{"stream":"%s","data":' % topic
            raw = line[len(prefix):-1] if line.startswith(prefix) and line.endswith("}") else dumps(data)
            wtext = line
        elif "e" in obj:
            data = obj
            e = obj.get("e")
            suffix = {"bookTicker": "@bookTicker", "aggTrade": "@aggTrade", "trade": "@trade",
                      "markPriceUpdate": "@markPrice@1s"}.get(e)
            if suffix is None or "s" not in obj:
                return []
            topic = obj["s"].lower() + suffix
            raw = line
            wtext = WRAP % (topic, line)
        else:
            return []
        rows = {}
        for d in (data if isinstance(data, list) else [data]):
            e = d.get("e") if isinstance(d, dict) else None
            if e == "bookTicker":
                rows["bbo"] = rows.get("bbo", 0) + 1
            elif e in ("aggTrade", "trade"):
                rows["trades"] = rows.get("trades", 0) + 1
            elif e == "markPriceUpdate":
                rows["mark_price"] = rows.get("mark_price", 0) + 1
                rows["funding"] = rows.get("funding", 0) + 1
        sym = topic.partition("@")[0]
        if not sym.startswith("!"):
            self.known.add(sym)
        return [(topic, raw, tuple(rows.items()), wtext)]

    # ------------------------------------------------------------------- REST
    def fail_body(self, status):
        if status == 429:
            return dumps({"code": -1003, "msg": "Too many requests; current limit is %d requests per "
                          "minute. Please use the websocket for live updates to avoid polling the API."
                          % self.cfg["binance_weight_limit"]})
        if status == 418:
            return dumps({"code": -1003, "msg": "Way too many requests; IP(127.0.0.1) banned until "
                          "%d. Please use the websocket for live updates to avoid bans."
                          % int((time.time() + self.cfg["binance_ban_seconds"]) * 1000)})
        if status >= 500:
            return dumps({"code": -1008, "msg": "Server is currently overloaded with other requests. "
                          "Please try again in a few minutes."})
        return dumps({"code": -1000, "msg": "An unknown error occured while processing the request."})

    def rest(self, path, q):
        now = time.time()
        weight = WEIGHTS.get(path, 1)
        if path == "/fapi/v1/premiumIndex" and not q.get("symbol"):
            weight = 10
        if now < self.banned_until:
            return 418, {"Retry-After": str(int(self.banned_until - now) + 1)}, dumps(
                {"code": -1003, "msg": "Way too many requests; IP(127.0.0.1) banned until %d. Please "
                 "use the websocket for live updates to avoid bans." % int(self.banned_until * 1000)})
        w = int(now // 60)
        if w != self.weight_window:
            self.weight_window, self.weight_used, self.in_429 = w, 0, False
        self.weight_used += weight
        hdr = {"X-MBX-USED-WEIGHT-1M": str(self.weight_used)}
        if self.weight_used > self.cfg["binance_weight_limit"]:
            if self.in_429:
                self.banned_until = now + self.cfg["binance_ban_seconds"]
                hdr["Retry-After"] = str(int(self.cfg["binance_ban_seconds"]))
                return 418, hdr, self.fail_body(418)
            self.in_429 = True
            hdr["Retry-After"] = str(60 - int(now % 60))
            return 429, hdr, self.fail_body(429)
        now_ms = int(now * 1000)
        if path == "/fapi/v1/time":
            return 200, hdr, '{"serverTime":%d}' % now_ms
        if path == "/fapi/v1/ping":
            return 200, hdr, "{}"
        if path == "/fapi/v1/exchangeInfo":
            return 200, hdr, self._exchange_info(now_ms)
        if path == "/fapi/v1/premiumIndex" and not q.get("symbol"):
            return 200, hdr, dumps([self._premium(i, now_ms) for i in self.insts])
        if path not in WEIGHTS:
            return 404, hdr, dumps({"code": -5000, "msg": "Path %s, Method GET is invalid" % path})
        sym = q.get("symbol")
        if not sym:
            return 400, hdr, dumps({"code": -1102, "msg": "Mandatory parameter 'symbol' was not sent, "
                                    "was empty/null, or malformed."})
        inst = self.by_sym.get(sym)
        if inst is None:
            return 400, hdr, '{"code":-1121,"msg":"Invalid symbol."}'
        if path == "/fapi/v1/openInterest":
            return 200, hdr, dumps({"openInterest": "%.*f" % (inst.qdec, inst.oi), "symbol": sym,
                                    "time": now_ms})
        if path == "/fapi/v1/premiumIndex":
            return 200, hdr, dumps(self._premium(inst, now_ms))
        try:
            limit = max(1, min(1000, int(q.get("limit", 500))))
        except ValueError:
            return 400, hdr, dumps({"code": -1100, "msg": "Illegal characters found in parameter 'limit'."})
        hist = inst.ex["hist"]
        if path == "/fapi/v1/aggTrades":
            items = list(hist)
            if "fromId" in q:
                fid = int(q["fromId"])
                items = [h for h in items if h[0] >= fid][:limit]
            else:
                items = items[-limit:]
            return 200, hdr, dumps([{"a": a, "p": inst.px(t), "q": inst.qty(lots), "f": f, "l": l,
                                     "T": T, "m": m} for a, t, lots, f, l, T, m in items])
        out = []
        for a, t, lots, f, l, T, m in reversed(hist):
            c = l - f + 1
            qq, r = divmod(lots, c)
            for k in range(c - 1, -1, -1):
                ql = qq + (k < r)
                out.append({"id": f + k, "price": inst.px(t), "qty": inst.qty(ql),
                            "quoteQty": "%.2f" % (t * inst.tick * ql * inst.lot), "time": T,
                            "isBuyerMaker": m, "isRPITrade": False})
            if len(out) >= limit:
                break
        out = out[:limit]
        out.reverse()
        return 200, hdr, dumps(out)

    def _premium(self, inst, now_ms):
        x = inst.ex
        return {"symbol": inst.sym, "markPrice": "%.8f" % inst.mark, "indexPrice": "%.8f" % inst.index,
                "estimatedSettlePrice": "%.8f" % inst.mark, "lastFundingRate": "%.8f" % inst.fr,
                "interestRate": "0.00010000", "nextFundingTime": x["nft"] or next_funding(now_ms),
                "time": now_ms}

    def _exchange_info(self, now_ms):
        if not hasattr(self, "_xi_syms"):
            rows = []
            for i in self.insts:
                rows.append(self._xi_row(i.sym, "PERPETUAL", "TRADING", i.base, i.quote, i.pdec, i.qdec))
            rows.append(self._xi_row("TSLAUSDT", "TRADIFI_PERPETUAL", "TRADING", "TSLA", "USDT", 2, 3))
            rows.append(self._xi_row("BTCUSDT_261225", "CURRENT_QUARTER", "TRADING", "BTC", "USDT", 1, 3))
            rows.append(self._xi_row("NEWCOINUSDT", "", "PENDING_TRADING", "NEWCOIN", "USDT", 4, 0))
            self._xi_syms = dumps(rows)
        return ('{"timezone":"UTC","serverTime":%d,"futuresType":"U_MARGINED","rateLimits":'
                '[{"rateLimitType":"REQUEST_WEIGHT","interval":"MINUTE","intervalNum":1,"limit":%d},'
                '{"rateLimitType":"ORDERS","interval":"MINUTE","intervalNum":1,"limit":1200},'
                '{"rateLimitType":"ORDERS","interval":"SECOND","intervalNum":10,"limit":300}],'
                '"exchangeFilters":[],"assets":[],"symbols":%s}'
                % (now_ms, self.cfg["binance_weight_limit"], self._xi_syms))

    @staticmethod
    def _xi_row(sym, ctype, status, base, quote, pdec, qdec):
        tick = "%.*f" % (pdec, 10.0 ** -pdec)
        step = "%.*f" % (qdec, 10.0 ** -qdec) if qdec else "1"
        return {"symbol": sym, "pair": base + quote, "contractType": ctype,
                "deliveryDate": 4133404800000 if ctype.endswith("PERPETUAL") else 1798185600000,
                "onboardDate": 1569398400000, "status": status, "maintMarginPercent": "2.5000",
                "requiredMarginPercent": "5.0000", "baseAsset": base, "quoteAsset": quote,
                "marginAsset": quote, "pricePrecision": pdec, "quantityPrecision": qdec,
                "baseAssetPrecision": 8, "quotePrecision": 8, "underlyingType": "COIN",
                "underlyingSubType": [], "settlePlan": 0, "triggerProtect": "0.0500",
                "liquidationFee": "0.012500", "marketTakeBound": "0.05",
                "filters": [{"minPrice": tick, "maxPrice": "4529764", "filterType": "PRICE_FILTER",
                             "tickSize": tick},
                            {"stepSize": step, "filterType": "LOT_SIZE", "maxQty": "1000",
                             "minQty": step},
                            {"stepSize": step, "filterType": "MARKET_LOT_SIZE", "maxQty": "1000",
                             "minQty": step},
                            {"notional": "5", "filterType": "MIN_NOTIONAL"}],
                "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT",
                               "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"],
                "timeInForce": ["GTC", "IOC", "FOK", "GTX"]}
