"""The socket-thread -> writer hand-off: a queue bounded in frames, drops counted per frame."""
from app.handoff import Frame, FrameQueue, Stamps, from_items, items_at


def stamped(conn_id: int, seqs) -> Stamps:
    st = Stamps("binance", conn_id)
    for s in seqs:
        st.recv_seq.append(s)
        st.ts_recv.append(1_000 + s)
        st.payloads.append(b'{"n":%d}' % s)
    return st


def test_offer_takes_what_fits_in_order_and_counts_the_rest():
    q = FrameQueue(maxsize=5)
    assert q.offer(stamped(1, [1, 2, 3]).take()) == 0
    assert q.offer(stamped(2, [4, 5, 6, 7]).take()) == 2       # room for 2 of 4
    assert q.qsize() == 5 and q.full()
    assert q.offer(stamped(1, [8]).take()) == 1                 # full: the whole batch dropped
    batches = q.take_all()
    assert [list(b.recv_seq) for b in batches] == [[1, 2, 3], [4, 5]]
    assert [b.payloads[-1] for b in batches] == [b'{"n":3}', b'{"n":5}']
    assert q.qsize() == 0 and q.take_all() is None
    assert q.offer(stamped(1, [9]).take()) == 0                 # room again after the writer took all


def test_stamps_start_afresh_after_take():
    st = stamped(3, [1, 2])
    first = st.take()
    assert st.take() is None
    st.recv_seq.append(3), st.ts_recv.append(1_003), st.payloads.append(b"x")
    assert list(st.take().recv_seq) == [3] and list(first.recv_seq) == [1, 2]


def test_items_at_maps_chunk_positions_back_to_frames():
    items = [("okx", 1 + i // 3, 10 + i, 100 + i, b"p%d" % i) for i in range(8)]   # 3 batches
    batches = from_items(items)
    assert len(batches) == 3
    assert items_at(batches, [0, 2, 3, 7]) == [items[0], items[2], items[3], items[7]]
    assert items_at(batches, range(8)) == items


def test_a_frame_has_names_and_still_unpacks_as_the_adapters_do():
    """The adapters' `parse(frame, sink)` unpacks its frame as a 5-tuple: the field order of
    Frame is that contract; the writer reads the fields by name."""
    batches = from_items([Frame("bybit", 4, 9, 1_009, b"x"), ("bybit", 4, 10, 1_010, b"y")])
    f = items_at(batches, [1])[0]
    assert isinstance(f, Frame)
    assert (f.exchange, f.conn_id, f.recv_seq, f.ts_recv, f.payload) == ("bybit", 4, 10, 1_010, b"y")
    _, conn_id, recv_seq, ts_recv, payload = f
    assert (conn_id, recv_seq, ts_recv, payload) == (4, 10, 1_010, b"y")
