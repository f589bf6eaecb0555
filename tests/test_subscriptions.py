"""The subscription book on its own: the exchanges' own ACK and error frames, parsed by the real
adapters, drive it; time is passed in."""
from __future__ import annotations

import itertools

import ujson

from app.exchanges import Instrument, RowSink, create
from app.subscriptions import LIVE, PENDING, REJECTED, SubscriptionBook

binance, bybit, okx = create("binance"), create("bybit"), create("okx")


def _inst(adapter, symbol):
    return Instrument(adapter.NAME, symbol, "X-USDT-PERP", "X", "USDT", "live", "linear")


def _book(adapter, symbols, datasets=("bbo", "trades"), timeout=10.0, retries=2):
    streams = [st for sym in symbols for st in adapter.streams_for(_inst(adapter, sym), datasets)]
    ids = itertools.count(1)

    def next_id(n):
        first = next(ids)
        for _ in range(n - 1):
            next(ids)
        return first
    return SubscriptionBook(adapter, streams, now=0.0, ack_timeout=timeout, retries=retries,
                            next_request_id=next_id)


def _feed(book, adapter, payload, now):
    """A frame as the exchange sends it -> the adapter's Control -> the book."""
    ctrl = adapter.parse(("x", 1, 1, 0, payload.encode()), RowSink())
    if ctrl.kind == "ack":
        book.on_ack(ctrl.request_id, ctrl.keys, now)
    elif ctrl.kind == "error":
        return book.on_error(ctrl.request_id, ctrl.keys, ctrl.detail, now)
    return ctrl


def _args(text):
    return ujson.loads(text)["args"]


def test_bybit_whole_batch_failure_is_split_and_costs_only_the_bad_topic():
    book = _book(bybit, ["BTCUSDT", "ETHUSDT", "SOLUSDT"])
    (text, rid, keys), = book.take_due(0.0)
    assert len(keys) == 6 and book.counts()[PENDING] == 6
    bad = "orderbook.1.ETHUSDT"
    _feed(book, bybit, ujson.dumps({"success": False, "ret_msg": f"error:handler not found,topic:{bad}",
                                    "conn_id": "c", "req_id": str(rid), "op": "subscribe"}), 0.2)
    assert book.counts()[PENDING] == 6          # none subscribed: Bybit failed the whole request
    assert book.take_due(0.5) == []             # the split waits for its back-off
    singles = book.take_due(1.5)
    assert sorted(k for _t, _r, ks in singles for k in ks) == sorted(keys)
    assert all(len(ks) == 1 and _args(t) == list(ks) for t, _r, ks in singles)
    for _text, rid, (key,) in singles:
        if key == bad:
            _feed(book, bybit, ujson.dumps({"success": False, "ret_msg": f"error:handler not found,topic:{bad}",
                                            "conn_id": "c", "req_id": str(rid), "op": "subscribe"}), 2.0)
        else:
            _feed(book, bybit, ujson.dumps({"success": True, "ret_msg": "", "conn_id": "c",
                                            "req_id": str(rid), "op": "subscribe"}), 2.0)
    assert book.counts() == {"requested": 6, LIVE: 5, PENDING: 0, REJECTED: 1}
    snap = book.snapshot()
    assert snap[bad] == (REJECTED, f"subscribe: error:handler not found,topic:{bad}")
    events = book.take_events()
    names = [e for e, _f in events]
    assert names.count("subscription_rejected") == 1 and names.count("subscribed") == 1
    summary = dict(events)["subscribed"]
    assert summary["requested"] == 6 and summary["live"] == 5 and summary["rejected"] == 1
    assert book.take_due(100.0) == []           # nothing left to send, no timeouts


