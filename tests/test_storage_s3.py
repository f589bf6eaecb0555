"""S3 storage against a real S3-protocol server on loopback (moto's ThreadedMotoServer; no
boto3 mocks): keys and bytes, multipart, delete-after-confirm, restart, outage, disk budget,
start-up errors through bin/collector, and simulator -> collector -> bucket end to end.

The outage lasts S3_OUTAGE_SECONDS (default 10 here; the issue's scenario is 30 s:
`S3_OUTAGE_SECONDS=30 pytest tests/test_storage_s3.py -k outage`).
"""
from __future__ import annotations

import glob
import logging
import os
import threading
import time

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from app import settings as settings_mod, writer as writer_mod
from app.exchanges import create
from app.state import State
from app.storage_s3 import S3Storage
from app.handoff import FrameQueue, from_items
from tests.helpers import CollectorProcess, settle, sim_env, sim_quiet_baseline, wait_until
from tests.s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

OUTAGE_S = float(os.environ.get("S3_OUTAGE_SECONDS", "10"))
MiB = 1024 * 1024
BOOK = (b'{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":%d,"s":"BTCUSDT","b":"100.1",'
        b'"B":"1","a":"100.2","A":"2","T":1700000000000,"E":1700000000001}}')


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    srv = S3Server()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def own_s3():
    """A server of its own, for tests that take it down."""
    srv = S3Server()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


