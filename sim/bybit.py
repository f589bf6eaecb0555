"""Bybit v5 public linear simulator (USDT perps `BTCUSDT`, USDC perps `BTCPERP`).

Why the rules below (see /work/shared/exchanges/bybit.md, "Simulator checklist"):

* One path `/v5/public/linear` (anything else -> HTTP 404).  JSON `op` messages; one ACK per
  request with `req_id` echoed; failures keep the ACK shape with `success:false` and the texts
  measured on a Bybit-protocol relay ("error:handler not found,topic:…", "error:already
  subscribed,topic:…", "error:invalid op", "Failed to decode incoming data:…").  One bad topic
  rejects the whole request.  The socket always stays open.
* Keepalive is client-driven.  The simulator *enforces* it: a socket that has not sent a JSON
  `{"op":"ping"}` (or a protocol ping) for `bybit_idle_timeout` s is closed (1001), even if data
  is flowing - stricter than Bybit's "no ping-pong and no data", so a collector that forgets to
  ping is caught in tests.
* Args of one connection may total 21,000 characters; beyond that the request is rejected.
* Rejected topics (`Simulator.reject`) fail like an unknown symbol: the whole request gets
  `success:false` "error:handler not found,topic:<topic>" (or the given reason), nothing of it
  is subscribed.
* `orderbook.1`: snapshot-only, `ts` before `type`, `u` +1 per change, resent with the same `u`
  (new `seq`/`ts`/`cts`) after 3 s (x `cadence_scale`) unchanged; initial snapshot on subscribe.
  `Simulator.bybit_ob_restart` pushes a snapshot with `u` = 1 at once (as after a service
  restart), then `u` goes on +1 per change.
* Quiet symbols: no publicTrade, no book changes (so orderbook.1 only as initial snapshot and
  3 s resends), no open-interest change; tickers deltas (mark/index/funding) go on.
* `publicTrade`: 1..3 trades per frame sharing one `seq`, UUID `i`, `S` taker side.
* `tickers`: full snapshot on subscribe (to that socket), then every 100 ms a delta with only the
  changed keys; mark/index change each mark period, OI each 3 s, funding rate every 30-90 s
  (all x `cadence_scale`), `nextFundingTime` rolls at settlement.
* One cross sequence per symbol feeds orderbook `seq`, trade `seq` and tickers `cs`.
* Rows: orderbook 1 bbo; publicTrade len(data) trades; tickers 1 mark_price if markPrice/indexPrice,
  1 funding if fundingRate/nextFundingTime/fundingIntervalHour, 1 open_interest if
  openInterest/openInterestValue (a snapshot gives 3 rows).
* REST: instruments-info with real cursor pagination (default limit 500, max 1000), recent-trade
  (newest first, consistent with generated trades incl. unsent ones), time, tickers; retCode
  10001 for a bad symbol; per-endpoint > `bybit_endpoint_limit` req/s -> HTTP 200 retCode 10006;
  > 600 req / 5 s per IP -> HTTP 403 and a ban for `bybit_ban_seconds`.
"""
from __future__ import annotations

import collections
import time

import ujson

from .core import ExchangeBase, dumps
from .sources import Inst, next_funding

TOPIC_PREFIXES = ("orderbook.1.", "publicTrade.", "tickers.")
OTHER_OK = ("orderbook.50.", "orderbook.200.", "orderbook.500.", "kline.1.", "liquidation.",
            "allLiquidation.")
MARK_KEYS = ("markPrice",)  # mark_px is required: an index-only delta is no mark_price row
FUND_KEYS = ("fundingRate", "nextFundingTime", "fundingIntervalHour")
OI_KEYS = ("openInterest", "openInterestValue")
OB = ('{"topic":"orderbook.1.%s","ts":%d,"type":"snapshot","data":{"s":"%s","b":[["%s","%s"]],'
      '"a":[["%s","%s"]],"u":%d,"seq":%d},"cts":%d}')
TR = ('{"T":%d,"s":"%s","S":"%s","v":"%s","p":"%s","L":"%s","i":"%s","BT":false,"RPI":false,'
      '"seq":%d}')
_B32 = "0123456789abcdefghijklmnopqrstuv"