def test_okx_60018_without_arg_names_the_bad_arg_and_the_rest_stay_acknowledged():
    book = _book(okx, ["BTC-USDT-SWAP", "BAD-USDT-SWAP"])
    (text, rid, keys), = book.take_due(0.0)
    for arg in _args(text):
        if arg["instId"] == "BAD-USDT-SWAP" and arg["channel"] == "trades":
            msg = {"id": str(rid), "event": "error", "code": "60018", "connId": "c",
                   "msg": "Wrong URL or channel:trades,instId:BAD-USDT-SWAP doesn't exist. Please use "
                          "the correct URL, channel and parameters referring to API document."}
        else:
            msg = {"id": str(rid), "event": "subscribe", "arg": arg, "connId": "c"}
        _feed(book, okx, ujson.dumps(msg), 0.3)
    assert book.counts() == {"requested": 4, LIVE: 3, PENDING: 1, REJECTED: 0}
    (text2, rid2, keys2), = book.take_due(1.5)      # the bad arg alone, once more
    assert keys2 == ("trades:BAD-USDT-SWAP",)
    _feed(book, okx, ujson.dumps({"id": str(rid2), "event": "error", "code": "60018", "connId": "c",
                                  "msg": "Wrong URL or channel:trades,instId:BAD-USDT-SWAP doesn't exist."}), 2.0)
    assert book.snapshot()["trades:BAD-USDT-SWAP"][0] == REJECTED
    assert "60018" in book.snapshot()["trades:BAD-USDT-SWAP"][1]
    assert book.counts()[LIVE] == 3


def test_binance_wrapped_error_fails_the_request():
    book = _book(binance, ["BTCUSDT", "ETHUSDT"], datasets=("bbo",))
    (text, rid, keys), = book.take_due(0.0)
    assert ujson.loads(text)["method"] == "SUBSCRIBE"
    frame = ujson.dumps({"error": {"code": 2, "msg": "Invalid request: too many parameters"}, "id": rid})
    ctrl = binance.parse(("binance", 1, 1, 0, frame.encode()), RowSink())
    assert ctrl.kind == "error" and ctrl.request_id == rid and "too many parameters" in ctrl.detail
    assert _feed(book, binance, frame, 0.1) is True
    singles = book.take_due(1.1)
    assert sorted(k for _t, _r, ks in singles for k in ks) == sorted(keys)


def test_an_ack_that_never_comes_is_retried_then_reported():
    book = _book(okx, ["BTC-USDT-SWAP"], datasets=("bbo",), timeout=5.0, retries=1)
    assert len(book.take_due(0.0)) == 1
    assert book.take_due(4.9) == []
    assert book.take_due(5.0) == []               # timed out: re-sent after a back-off
    assert book.next_due() == 6.0
    (_t, _rid, keys), = book.take_due(6.0)
    assert keys == ("bbo-tbt:BTC-USDT-SWAP",)
    assert book.take_due(10.9) == []
    book.take_due(11.0)                           # second timeout: attempts exhausted
    status, reason = book.snapshot()["bbo-tbt:BTC-USDT-SWAP"]
    assert status == REJECTED and "no acknowledgement within 5 s (2 attempts)" == reason
    assert [e for e, _f in book.take_events()] == ["subscription_rejected", "subscribed"]


def test_data_before_the_ack_makes_a_stream_live():
    book = _book(bybit, ["BTCUSDT"], datasets=("bbo",))
    book.take_due(0.0)
    book.on_data({"orderbook.1.BTCUSDT": 5_000}, since_ns=10_000, now=0.1)
    assert book.counts()[PENDING] == 1            # data from before this socket opened: not proof
    book.on_data({"orderbook.1.BTCUSDT": 20_000}, since_ns=10_000, now=0.2)
    assert book.counts()[LIVE] == 1 and book.live_at["orderbook.1.BTCUSDT"] == 0.2


def test_bybit_already_subscribed_on_a_retry_is_an_ack():
    ctrl = bybit.parse(("bybit", 1, 1, 0, ujson.dumps(
        {"success": False, "ret_msg": "error:already subscribed,topic:orderbook.1.BTCUSDT", "conn_id": "c",
         "req_id": "7", "op": "subscribe"}).encode()), RowSink())
    assert ctrl.kind == "ack" and ctrl.request_id == 7


def test_okx_notice_is_recognised_from_the_raw_bytes():
    frame = b'{"event":"notice","code":"64008","msg":"The connection will soon be closed for a service upgrade. Please reconnect.","connId":"a4d3ae55"}'
    assert not frame.startswith(okx.URGENT_SCREEN)
    ctrl = okx.urgent_control(frame)
    assert ctrl.kind == "notice" and "64008" in ctrl.detail
    data = b'{"arg":{"channel":"bbo-tbt","instId":"BTC-USDT-SWAP"},"data":[{"asks":[],"bids":[],"ts":"1"}]}'
    assert data.startswith(okx.URGENT_SCREEN)        # data frames skip the look entirely
    assert okx.urgent_control(b'{"id":"3","event":"subscribe","arg":{"channel":"trades"}}') is None
    assert binance.urgent_control(frame) is None and bybit.urgent_control(frame) is None