class Events(logging.Handler):
    """The JSON log events of this process (event name + fields), for assertions."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def named(self, event: str) -> list[dict]:
        return [r.__dict__ for r in list(self.records) if r.getMessage() == event]


@pytest.fixture
def events():
    logger = logging.getLogger("collector")
    h = Events()
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(h)
    yield h
    logger.removeHandler(h)
    logger.setLevel(old)


def make_storage(tmp_path, srv, bucket, prefix="pfx", **over):
    s = settings_mod.load(None, environ={}, dotenv_path=str(tmp_path / ".env")).replace(
        data_dir=str(tmp_path / "data"), storage_backend="s3", s3_endpoint=srv.endpoint,
        s3_bucket=bucket, s3_prefix=prefix, s3_region=REGION, upload_retry_min=0.2,
        upload_retry_max=1.0, exchanges=["binance"], **over)
    os.makedirs(s.data_dir, exist_ok=True)
    state = State(exchanges=["binance", "bybit", "okx"])
    return S3Storage(s, state), state


def put_local(storage, rel: str, size: int, mtime: float | None = None) -> tuple[str, bytes]:
    path = os.path.join(storage.data_dir, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    body = os.urandom(size)
    with open(path, "wb") as f:
        f.write(body)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path, body


def raw_key(i: int, dataset="bbo", exchange="binance", date="2024-05-01") -> str:
    return f"raw/v1/{dataset}/{exchange}/date={date}/i-test-RUN-{i:06d}.parquet"


def local_parquet(data_dir: str) -> list[str]:
    return [p for top in ("raw", "reference")
            for p in glob.glob(os.path.join(data_dir, top, "**", "*.parquet"), recursive=True)]


class ListPoller(threading.Thread):
    """Lists the bucket continuously: every object ever listed must have its final size, and a
    file missing locally must already be listed (local copies go only after confirmation)."""

    def __init__(self, srv, bucket, sizes: dict[str, int], paths: dict[str, str]):
        super().__init__(daemon=True)
        self.srv, self.bucket, self.sizes, self.paths = srv, bucket, sizes, paths
        self.bad: list = []
        self.polls = 0
        self.seen: set[str] = set()
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            gone = {k for k, p in self.paths.items() if not os.path.exists(p)}
            try:
                listed = self.srv.objects(self.bucket)
            except Exception:          # server down during an outage
                time.sleep(0.05)       # the poller's retry interval (it polls, it does not sync)
                continue
            self.polls += 1
            self.seen |= set(listed)
            for k, size in listed.items():
                if self.sizes.get(k) != size:
                    self.bad.append(("partial or unexpected", k, size, self.sizes.get(k)))
            for k in gone - set(listed):
                self.bad.append(("deleted locally before visible", k))
            time.sleep(0.01)           # the polling interval: the poller is the observer under test

    def stop(self):
        self.halt.set()
        self.join(10)
        return self


# ---- in-process ----------------------------------------------------------------------------
def test_publish_exact_keys_bytes_and_counters(tmp_path, s3, events):
    bucket = s3.new_bucket()
    st, state = make_storage(tmp_path, s3, bucket, prefix="/team/ql/")
    st.check()
    st.start()
    bodies = {}
    rels = [raw_key(1), raw_key(2, "trades"), raw_key(3, "frames", "bybit"),
            raw_key(4, "mark_price", "okx", "2024-05-02"),
            "reference/okx/instruments-20240501T000000Z-test.parquet"]
    for i, rel in enumerate(rels):
        path, body = put_local(st, rel, 1000 + i)
        bodies[rel] = body
        st.publish(path, rel)
    st.stop(timeout=30)
    objs = s3.objects(bucket)
    assert objs == {f"team/ql/{rel}": len(b) for rel, b in bodies.items()}
    c = s3.client()
    for rel, body in bodies.items():
        assert c.get_object(Bucket=bucket, Key=f"team/ql/{rel}")["Body"].read() == body
    assert local_parquet(st.data_dir) == []
    assert state.total("files_uploaded") == 5 and state.total("upload_failures") == 0
    assert state.total("bytes_uploaded") == sum(map(len, bodies.values()))
    assert state.total("files_uploaded", "okx", "reference") == 1
    assert state.total("files_uploaded", "bybit", "frames") == 1
    assert state.upload_backlog == {"files": 0, "bytes": 0, "oldest_age_s": 0.0}
    up = events.named("file_uploaded")
    assert sorted(e["key"] for e in up) == sorted(objs)
    assert all(e["bytes"] > 0 and e["seconds"] >= 0 for e in up)
    assert events.named("upload_drained")


def test_multipart_above_threshold_never_partially_visible(tmp_path, s3):
    bucket = s3.new_bucket()
    st, state = make_storage(tmp_path, s3, bucket, prefix="", s3_multipart_threshold=1 * MiB,
                             s3_multipart_chunksize=5 * MiB, upload_concurrency=3)
    st.start()
    sizes_local = {raw_key(1): 12 * MiB, raw_key(2): 11 * MiB, raw_key(3): 200_000,
                   raw_key(4): 6 * MiB, raw_key(5): 1 * MiB}
    files = {rel: put_local(st, rel, n) for rel, n in sizes_local.items()}
    poller = ListPoller(s3, bucket, sizes_local, {rel: p for rel, (p, _) in files.items()})
    poller.start()
    for rel, (path, _) in files.items():
        st.publish(path, rel)
    wait_until(lambda: state.upload_backlog["files"] == 0, 60, what="uploads")
    polls = poller.polls                         # let the poller list the final state twice more
    wait_until(lambda: poller.polls >= polls + 2, 10, interval=0.01, what="two more listings")
    poller.stop()
    st.stop(timeout=10)
    assert poller.bad == [] and poller.polls > 3
    assert s3.objects(bucket) == sizes_local
    counts = s3.request_counts(bucket)
    for rel, n in sizes_local.items():
        if n >= 1 * MiB:
            parts = -(-n // (5 * MiB))
            assert (counts[("create", rel)], counts[("part", rel)], counts[("complete", rel)],
                    counts[("put", rel)]) == (1, parts, 1, 0), rel
        else:
            assert counts[("put", rel)] == 1 and counts[("create", rel)] == 0, rel
    c = s3.client()
    for rel, (_, body) in files.items():
        assert c.get_object(Bucket=bucket, Key=rel)["Body"].read() == body
    assert local_parquet(st.data_dir) == []


class TamperingS3(S3Server):
    """A store that, once per key, changes what it holds right after storing a single PUT and
    before answering it: the upload succeeds, and what the uploader then finds under the key is
    not what it sent. `how`: "missing" (the object is deleted), "short" (100 bytes shorter),
    "other_bytes" (same size, other bytes: only the MD5 ETag differs). Retries of the key are
    stored as sent. The tampering goes through the S3 API of this same server, under its own
    access key, so it is neither logged nor tampered with itself. For every request on a key in
    `watch` (key -> local path), it notes whether the uploader's local copy still existed."""

    TAMPER_KEY = "AKIDTESTQUANTLABTAMP"

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.tampered: set[str] = set()
        self.watch: dict[str, str] = {}
        self.seen: list[tuple[str, str, bool]] = []        # (method, key, local copy exists)

    def _wsgi(self, environ, start_response):
        if f"Credential={self.TAMPER_KEY}/" in environ.get("HTTP_AUTHORIZATION", ""):
            return self._app(environ, start_response)
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        bucket, _, key = path.lstrip("/").partition("/")
        if key in self.watch:
            self.seen.append((method, key, os.path.exists(self.watch[key])))
        response = super()._wsgi(environ, start_response)    # moto has stored the object now
        single_put = method == "PUT" and "uploadId=" not in environ.get("QUERY_STRING", "")
        if single_put and key and key not in self.tampered:
            self.tampered.add(key)
            c = self.client(key=self.TAMPER_KEY)
            body = c.get_object(Bucket=bucket, Key=key)["Body"].read()
            if self.how == "missing":
                c.delete_object(Bucket=bucket, Key=key)
            elif self.how == "short":
                c.put_object(Bucket=bucket, Key=key, Body=body[:-100])
            else:
                c.put_object(Bucket=bucket, Key=key, Body=bytes(b ^ 0xFF for b in body))
        return response