class Bybit(ExchangeBase):
    name = "bybit"

    # ------------------------------------------------------------ instruments
    def build_instruments(self):
        insts = []
        self.by_sym = {}
        rng = self.rng
        for base, quote, price in self.universe:
            sym = base + ("USDT" if quote == "USDT" else "PERP")
            i = Inst(base, quote, price, sym, rng)
            fih = 8 if base in ("BTC", "ETH") or rng.random() < 0.5 else 4
            i.ex.update(u=rng.randint(10**6, 10**8), seq=rng.randint(10**10, 10**11),
                        t_ob="orderbook.1." + sym, t_tr="publicTrade." + sym, t_tk="tickers." + sym,
                        fih=fih, nft=0, fr_next=0.0, ob_last=0.0, last_px=i.bid, tick_dir="ZeroPlusTick",
                        vol=i.typ_lots * i.lot * 50000, chg=set(),
                        hist=collections.deque(maxlen=self.cfg["rest_history"]),
                        display=base + quote)
            self.by_sym[sym] = i
            insts.append(i)
        self.known = set(self.by_sym)
        self.futures = []
        for b in [x.base for x in insts if x.quote == "USDT"][:2]:
            for exp in ("26DEC26", "26MAR27"):
                self.futures.append((f"{b}USDT-{exp}", b))
        self.known.update(s for s, _ in self.futures)
        self.tk_bucket = self.mark_bucket = self.oi_bucket = None
        self.rs_bucket = None
        self.ip_window = collections.deque()
        self.ep_window = {}
        self.banned_until = 0.0
        return insts

    def conn_id(self):
        r = self.rng.getrandbits(120)
        s = "".join(_B32[(r >> (5 * k)) & 31] for k in range(20))
        t = "".join("0123456789abcdefghijklmnopqrstuvwxyz"[(r >> (100 + 4 * k)) % 36] for k in range(4))
        return f"{s}-{t}"

    # -------------------------------------------------------------- websocket
    def parse_path(self, path):
        return "linear" if path.rstrip("/") == "/v5/public/linear" else None

    def on_open(self, conn):
        conn.st["conn_id"] = self.conn_id()
        conn.st["args_len"] = 0

    def _reply(self, conn, success, ret_msg, req_id, op):
        self.control(conn, dumps({"success": success, "ret_msg": ret_msg,
                                  "conn_id": conn.st["conn_id"], "req_id": req_id, "op": op}))

    def _valid(self, topic):
        if topic.startswith(TOPIC_PREFIXES) or topic.startswith(OTHER_OK):
            return topic.rsplit(".", 1)[-1] in self.known
        return False

    def on_text(self, conn, msg):
        if isinstance(msg, bytes):
            msg = msg.decode("utf-8", "replace")
        try:
            req = ujson.loads(msg)
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            self._reply(conn, False, "Failed to decode incoming data:" + msg[:200], "", "")
            return
        op = req.get("op")
        rid = req.get("req_id", "")
        if not isinstance(rid, str):
            rid = dumps(rid)
        if op == "ping":
            conn.client_pings += 1
            conn.last_client_ping = time.monotonic()
            self._reply(conn, True, "pong", rid, "ping")
            return
        if op not in ("subscribe", "unsubscribe"):
            self._reply(conn, False, "error:invalid op", rid, op if isinstance(op, str) else "")
            return
        args = req.get("args")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            self._reply(conn, False, "error:param invalid", rid, op)
            return
        if op == "unsubscribe":
            for a in args:
                if conn.subs.pop(a, None) is not None:
                    conn.st["args_len"] -= len(a)
                    self.undeliver(conn, a)
            self._reply(conn, True, "", rid, op)
            return
        seen = set()
        rej = self.rejected
        for a in args:
            if a in rej:
                self._reply(conn, False, rej[a] or "error:handler not found,topic:" + a, rid, op)
                return
            if not self._valid(a):
                self._reply(conn, False, "error:handler not found,topic:" + a, rid, op)
                return
            if a in conn.subs or a in seen:
                self._reply(conn, False, "error:already subscribed,topic:" + a, rid, op)
                return
            seen.add(a)
        total = conn.st["args_len"] + sum(len(a) for a in args)
        if total > self.cfg["bybit_max_args_chars"]:
            self._reply(conn, False, "error:args length exceeds limit,max:%d"
                        % self.cfg["bybit_max_args_chars"], rid, op)
            return
        conn.st["args_len"] = total
        self._reply(conn, True, "", rid, op)
        for a in args:
            sym = a.rsplit(".", 1)[-1]
            gen = a.startswith(TOPIC_PREFIXES) and sym in self.by_sym
            conn.subs[a] = gen
            if gen:
                self.deliver(conn, a)
                if self.replay is None and not self.paused:
                    self._initial(conn, a, self.by_sym[sym])

    def _initial(self, conn, topic, inst):
        now_ms = int(time.time() * 1000)
        x = inst.ex
        if topic.startswith("orderbook") and not inst.silent_bbo:
            x["seq"] += 1
            self.send_to(conn, topic, self._ob(inst, now_ms), (("bbo", 1),))
        elif topic.startswith("tickers") and "tickers" not in inst.silent_other:
            x["seq"] += 1
            d = self._ticker_dict(inst, now_ms)
            text = ('{"topic":"%s","type":"snapshot","data":%s,"cs":%d,"ts":%d}'
                    % (topic, dumps(d), x["seq"], now_ms))
            self.send_to(conn, topic, text, (("mark_price", 1), ("funding", 1), ("open_interest", 1)))

    def quiet_start(self, inst):
        if not inst.ex["ob_last"]:                   # never changed yet: resend timer starts now
            inst.ex["ob_last"] = time.monotonic()

    def ob_restart(self, symbol):
        """Next orderbook.1 frame of `symbol` is a snapshot with u=1 (pushed now), then +1 per change."""
        inst = self.lookup(symbol)
        if inst is None:
            raise ValueError(f"bybit: unknown symbol {symbol!r}")
        x = inst.ex
        if inst.silent_bbo or self.paused or self.replay is not None:
            x["u"] = 0                               # the next change is pushed with u=1
            return 0
        x["u"] = 1
        x["seq"] += self.rng.randint(1, 30)
        x["ob_last"] = time.monotonic()
        t = x["t_ob"]
        if t not in self.index:
            return 0
        return self.publish(t, self._ob(inst, int(time.time() * 1000)), (("bbo", 1),))

    def keepalive(self, conn, mono):
        if mono - conn.last_client_ping >= self.cfg["bybit_idle_timeout"]:
            self.close_conn(conn, 1001, "no ping received", "closed_idle")

    # ------------------------------------------------------------- generation
    def _ob(self, inst, now_ms):
        x = inst.ex
        return OB % (inst.sym, now_ms, inst.sym, inst.px(inst.bid), inst.qty(inst.bsz),
                     inst.px(inst.bid + inst.spread), inst.qty(inst.asz), x["u"], x["seq"],
                     now_ms - self.rng.randint(1, 4))

    def ev_bbo(self, inst, now_ms):
        inst.move()
        x = inst.ex
        x["u"] += 1
        x["seq"] += self.rng.randint(1, 30)
        x["ob_last"] = self.mono
        x["chg"].add("bbo")
        t = x["t_ob"]
        if t in self.index:
            self.publish(t, self._ob(inst, now_ms), (("bbo", 1),))

    def ev_trade(self, inst, now_ms):
        rng = self.rng
        x = inst.ex
        t = x["t_tr"]
        k, sk = self.take_skip((t,), rng.randint(1, 3))
        buy = rng.random() < 0.5
        ticks = inst.bid + inst.spread if buy else inst.bid
        x["seq"] += rng.randint(1, 30)
        seq = x["seq"]
        T = now_ms - rng.randint(1, 4)
        lp = x["last_px"]
        if ticks > lp:
            x["tick_dir"] = "PlusTick"
        elif ticks < lp:
            x["tick_dir"] = "MinusTick"
        x["last_px"] = ticks
        side = "Buy" if buy else "Sell"
        hist = x["hist"]
        trades = []
        for _ in range(k):
            lots = inst.lots()
            ids = rng.getrandbits(128)
            hist.append((ids, ticks, lots, side, T, seq))
            trades.append((lots, ids))
            x["vol"] += lots * inst.lot
        x["chg"].add("trade")
        self.count_trades(inst.sym, k)
        if sk:
            self.consume_skip(t, k)
            return
        if t in self.index:
            p = inst.px(ticks)
            tdir = x["tick_dir"]
            body = ",".join(TR % (T, inst.sym, side, inst.qty(lots), p, tdir,
                                  _uuid(ids), seq) for lots, ids in trades)
            x["tick_dir"] = "ZeroPlusTick" if tdir in ("PlusTick", "ZeroPlusTick") else "ZeroMinusTick"
            self.publish(t, '{"topic":"%s","type":"snapshot","ts":%d,"data":[%s]}' % (t, now_ms, body),
                         (("trades", k),))

    def _ticker_dict(self, inst, now_ms):
        x = inst.ex
        if not x["nft"]:
            x["nft"] = next_funding(now_ms, x["fih"])
        last = inst.px(x["last_px"])
        oi = inst.oi
        return {"symbol": inst.sym, "tickDirection": x["tick_dir"], "price24hPcnt": "0.001624",
                "lastPrice": last, "prevPrice24h": inst.fpx(inst.price0),
                "highPrice24h": inst.fpx(inst.price0 * 1.02), "lowPrice24h": inst.fpx(inst.price0 * 0.98),
                "prevPrice1h": inst.fpx(inst.price0), "markPrice": inst.fpx(inst.mark),
                "indexPrice": inst.fpx(inst.index), "openInterest": "%.*f" % (inst.qdec, oi),
                "openInterestValue": "%.2f" % (oi * inst.mark),
                "turnover24h": "%.4f" % (x["vol"] * inst.price0), "volume24h": "%.4f" % x["vol"],
                "fundingIntervalHour": str(x["fih"]), "fundingCap": "0.005",
                "singleOpenInterest": "%.*f" % (inst.qdec, oi / 2),
                "singleOpenInterestValue": "%.2f" % (oi * inst.mark / 2),
                "nextFundingTime": str(x["nft"]), "fundingRate": "%.8f" % inst.fr,
                "bid1Price": inst.px(inst.bid), "bid1Size": inst.qty(inst.bsz),
                "ask1Price": inst.px(inst.bid + inst.spread), "ask1Size": inst.qty(inst.asz),
                "preOpenPrice": "", "preQty": "", "curPreListingPhase": ""}

    def periodic(self, now_ms):
        mono = self.mono
        tb = now_ms // 100
        if tb == self.tk_bucket:
            return
        self.tk_bucket = tb
        mb = int(now_ms // (1000.0 * self.scale))
        do_mark = mb != self.mark_bucket
        self.mark_bucket = mb
        ob = int(now_ms // (3000.0 * self.scale))
        do_oi = ob != self.oi_bucket
        self.oi_bucket = ob
        rs_int = 3.0 * self.scale                    # "3 s unchanged" resend, compressible
        rb = int(now_ms // (1000.0 * min(1.0, max(0.1, rs_int / 4))))
        do_rs = rb != self.rs_bucket
        self.rs_bucket = rb
        rng = self.rng
        idx = self.index
        for inst in self.insts:
            x = inst.ex
            chg = x["chg"]
            if do_mark:
                inst.update_mark()
                chg.add("mark")
            if do_oi and not inst.quiet:             # no trades, no open-interest change
                inst.update_oi()
                chg.add("oi")
            if mono >= x["fr_next"]:
                if x["fr_next"]:
                    inst.update_funding()
                    chg.add("fr")
                x["fr_next"] = mono + rng.uniform(30, 90) * self.scale
            if x["nft"] and now_ms >= x["nft"]:
                x["nft"] = next_funding(now_ms, x["fih"])
                chg.add("nft")
                chg.add("fr")
            if do_rs and not inst.silent_bbo and x["ob_last"] and mono - x["ob_last"] >= rs_int:
                x["ob_last"] = mono                      # 3 s heartbeat, same u
                x["seq"] += rng.randint(1, 30)
                if x["t_ob"] in idx:
                    self.publish(x["t_ob"], self._ob(inst, now_ms), (("bbo", 1),))
            if not chg or "tickers" in inst.silent_other:
                continue
            t = x["t_tk"]
            if t not in idx:
                chg.clear()
                continue
            parts = ['"symbol":"%s"' % inst.sym]
            rows = []
            if "trade" in chg:
                parts.append('"tickDirection":"%s","lastPrice":"%s","turnover24h":"%.4f","volume24h":"%.4f"'
                             % (x["tick_dir"], inst.px(x["last_px"]), x["vol"] * inst.price0, x["vol"]))
            if "mark" in chg:
                parts.append('"markPrice":"%s","indexPrice":"%s"' % (inst.fpx(inst.mark), inst.fpx(inst.index)))
                rows.append(("mark_price", 1))
            if "oi" in chg:
                oi = inst.oi
                parts.append('"openInterest":"%.*f","openInterestValue":"%.2f","singleOpenInterest":"%.*f",'
                             '"singleOpenInterestValue":"%.2f"'
                             % (inst.qdec, oi, oi * inst.mark, inst.qdec, oi / 2, oi * inst.mark / 2))
                rows.append(("open_interest", 1))
            if "fr" in chg or "nft" in chg:
                if not x["nft"]:
                    x["nft"] = next_funding(now_ms, x["fih"])
                f = ['"fundingRate":"%.8f"' % inst.fr] if "fr" in chg else []
                if "nft" in chg:
                    f.append('"nextFundingTime":"%d"' % x["nft"])
                parts.append(",".join(f))
                rows.append(("funding", 1))
            if "bbo" in chg:
                parts.append('"bid1Price":"%s","bid1Size":"%s","ask1Price":"%s","ask1Size":"%s"'
                             % (inst.px(inst.bid), inst.qty(inst.bsz), inst.px(inst.bid + inst.spread),
                                inst.qty(inst.asz)))
            chg.clear()
            x["seq"] += rng.randint(1, 30)
            self.publish(t, '{"topic":"%s","type":"delta","data":{%s},"cs":%d,"ts":%d}'
                         % (t, ",".join(parts), x["seq"], now_ms), tuple(rows))

    def topic_target(self, topic):
        kind, _, sym = topic.rpartition(".")
        inst = self.by_sym.get(sym)
        if inst is None:
            return None
        k = {"orderbook.1": "bbo", "publicTrade": "trades", "tickers": "tickers"}.get(kind)
        return None if k is None else (inst, k)

    # ----------------------------------------------------------------- replay
    def replay_items(self, line):
        try:
            obj = ujson.loads(line)
        except ValueError:
            return []
        if not isinstance(obj, dict) or "topic" not in obj:
            return []
        topic = obj["topic"]
        data = obj.get("data")
        rows = ()
        if topic.startswith("orderbook."):
            rows = (("bbo", 1),)
        elif topic.startswith("publicTrade."):
            rows = (("trades", len(data) if isinstance(data, list) else 1),)
        elif topic.startswith("tickers.") and isinstance(data, dict):
            r = []
            if any(k in data for k in MARK_KEYS):
                r.append(("mark_price", 1))
            if any(k in data for k in FUND_KEYS):
                r.append(("funding", 1))
            if any(k in data for k in OI_KEYS):
                r.append(("open_interest", 1))
            rows = tuple(r)
        self.known.add(topic.rsplit(".", 1)[-1])
        return [(topic, line, rows, None)]

    # ------------------------------------------------------------------- REST
    def fail_body(self, status):
        if status == 403:
            return "403 Forbidden: access too frequent"
        if status == 429:
            return self._env(None, 10006, "Too many visits. Exceeded the API Rate Limit.")
        if status >= 500:
            return self._env(None, 10016, "Server error.")
        return self._env(None, 10001, "Request parameter error.")

    def _env(self, result, code=0, msg="OK"):
        return dumps({"retCode": code, "retMsg": msg, "result": {} if result is None else result,
                      "retExtInfo": {}, "time": int(time.time() * 1000)})

    def rest(self, path, q):
        mono = time.monotonic()
        if mono < self.banned_until:
            return 403, {}, self.fail_body(403)
        w = self.ip_window
        w.append(mono)
        while w and w[0] < mono - 5.0:
            w.popleft()
        if len(w) > self.cfg["bybit_ip_limit"]:
            self.banned_until = mono + self.cfg["bybit_ban_seconds"]
            return 403, {}, self.fail_body(403)
        ew = self.ep_window.setdefault(path, collections.deque())
        ew.append(mono)
        while ew and ew[0] < mono - 1.0:
            ew.popleft()
        lim = self.cfg["bybit_endpoint_limit"]
        hdr = {"X-Bapi-Limit": str(lim), "X-Bapi-Limit-Status": str(max(0, lim - len(ew))),
               "X-Bapi-Limit-Reset-Timestamp": str(int((time.time() + 1) * 1000))}
        if len(ew) > lim:
            self.c.n["rest_429"] += 1
            return 200, hdr, self._env(None, 10006, "Too many visits!")
        now_ms = int(time.time() * 1000)
        if path == "/v5/market/time":
            return 200, hdr, self._env({"timeSecond": str(now_ms // 1000),
                                        "timeNano": str(time.time_ns())})
        if path not in ("/v5/market/instruments-info", "/v5/market/recent-trade", "/v5/market/tickers"):
            return 404, hdr, '{"retCode":404,"retMsg":"Not Found"}'
        if q.get("category") != "linear":
            return 200, hdr, self._env(None, 10001, "params error: category is invalid")
        sym = q.get("symbol")
        try:
            limit = int(q.get("limit") or (500 if path.endswith("info") else 500))
        except ValueError:
            return 200, hdr, self._env(None, 10001, "params error: limit invalid")
        if path == "/v5/market/instruments-info":
            rows = self._instrument_rows()
            if sym:
                rows = [r for r in rows if r["symbol"] == sym]
            limit = max(1, min(1000, limit))
            cur = q.get("cursor") or ""
            try:
                off = int(cur[1:]) if cur.startswith("p") else 0
            except ValueError:
                return 200, hdr, self._env(None, 10001, "params error: cursor invalid")
            page = rows[off:off + limit]
            nxt = "p%d" % (off + limit) if off + limit < len(rows) else ""
            return 200, hdr, self._env({"category": "linear", "list": page, "nextPageCursor": nxt})
        if path == "/v5/market/tickers":
            insts = self.insts
            if sym:
                if sym not in self.by_sym:
                    return 200, hdr, self._env(None, 10001, "params error: symbol invalid")
                insts = [self.by_sym[sym]]
            lst = []
            for i in insts:
                d = self._ticker_dict(i, now_ms)
                for k in ("singleOpenInterest", "singleOpenInterestValue"):
                    d.pop(k, None)
                lst.append(d)
            return 200, hdr, self._env({"category": "linear", "list": lst})
        inst = self.by_sym.get(sym or "")
        if inst is None:
            return 200, hdr, self._env(None, 10001, "params error: symbol invalid")
        limit = max(1, min(1000, limit))
        items = list(inst.ex["hist"])[-limit:]
        items.reverse()
        lst = [{"execId": _uuid(ids), "symbol": inst.sym, "price": inst.px(t), "size": inst.qty(lots),
                "side": side, "time": str(T), "isBlockTrade": False, "isRPITrade": False,
                "seq": str(seq)} for ids, t, lots, side, T, seq in items]
        return 200, hdr, self._env({"category": "linear", "list": lst})

    def _instrument_rows(self):
        if hasattr(self, "_rows"):
            return self._rows
        rows = []
        for n, i in enumerate(self.insts):
            rows.append(self._irow(i.sym, "LinearPerpetual", i.base, i.quote, i.pdec, i.qdec,
                                   i.ex["fih"] * 60, i.ex["display"], n + 1, "0"))
        for n, (s, b) in enumerate(self.futures):
            i = self.by_sym[b + "USDT"]
            rows.append(self._irow(s, "LinearFutures", b, "USDT", i.pdec, i.qdec, 0, s,
                                   len(rows) + 1, "1798185600000"))
        self._rows = rows
        return rows

    @staticmethod
    def _irow(sym, ctype, base, quote, pdec, qdec, fint, display, sid, delivery):
        tick = "%.*f" % (pdec, 10.0 ** -pdec)
        step = "%.*f" % (qdec, 10.0 ** -qdec) if qdec else "1"
        return {"symbol": sym, "contractType": ctype, "status": "Trading", "baseCoin": base,
                "quoteCoin": quote, "launchTime": "1610604231000", "deliveryTime": delivery,
                "deliveryFeeRate": "", "priceScale": str(pdec),
                "leverageFilter": {"minLeverage": "1", "maxLeverage": "100.00", "leverageStep": "0.01"},
                "priceFilter": {"minPrice": tick, "maxPrice": "1999999.80", "tickSize": tick},
                "lotSizeFilter": {"maxOrderQty": "1000", "minOrderQty": step, "qtyStep": step,
                                  "postOnlyMaxOrderQty": "1000", "maxMktOrderQty": "200",
                                  "minNotionalValue": "5"},
                "unifiedMarginTrade": True, "fundingInterval": fint, "settleCoin": quote,
                "copyTrading": "none", "upperFundingRate": "0.005", "lowerFundingRate": "-0.005",
                "isPreListing": False, "preListingInfo": None,
                "riskParameters": {"priceLimitRatioX": "0.03", "priceLimitRatioY": "0.05"},
                "displayName": display, "symbolType": "", "forbidUplWithdrawal": False,
                "symbolId": sid}


def _uuid(bits: int) -> str:
    h = "%032x" % bits
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{h[16:20]}-{h[20:]}"