def test_okx_one_arg_refused_and_the_other_acks_lost_are_retried_not_left_pending():
    """OKX refuses one arg (60018, no `arg`) and the ACKs of the other three never come: the
    request stays open for them, so its timeout re-sends them; nothing stays pending for ever."""
    book = _book(okx, ["BTC-USDT-SWAP", "BAD-USDT-SWAP"], timeout=5.0, retries=1)
    (text, rid, keys), = book.take_due(0.0)
    _feed(book, okx, ujson.dumps({"id": str(rid), "event": "error", "code": "60018", "connId": "c",
                                  "msg": "Wrong URL or channel:trades,instId:BAD-USDT-SWAP doesn't exist."}), 0.3)
    sent = book.take_due(1.3)                     # the refused arg alone, once more
    assert [ks for _t, _r, ks in sent] == [("trades:BAD-USDT-SWAP",)]
    assert book.take_due(5.0) == []               # the other three time out: re-sent after 1 s
    assert book.next_due() == 6.0
    resent = book.take_due(6.0)
    assert sorted(k for _t, _r, ks in resent for k in ks) == sorted(k for k in keys if k != "trades:BAD-USDT-SWAP")
    book.take_due(30.0)                           # attempts exhausted: reported, not pending
    assert book.counts() == {"requested": 4, LIVE: 0, PENDING: 0, REJECTED: 4}


def test_retry_backoff_doubles_up_to_its_cap():
    book = _book(okx, ["BTC-USDT-SWAP"], datasets=("bbo",), timeout=1.0, retries=8)
    now, waits = 0.0, []
    book.take_due(now)
    for _ in range(7):
        now += 1.0                                # the request times out
        assert book.take_due(now) == []
        waits.append(book.next_due() - now)
        now = book.next_due()
        assert len(book.take_due(now)) == 1
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_single_stream_refused_on_its_own_is_rejected_at_once():
    """A request that held one stream only already cost it alone: no second request."""
    book = _book(bybit, ["BTCUSDT"], datasets=("bbo",))
    (_text, rid, keys), = book.take_due(0.0)
    assert keys == ("orderbook.1.BTCUSDT",)
    _feed(book, bybit, ujson.dumps({"success": False, "ret_msg": "error:handler not found,topic:orderbook.1.BTCUSDT",
                                    "conn_id": "c", "req_id": str(rid), "op": "subscribe"}), 0.2)
    assert book.snapshot()["orderbook.1.BTCUSDT"][0] == REJECTED and book.take_due(5.0) == []


def test_a_rejected_stream_whose_data_arrives_is_live_again():
    book = _book(bybit, ["BTCUSDT"], datasets=("bbo",))
    (_text, rid, _keys), = book.take_due(0.0)
    _feed(book, bybit, ujson.dumps({"success": False, "ret_msg": "error:handler not found,topic:orderbook.1.BTCUSDT",
                                    "conn_id": "c", "req_id": str(rid), "op": "subscribe"}), 0.2)
    assert book.counts()[REJECTED] == 1
    book.take_events()
    book.on_data({"orderbook.1.BTCUSDT": 20_000}, since_ns=10_000, now=3.0)
    assert book.snapshot()["orderbook.1.BTCUSDT"][0] == LIVE
    assert ("subscription_recovered", {"stream": "orderbook.1.BTCUSDT"}) in book.take_events()


def test_a_retry_sends_only_what_is_still_pending():
    book = _book(bybit, ["BTCUSDT"], datasets=("bbo", "trades"), timeout=5.0)
    (_t, _rid, keys), = book.take_due(0.0)
    assert sorted(keys) == ["orderbook.1.BTCUSDT", "publicTrade.BTCUSDT"]
    assert book.take_due(5.0) == []               # no answer: re-sent at 6 s
    book.on_data({"publicTrade.BTCUSDT": 20_000}, since_ns=10_000, now=5.5)    # its data came meanwhile
    (_t, _rid, again), = book.take_due(6.0)
    assert again == ("orderbook.1.BTCUSDT",)