@pytest.mark.parametrize("how", ["missing", "short", "other_bytes"])
def test_unconfirmed_upload_keeps_the_local_copy_and_is_retried(tmp_path, events, how):
    """The store answers the PUT, but HEAD finds the object missing, shorter, or with another
    ETag: the upload does not count, the local file stays, and the next attempt uploads it
    again (the retry HEADs first and does not trust what is there); only then is it deleted."""
    srv = TamperingS3(how)
    srv.start()
    try:
        bucket = srv.new_bucket()
        st, state = make_storage(tmp_path, srv, bucket, upload_concurrency=1)
        st.start()
        rel = raw_key(1)
        okey = f"pfx/{rel}"
        path, body = put_local(st, rel, 5000)
        srv.watch[okey] = path
        st.publish(path, rel)
        wait_until(lambda: events.named("file_uploaded"), 20, what="file_uploaded")
        st.stop(timeout=10)
        srv.watch.clear()                        # what follows are the test's own reads
        stored = srv.client().get_object(Bucket=bucket, Key=okey)["Body"].read()
        counts = srv.request_counts(bucket)
    finally:
        srv.stop()
    assert srv.tampered == {okey}
    failed = events.named("upload_failed")
    assert [(e["object"], e["attempt"]) for e in failed] == [(okey, 1)]
    expect = {"missing": "404", "short": "size 4900 in the store, 5000 local",
              "other_bytes": "ETag "}[how]
    assert expect in failed[0]["reason"], failed[0]["reason"]
    assert state.total("upload_failures") == 1
    # the local copy was there for every request of both attempts: PUT, HEAD, HEAD (the retry's
    # check, which found the wrong object), PUT, HEAD
    assert [(m, there) for m, _k, there in srv.seen] == [
        ("PUT", True), ("HEAD", True), ("HEAD", True), ("PUT", True), ("HEAD", True)]
    assert counts[("put", okey)] == 2
    (up,) = events.named("file_uploaded")
    assert (up["key"], up["attempts"], up["already_there"]) == (okey, 2, False)
    assert stored == body                        # the store holds exactly the local bytes
    assert not os.path.exists(path)              # deleted once confirmed
    assert state.total("files_uploaded") == 1 and state.upload_backlog["files"] == 0


def test_restart_uploads_leftovers_oldest_first(tmp_path, s3, events):
    bucket = s3.new_bucket()
    st, state = make_storage(tmp_path, s3, bucket, upload_concurrency=1)
    now = time.time()
    rels = [raw_key(i) for i in range(1, 5)] + ["reference/binance/instruments-x-test.parquet"]
    ages = [50, 10, 40, 20, 30]                              # seconds old
    for rel, age in zip(rels, ages):
        # the 4th was left by a run of the first layout (exchange=<x>): it goes up under the
        # current layout's key, so an outage across the upgrade leaves no old-layout keys
        local = rel.replace("/binance/", "/exchange=binance/") if rel == raw_key(4) else rel
        put_local(st, local, 500, mtime=now - age)
    # torn temporary file and writer spool are not uploads
    tmp = os.path.join(st.data_dir, os.path.dirname(raw_key(1)), ".x.parquet.tmp")
    open(tmp, "wb").close()
    os.makedirs(os.path.join(st.data_dir, "spool"), exist_ok=True)
    open(os.path.join(st.data_dir, "spool", "bbo~binance~2024-05-01~t~R~000001.arrows"), "wb").close()
    # a previous run's upload landed but its confirmation was lost: not sent again
    with open(os.path.join(st.data_dir, rels[2]), "rb") as f:
        s3.client().put_object(Bucket=bucket, Key=f"pfx/{rels[2]}", Body=f.read())
    st.start()
    wait_until(lambda: state.upload_backlog["files"] == 0, 30, what="leftovers uploaded")
    st.stop(timeout=10)
    assert set(s3.objects(bucket)) == {f"pfx/{r}" for r in rels}
    order = [e["key"] for e in events.named("file_uploaded")]
    expect = [f"pfx/{r}" for _, r in sorted(zip(ages, rels), reverse=True)]
    assert order == expect
    counts = s3.request_counts(bucket)
    assert [counts[("put", f"pfx/{r}")] for r in rels] == [1] * 5
    assert [e["already_there"] for e in events.named("file_uploaded") if e["key"] == f"pfx/{rels[2]}"] == [True]
    assert events.named("upload_backlog_found")[0]["files"] == 5
    assert local_parquet(st.data_dir) == [] and os.path.exists(tmp)


def test_outage_keeps_files_and_resumes_in_order(tmp_path, own_s3, events):
    srv = own_s3
    bucket = srv.new_bucket()
    st, state = make_storage(tmp_path, srv, bucket, upload_concurrency=2,
                             s3_multipart_threshold=1 * MiB, s3_multipart_chunksize=5 * MiB)
    st.check()
    st.start()
    before = [raw_key(i) for i in range(1, 4)]
    for rel in before:
        st.publish(put_local(st, rel, 2000)[0], rel)
    wait_until(lambda: state.upload_backlog["files"] == 0, 20, what="uploads before the outage")
    srv.stop()
    t_down = time.monotonic()
    sizes, paths = {}, {}
    i = 10
    while time.monotonic() - t_down < OUTAGE_S:
        rel = raw_key(i, "trades")
        size = 6 * MiB if i % 4 == 0 else 3000 + i       # some multipart, some single PUT
        paths[rel] = put_local(st, rel, size)[0]
        sizes[rel] = size
        st.publish(paths[rel], rel)
        i += 1
        time.sleep(min(1.0, OUTAGE_S / 10))     # the outage lasts OUTAGE_S: time passing is the point
    # during the outage: everything is still local, counted in the backlog, failures logged
    assert all(os.path.exists(p) for p in paths.values())
    bl = state.upload_backlog
    assert bl["files"] == len(paths) and bl["bytes"] == sum(sizes.values())
    assert bl["oldest_age_s"] >= OUTAGE_S * 0.5
    assert state.spool_usage["bytes"] >= bl["bytes"]
    failures = state.total("upload_failures")
    assert failures >= 1
    # a probe per back-off interval, not a storm: at most ~1 attempt per retry_min..max
    assert failures <= 2 + OUTAGE_S / 0.2
    logged = events.named("upload_failed")
    assert 1 <= len(logged) <= OUTAGE_S / 10 + 2
    assert all(e["reason"] for e in logged)
    assert st.accepting()
    srv.start()                                              # same port
    t_up = time.monotonic()
    poller = ListPoller(srv, bucket, {**{f"pfx/{r}": 2000 for r in before},
                                      **{f"pfx/{k}": v for k, v in sizes.items()}},
                        {f"pfx/{k}": p for k, p in paths.items()})
    poller.start()
    wait_until(lambda: state.upload_backlog["files"] == 0, 30, what="backlog drained")
    resumed_in = time.monotonic() - t_up
    poller.stop()
    st.stop(timeout=10)
    assert poller.bad == []
    objs = srv.objects(bucket)
    assert objs == {**{f"pfx/{r}": 2000 for r in before}, **{f"pfx/{k}": v for k, v in sizes.items()}}
    counts = srv.request_counts(bucket)
    for k, v in sizes.items():        # exactly one complete upload per file: none twice
        assert counts[("put", f"pfx/{k}")] + counts[("complete", f"pfx/{k}")] == 1, k
    assert state.upload_backlog == {"files": 0, "bytes": 0, "oldest_age_s": 0.0}
    assert local_parquet(st.data_dir) == []
    assert events.named("upload_resumed")
    # oldest first: the first file uploaded after the outage is the oldest one
    after = [e["key"] for e in events.named("file_uploaded")][len(before):]
    assert after[0] == f"pfx/{raw_key(10, 'trades')}"
    assert resumed_in < 10, resumed_in


@pytest.mark.parametrize("cleared_by", ["reprobe", "upload"])
def test_store_down_at_start_is_cleared_when_it_answers(tmp_path, own_s3, events, monkeypatch, cleared_by):
    """The store is down at start: a problem, not an error. It clears by either path alone: the
    re-probe (every RECHECK_S, on its own thread; nothing to upload, so nothing else would), or
    the first confirmed upload (re-probe far off)."""
    from app import storage_s3
    monkeypatch.setattr(storage_s3, "RECHECK_S", 0.5 if cleared_by == "reprobe" else 3600.0)
    bucket = own_s3.new_bucket()
    own_s3.stop()
    st, state = make_storage(tmp_path, own_s3, bucket)
    st.check()
    assert state.storage_problem["kind"] == "unreachable"
    st.start()
    try:
        own_s3.start()
        if cleared_by == "upload":
            rel = raw_key(1)
            st.publish(put_local(st, rel, 1000)[0], rel)
        wait_until(lambda: state.storage_problem is None, 30, what=f"the problem cleared by the {cleared_by}")
        assert events.named("storage_available")
        if cleared_by == "upload":
            assert own_s3.objects(bucket) == {f"pfx/{raw_key(1)}": 1000}
        else:
            assert state.upload_backlog["files"] == 0 and not events.named("file_uploaded")
    finally:
        st.stop(timeout=10)


def test_spool_budget_degrades_then_drops_new_rows_never_files(tmp_path, own_s3, events):
    srv = own_s3
    bucket = srv.new_bucket()
    st, state = make_storage(tmp_path, srv, bucket, spool_max_bytes=100_000, upload_concurrency=1)
    srv.stop()                                               # the store is down from the start
    st.start()
    paths = []
    for i in range(9):
        rel = raw_key(i + 1)
        paths.append(put_local(st, rel, 10_000)[0])
        st.publish(paths[-1], rel)
    wait_until(lambda: state.spool_usage["near_full"], 5, what="near full")
    assert state.spool_usage["ratio"] >= 0.9 and st.accepting()
    assert events.named("spool_near_full")
    rel = raw_key(10)
    paths.append(put_local(st, rel, 10_000)[0])
    st.publish(paths[-1], rel)
    wait_until(lambda: not st.accepting(), 5, what="spool full")
    assert state.spool_usage["full"] and events.named("spool_full")
    # the writer drops (and counts) new data; spooled files stay
    q = FrameQueue()
    w = writer_mod.Writer(st.settings, q, state, st, {"binance": create("binance")},
                          on_control=lambda *a: None, run_id="RUN", version="t")
    now = time.time_ns()
    w.process(from_items([("binance", 1, n, now + n, BOOK % n) for n in range(1, 8)]))
    w.flush()
    assert state.total("frames_dropped_spool_full", "binance") == 7
    assert state.total("rows_written", "binance") == 0
    assert not glob.glob(os.path.join(st.data_dir, "spool", "*.arrows"))
    assert all(os.path.exists(p) for p in paths)
    # the store comes back: the backlog drains, new data is accepted again
    srv.start()
    wait_until(lambda: state.upload_backlog["files"] == 0, 30, what="drained")
    wait_until(lambda: st.accepting() and not state.spool_usage["near_full"], 5, what="accepting")
    assert events.named("spool_accepting") and events.named("spool_ok")
    w.process(from_items([("binance", 1, n, now + n, BOOK % n) for n in range(8, 11)]))
    w.flush()
    assert state.total("rows_written", "binance", "bbo") == 3
    st.stop(timeout=10)
    assert len(srv.objects(bucket)) == 10


# ---- bin/collector: start-up errors --------------------------------------------------------
SECRET = "Sup3rSecret-QUANTLAB-must-never-be-printed"


def _dead_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _start_bad(tmp_path, name, env) -> CollectorProcess:
    dead = f"http://127.0.0.1:{_dead_port()}"
    base = {"EXCHANGES": "binance", "BINANCE_REST_URL": dead, "BINANCE_WS_URL": dead.replace("http", "ws"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "nocreds"), "AWS_CONFIG_FILE": str(tmp_path / "noconf")}
    base.update(env)
    wd = tmp_path / name
    wd.mkdir()
    return CollectorProcess(wd, base).start()


def _assert_exit2(c: CollectorProcess, setting: str):
    rc = c.wait(60)                              # exit, and all of its output read
    out = "".join(c.raw)
    assert rc == 2, out
    assert f"invalid setting {setting}:" in out, out
    assert [l for l in c.lines if l.get("event") == "startup_failed" and l.get("setting") == setting], out
    assert SECRET not in out
    return out


def _assert_degraded_naming(c: CollectorProcess, setting: str) -> str:
    """The store refused or did not answer: recording goes on, the reason names the setting."""
    line = c.wait_for("storage_unavailable", timeout=60)[0]
    assert line["setting"] == setting, line
    out = "".join(c.raw)
    assert c.proc.poll() is None, out
    assert SECRET not in out
    c.stop(timeout=60)
    return line["reason"]


def test_store_problems_are_reported_but_never_stop_the_recording(tmp_path, s3):
    """Only a credentials setup that cannot work stops the start (exit 2, one line naming it);
    what the store says (no such bucket, unknown key, wrong secret, unreachable) is DEGRADED
    with the setting to look at, and the collector keeps recording to its spool."""
    from moto.core.authorization import enable_iam_authentication
    bucket = s3.new_bucket()
    good = {**s3.env(bucket), "AWS_SECRET_ACCESS_KEY": SECRET, "UPLOAD_STOP_TIMEOUT": "1"}
    no_creds = {k: v for k, v in good.items() if not k.startswith("AWS_")}
    no_creds.update({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    _assert_exit2(_start_bad(tmp_path, "nocreds", no_creds), "AWS_ACCESS_KEY_ID")
    procs = {
        "s3_bucket": _start_bad(tmp_path, "bucket", {**good, "S3_BUCKET": "no-such-bucket-ql"}),
        "s3_endpoint": _start_bad(tmp_path, "endpoint", {**good, "S3_ENDPOINT": f"http://127.0.0.1:{_dead_port()}"}),
    }
    for setting, c in procs.items():
        reason = _assert_degraded_naming(c, setting)
        if setting == "s3_bucket":
            assert "no-such-bucket-ql" in reason
    # with IAM authentication on: an unknown key, then a known key with a wrong secret
    import boto3
    iam = boto3.client("iam", endpoint_url=s3.endpoint, region_name=REGION,
                       aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    user = f"ql-{bucket[-6:]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"]
    with enable_iam_authentication():
        procs = {
            "AWS_ACCESS_KEY_ID": _start_bad(tmp_path, "badkey", {**good, "AWS_ACCESS_KEY_ID": "AKIDUNKNOWN000000000"}),
            "AWS_SECRET_ACCESS_KEY": _start_bad(tmp_path, "badsecret", {**good, "AWS_ACCESS_KEY_ID": key}),
        }
        for setting, c in procs.items():
            _assert_degraded_naming(c, setting)


# ---- end to end: simulator -> bin/collector -> bucket --------------------------------------
@pytest.fixture
def sim():
    from sim import Simulator
    s = Simulator(exchanges=("binance",), rate=40.0, seed=11, cadence_scale=0.2)
    s.start()
    yield s
    s.stop()


def test_e2e_simulator_to_bucket(tmp_path, s3, sim):
    bucket = s3.new_bucket()
    prefix = "e2e/run1"
    env = {**sim_env(sim, ("binance",)), **s3.env(bucket, prefix),
           "EXCHANGES": "binance", "SYMBOLS": "BTCUSDT,ETHUSDT", "FLUSH_INTERVAL": "0.5",
           "ROTATE_INTERVAL": "3", "UPLOAD_RETRY_MIN": "0.2", "UPLOAD_RETRY_MAX": "1"}
    with CollectorProcess(tmp_path, env) as c:
        c.wait_for("subscribed", timeout=30)
        c.wait_for("file_uploaded", lambda l: "/raw/v1/bbo/" in l["key"], timeout=30)
        wait_until(lambda: all(sim.stats()["binance"]["rows"][ds] > 0 for ds in ("bbo", "trades", "mark_price", "funding")),
                   20, what="rows of every dataset sent")
        settle(c, sim)
        assert c.stop() == 0
    written = {os.path.relpath(l["path"], c.data_dir) for l in c.events("file_written")}
    uploaded = [l["key"] for l in c.events("file_uploaded")]
    assert len(uploaded) == len(set(uploaded))
    objs = s3.objects(bucket)
    assert set(objs) == set(uploaded)
    raw_objs = {k for k in objs if k.startswith(f"{prefix}/raw/")}
    assert raw_objs == {f"{prefix}/{w}" for w in written}
    assert any(k.startswith(f"{prefix}/reference/binance/") for k in objs)
    # the bucket reads back with pyarrow exactly what the simulator sent
    fs = pafs.S3FileSystem(endpoint_override=s3.endpoint.replace("http://", ""), scheme="http",
                           access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION)
    sent = sim.stats()["binance"]["rows"]
    for ds in ("bbo", "trades", "mark_price", "funding"):
        assert sent[ds] > 0, ds
        t = pads.dataset(f"{bucket}/{prefix}/raw/v1/{ds}", filesystem=fs, format="parquet",
                         partitioning="hive").to_table()
        assert t.num_rows == sent[ds], ds
        assert set(t.column("exchange").to_pylist()) == {"binance"}
    for k in raw_objs:
        meta = pq.read_schema(f"{bucket}/{k}", filesystem=fs).metadata
        assert meta[b"schema_version"] == b"1"
    # the local spool is empty
    assert local_parquet(c.data_dir) == []
    assert not glob.glob(os.path.join(c.data_dir, "spool", "*.arrows"))
    stop = c.events("collector_stop")[-1]["counters"]["binance"]
    assert sum(stop["files_uploaded"].values()) == len(objs)
    assert c.events("upload_drained")


def test_e2e_store_down_at_stop_next_run_uploads_the_rest(tmp_path, own_s3, sim):
    """SIGTERM during an outage: exit 0 within upload_stop_timeout, the files stay in the
    spool; the next run (store back) uploads them; the bucket then holds every row sent."""
    srv = own_s3
    bucket = srv.new_bucket()
    prefix = "e2e/restart"
    env = {**sim_env(sim, ("binance",)), **srv.env(bucket, prefix),
           "EXCHANGES": "binance", "SYMBOLS": "BTCUSDT", "FLUSH_INTERVAL": "0.5",
           "ROTATE_INTERVAL": "2", "UPLOAD_RETRY_MIN": "0.2", "UPLOAD_RETRY_MAX": "1",
           "UPLOAD_STOP_TIMEOUT": "2"}
    with CollectorProcess(tmp_path, env) as c1:
        c1.wait_for("file_uploaded", lambda l: "/raw/v1/" in l["key"], timeout=30)
        srv.stop()
        c1.wait_for("upload_failed", timeout=10)
        c1.wait_for("file_written", count=len(c1.events("file_written")) + 1, timeout=10)
        settle(c1, sim)
        t0 = time.monotonic()
        assert c1.stop() == 0
        assert time.monotonic() - t0 < 20
    left = c1.events("upload_incomplete_at_stop")
    assert left and left[-1]["files_left"] > 0, "".join(c1.raw[-20:])
    spooled = {os.path.relpath(p, c1.data_dir) for p in local_parquet(c1.data_dir)}
    assert len(spooled) == left[-1]["files_left"]
    assert set(left[-1]["keys"]) == spooled          # named by their path under data_dir
    spooled_sizes = {f"{prefix}/{k}": os.path.getsize(os.path.join(c1.data_dir, k)) for k in spooled}
    srv.start()
    stored_whole = {k for k, size in srv.objects(bucket).items() if spooled_sizes.get(k) == size}
    first_run_requests = len(srv.requests)
    since = sim_quiet_baseline(sim)
    with CollectorProcess(tmp_path, env) as c2:
        found = c2.wait_for("upload_backlog_found", timeout=30)[0]
        assert found["files"] == len(spooled)
        c2.wait_for("subscribed", timeout=30)
        sim.resume("binance")
        c2.wait_for("file_uploaded", lambda l: all(os.path.exists(os.path.join(c1.data_dir, k)) is False
                                                   for k in spooled), timeout=30)
        n = sim.stats()["binance"]["rows"]["trades"]
        wait_until(lambda: sim.stats()["binance"]["rows"]["trades"] > n + 10, 20, what="trades in run 2")
        settle(c2, sim, since=since)
        assert c2.stop() == 0
    objs = srv.objects(bucket)
    assert {f"{prefix}/{k}" for k in spooled} <= set(objs)
    written = {os.path.relpath(l["path"], c1.data_dir) for c in (c1, c2) for l in c.events("file_written")}
    assert {k for k in objs if "/raw/" in k} == {f"{prefix}/{w}" for w in written}
    assert local_parquet(c1.data_dir) == []
    fs = pafs.S3FileSystem(endpoint_override=srv.endpoint.replace("http://", ""), scheme="http",
                           access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION)
    sent = sim.stats()["binance"]["rows"]
    for ds in ("bbo", "trades"):
        t = pads.dataset(f"{bucket}/{prefix}/raw/v1/{ds}", filesystem=fs, format="parquet",
                         partitioning="hive").to_table()
        assert t.num_rows == sent[ds], ds
    # Each run uploads a file at most once, and the restart never re-uploads a file the outage
    # left stored whole (HEAD first). A spooled file whose upload the outage cut mid-request
    # (the server saw the PUT, the object is missing or short) is uploaded again: that is right.
    runs = [srv.request_counts(bucket, srv.requests[:first_run_requests]),
            srv.request_counts(bucket, srv.requests[first_run_requests:])]
    uploads = {k: [c[("put", k)] + c[("complete", k)] for c in runs] for k in objs}
    assert all(max(n) <= 1 and sum(n) >= 1 for n in uploads.values()), uploads
    assert all(uploads[k][1] == 0 for k in stored_whole), (stored_whole, uploads)
    assert all(sum(n) == 1 for k, n in uploads.items() if k not in spooled_sizes), uploads
