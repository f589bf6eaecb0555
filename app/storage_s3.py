"""S3 storage: every finished Parquet file is uploaded to an S3-compatible bucket, then deleted
locally. data_dir is the spool: a file stays there until the store has confirmed it.

Why it is built this way:

* Visibility. A file is sent with boto3's transfer manager (s3transfer): one PUT below
  `s3_multipart_threshold`, a multipart upload above it. S3 shows an object only when the PUT
  or the CompleteMultipartUpload has succeeded, so a reader never sees part of a file.
* Integrity. After the upload, HEAD the object: its size must equal the local size and (with
  `s3_verify = etag`) its ETag must equal the MD5 ETag computed locally (single PUT: MD5 of the
  file; multipart: MD5 of the parts' MD5s + "-N", with the part size s3transfer uses). Only then
  is the local copy removed. The ETag check is end to end (it covers what the server stored),
  which is why, against a custom `s3_endpoint`, the SDK's own default CRC checksums are turned
  down to "when required": many S3-compatible stores reject them, and nothing is lost.
* Outages. Uploads run on `upload_concurrency` worker threads sharing one transfer manager
  (whose request concurrency is bounded by the same number). A failed upload goes back to the
  backlog in its place (oldest first) and the store is backed off for upload_retry_min,
  doubling up to upload_retry_max; while backed off, one worker probes with the oldest file and
  the others wait, so a dead store costs one request per interval and recovery resumes in order
  with no operator action. Files are never retried by name twice at once (a key is pending or
  in flight, never both).
* Restart. `start()` puts every `*.parquet` already under data_dir/raw and data_dir/reference
  (what a previous run could not upload) into the backlog, oldest first.
* At most once per file where it can be known: a retried file, or one left by a previous run,
  may already be in the store (the PUT landed, the confirmation was lost); such a file is
  HEADed first and, if the store holds exactly these bytes, not sent again.
* Disk budget. The spool (backlog files + the writer's open spool files) is measured every
  second against `spool_max_bytes`: at >= `degraded_spool_ratio` (90 %)
  `state.spool_usage["near_full"]` is set and logged (the state machine reports DEGRADED); at 100 % `accepting()` turns False and the
  writer drops (and counts) new data until usage is back under 95 %. Spooled files are never
  dropped.
* Shutdown. `stop(timeout)` lets the backlog drain for up to `timeout` seconds; what is left
  stays on disk for the next start and is logged.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import os
import random
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

import boto3
import botocore.exceptions as bexc
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from s3transfer.utils import ChunksizeAdjuster

from app import logs, schema
from app.errors import SettingsError

log = logs.get()
NEAR_FULL_RATIO = 0.9      # default of degraded_spool_ratio: from here the state is DEGRADED
RESUME_RATIO = 0.95        # after a full spool, new data is accepted again below this
_FATAL = ("no_credentials", "partial_credentials", "no_profile")   # setup, not the store: stop
RECHECK_S = 15.0           # while the store has a problem and nothing uploads, probe it this often
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}(-[0-9]+)?$")
_CRED_CODES = {"InvalidAccessKeyId": "AWS_ACCESS_KEY_ID",
               "InvalidClientTokenId": "AWS_ACCESS_KEY_ID",
               "SignatureDoesNotMatch": "AWS_SECRET_ACCESS_KEY",
               "InvalidToken": "AWS_SESSION_TOKEN", "ExpiredToken": "AWS_SESSION_TOKEN",
               "TokenRefreshRequired": "AWS_SESSION_TOKEN"}


@dataclass(order=True)
class _Item:
    order: tuple                          # (mtime, seq): oldest first
    key: str = field(compare=False)       # relative key (raw/v1/... or reference/...)
    path: str = field(compare=False)
    size: int = field(compare=False)
    mtime: float = field(compare=False)
    attempts: int = field(default=0, compare=False)
    probe: bool = field(default=False, compare=False)
    seconds: float = field(default=0.0, compare=False)
    maybe_there: bool = field(default=False, compare=False)   # may already be in the store
    already: bool = field(default=False, compare=False)


def _labels(key: str) -> tuple[str, str]:
    """(exchange, dataset) of a relative key (raw/v1/<dataset>/<exchange>/date=...: every key
    has passed _current_layout), for per-exchange counters."""
    parts = key.split("/")
    if len(parts) >= 5 and parts[0] == "raw":
        return parts[3], parts[2]
    if len(parts) >= 3 and parts[0] == "reference":
        return parts[1], "reference"
    return "", ""


def _current_layout(key: str) -> str:
    """A file left by a run of the first layout (raw/v1/<dataset>/exchange=<x>/...) goes to the
    key the current layout gives it, so an outage across an upgrade leaves no old-layout keys."""
    parts = key.split("/")
    if len(parts) >= 5 and parts[0] == "raw":
        found = schema.exchange_dir(parts[3])
        if found is not None and found[1]:
            parts[3] = found[0]
    return "/".join(parts)


def safe_endpoint(url: str) -> str:
    """The endpoint without any user:password@ part, for messages."""
    if not url:
        return "AWS S3 (default endpoint)"
    p = urllib.parse.urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host += f":{p.port}"
    return urllib.parse.urlunsplit((p.scheme, host, p.path, "", ""))


def expected_etag(path: str, size: int, threshold: int, chunksize: int) -> str:
    """The ETag S3 gives a file uploaded by s3transfer with these settings (unencrypted or
    SSE-S3): MD5 for a single PUT; MD5 of the part MD5s + '-<parts>' for multipart."""
    block = 1024 * 1024
    with open(path, "rb") as f:
        if size < threshold:
            h = hashlib.md5()
            for chunk in iter(lambda: f.read(block), b""):
                h.update(chunk)
            return h.hexdigest()
        part = ChunksizeAdjuster().adjust_chunksize(chunksize, size)
        digests = []
        left = size
        while left > 0:
            h = hashlib.md5()
            want = min(part, left)
            while want > 0:
                chunk = f.read(min(block, want))
                if not chunk:
                    raise OSError(f"{path} shrank while hashing")
                h.update(chunk)
                want -= len(chunk)
                left -= len(chunk)
            digests.append(h.digest())
        return hashlib.md5(b"".join(digests)).hexdigest() + f"-{len(digests)}"


def error_reason(e: BaseException) -> str:
    """A short, secret-free description of an S3 error (uploads, migration)."""
    if isinstance(e, bexc.ClientError):
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{err.get('Code', '?')} (HTTP {status})"
    if isinstance(e, bexc.NoCredentialsError):
        return "no AWS credentials found"
    if isinstance(e, (bexc.EndpointConnectionError, bexc.ConnectionClosedError)):
        return "cannot connect to the endpoint"
    if isinstance(e, (bexc.ReadTimeoutError, bexc.ConnectTimeoutError)):
        return "timeout"
    return f"{type(e).__name__}: {str(e)[:200]}"


def client_config(region: str, endpoint: str | None, addressing_style: str = "auto", *, pool: int = 10,
                  attempts: int = 2, connect_timeout: float = 5, read_timeout: float = 60) -> Config:
    """botocore Config for our S3 clients: path-style addressing and checksums only when
    required against a custom endpoint (MinIO, Ceph, R2... reject or mangle the others)."""
    if addressing_style == "auto" and endpoint:
        addressing_style = "path"
    when = "when_required" if endpoint else "when_supported"
    return Config(region_name=region or "us-east-1", s3={"addressing_style": addressing_style},
                  retries={"max_attempts": attempts, "mode": "standard"},
                  connect_timeout=connect_timeout, read_timeout=read_timeout, max_pool_connections=pool,
                  request_checksum_calculation=when, response_checksum_validation=when)


class S3Storage:
    backend = "s3"

    def __init__(self, settings, state):
        s = settings
        self.settings = s
        self.state = state
        self.data_dir = s.data_dir
        self.spool_dir = os.path.join(self.data_dir, "spool")
        self.bucket = s.s3_bucket
        self.prefix = s.s3_prefix.strip("/")
        self.endpoint = s.s3_endpoint or None
        self.concurrency = s.upload_concurrency
        self.budget = s.spool_max_bytes
        self.near_full_ratio = getattr(s, "degraded_spool_ratio", NEAR_FULL_RATIO)
        self.retry_min, self.retry_max = s.upload_retry_min, s.upload_retry_max
        self.verify_etag = s.s3_verify == "etag"
        self._config = client_config(s.s3_region, self.endpoint, s.s3_addressing_style,
                                     pool=max(10, 2 * self.concurrency))
        self.transfer_config = TransferConfig(multipart_threshold=s.s3_multipart_threshold,
                                              multipart_chunksize=s.s3_multipart_chunksize,
                                              max_concurrency=self.concurrency, use_threads=True,
                                              preferred_transfer_client="classic")
        self._client = None
        # the availability probe: one short try, so a store that accepts TCP and never answers
        # costs the start and each re-probe seconds, not the uploads' minutes of retries
        self._probe_config = self._config.merge(Config(retries={"max_attempts": 1, "mode": "standard"},
                                                       connect_timeout=5, read_timeout=10))
        self._probe_client = None
        self._reprobe: threading.Thread | None = None
        self._tm = None
        self._cond = threading.Condition()
        self._heap: list[_Item] = []
        self._inflight: dict[str, _Item] = {}
        self._known: set[str] = set()          # keys pending or in flight
        self._seq = itertools.count()
        self._bytes = 0                        # backlog bytes (pending + in flight)
        self._failures = 0                     # consecutive failed rounds (0 = store healthy)
        self._retry_at = 0.0
        self._probing = False
        self._closing = False                  # stop() called: drain, then workers exit
        self._abort = False                    # stop() timed out: workers exit now
        self._threads: list[threading.Thread] = []
        self._started = False
        self._accepting = True
        self._near_full = False
        self._fail_log = logs.RateLimited(10.0)
        self._monitor_stop = threading.Event()
        state.upload_backlog = {"files": 0, "bytes": 0, "oldest_age_s": 0.0}
        state.spool_usage = {"bytes": 0, "budget": self.budget, "ratio": 0.0,
                             "near_full": False, "full": False}

    # ---- boto3 ---------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint,
                                                          config=self._config)
        return self._client

    def object_key(self, key: str) -> str:
        key = key.replace(os.sep, "/").lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    # ---- interface -----------------------------------------------------------------------
    def check(self) -> None:
        """At start: a credentials setup that cannot work (none, half, an unknown profile) is a
        settings error. Anything the store itself says (no bucket, access denied, wrong region,
        unreachable) is not: the collector records to the local spool, DEGRADED with the reason
        (`state.storage_problem`), and this probe is repeated until the store answers."""
        problem = self.probe()
        if problem is not None and problem[0] in _FATAL:
            raise SettingsError(problem[1], problem[2])
        self._set_problem(problem)

    def probe(self) -> tuple[str, str, str] | None:
        """One LIST on the bucket. -> None if it works, else (kind, setting, reason)."""
        where = safe_endpoint(self.endpoint or "")
        if self._probe_client is None:
            self._probe_client = boto3.session.Session().client("s3", endpoint_url=self.endpoint,
                                                                config=self._probe_config)
        try:
            self._probe_client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except bexc.NoCredentialsError:
            return ("no_credentials", "AWS_ACCESS_KEY_ID",
                    "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                    "(environment or .env), AWS_PROFILE, or use an instance role")
        except bexc.PartialCredentialsError as e:
            missing = "AWS_SECRET_ACCESS_KEY" if "SECRET" in str(e.kwargs.get("cred_var", "")).upper() \
                else "AWS_ACCESS_KEY_ID"
            return ("partial_credentials", missing,
                    "incomplete AWS credentials: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        except bexc.ProfileNotFound:
            return ("no_profile", "AWS_PROFILE", "the AWS profile named in AWS_PROFILE does not exist "
                    "(~/.aws/config, ~/.aws/credentials)")
        except (bexc.EndpointConnectionError, bexc.ConnectionClosedError, bexc.ReadTimeoutError,
                bexc.SSLError, bexc.ProxyConnectionError) as e:
            return ("unreachable", "s3_endpoint", f"cannot reach {where}: {type(e).__name__}")
        except bexc.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return ("no_bucket", "s3_bucket", f"bucket {self.bucket!r} does not exist at {where}")
            if code in _CRED_CODES:
                return ("credentials", _CRED_CODES[code], f"the store rejected the credentials ({code})")
            if code in ("AuthorizationHeaderMalformed", "PermanentRedirect", "IllegalLocationConstraintException") \
                    or status == 301:
                return ("region", "s3_region", f"bucket {self.bucket!r} is not in region "
                        f"{self.settings.s3_region!r} ({code or status})")
            if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
                return ("access_denied", "s3_bucket",
                        f"access denied to bucket {self.bucket!r} ({code or status}): the credentials "
                        "need s3:ListBucket, s3:PutObject and s3:GetObject on it")
            return ("unexpected", "s3_endpoint", f"unexpected answer from {where} ({code or '?'}, HTTP "
                    f"{status}): is it an S3-compatible endpoint?")
        except bexc.BotoCoreError as e:
            return ("unexpected", "s3_endpoint", f"{where}: {type(e).__name__}")
        return None

    def _set_problem(self, problem) -> None:
        """Report the store's state once per change (log and state.storage_problem)."""
        old = self.state.storage_problem
        if problem is None:
            self.state.storage_problem = None
            if old is not None:
                log.info("storage_available", extra={"endpoint": safe_endpoint(self.endpoint or ""),
                                                     "bucket": self.bucket, "was": old.get("reason")})
            else:
                log.info("s3_check_ok", extra={"endpoint": safe_endpoint(self.endpoint or ""),
                                               "bucket": self.bucket, "prefix": self.prefix})
            return
        kind, setting, reason = problem
        self.state.storage_problem = {"kind": kind, "setting": setting, "reason": reason,
                                      "since": (old or {}).get("since") or round(time.time(), 3)}
        if old is None or old.get("reason") != reason:
            log.warning("storage_unavailable", extra={"setting": setting, "reason": reason,
                                                      "action": "recording to the local spool; "
                                                                "uploads start when the store answers"})

    def start(self) -> None:
        """Queue what a previous run left, start the uploaders and the spool monitor."""
        if self._started:
            return
        self._started = True
        self._tm = create_transfer_manager(self.client, self.transfer_config)
        left = self._scan_leftovers()
        if left:
            log.info("upload_backlog_found", extra={"files": left, "bytes": self._bytes})
        self._measure()
        for i in range(self.concurrency):
            t = threading.Thread(target=self._worker, name=f"uploader-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._monitor, name="spool-monitor", daemon=True)
        t.start()
        self._threads.append(t)

    def publish(self, local_path: str, key: str) -> None:
        """Called by the writer for every finished file: queue it (never blocks on the store)."""
        key = key.replace(os.sep, "/")
        try:
            st = os.stat(local_path)
        except FileNotFoundError:
            log.error("upload_source_missing", extra={"path": local_path, "key": key})
            return
        with self._cond:
            if key in self._known:
                return
            self._push(_Item((st.st_mtime, next(self._seq)), key, local_path, st.st_size, st.st_mtime))
            self._cond.notify()
        self._update_backlog()

    def accepting(self) -> bool:
        """Cheap per-flush question from the writer: False once the spool reaches its budget."""
        return self._accepting

    def pending_keys(self) -> list[str]:
        with self._cond:
            return sorted(self._known)

    def stop(self, timeout: float = 0) -> None:
        """Upload what is pending for up to `timeout` seconds; what is left stays on disk."""
        if not self._started:
            return
        t0 = time.monotonic()
        deadline = t0 + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while (self._heap or self._inflight) and time.monotonic() < deadline:
                self._cond.wait(min(0.2, max(0.0, deadline - time.monotonic())))
            self._abort = True
            self._cond.notify_all()
            left = sorted(self._known)
            left_bytes = self._bytes
        if self._tm is not None:
            self._tm.shutdown(cancel=bool(left))     # cancel aborts unfinished multipart uploads
        self._monitor_stop.set()
        join_by = time.monotonic() + 5       # a request stuck in the network: daemon threads
        for t in self._threads:
            t.join(max(0.0, join_by - time.monotonic()))
        self._update_backlog()
        extra = {"seconds": round(time.monotonic() - t0, 3), "files_left": len(left),
                 "bytes_left": left_bytes}
        if left:
            log.warning("upload_incomplete_at_stop", extra=dict(extra, keys=left[:50], data_dir=self.data_dir,
                        note="left in the local spool (keys are paths under data_dir); "
                             "uploaded at the next start"))
        else:
            log.info("upload_drained", extra=extra)

    # ---- backlog -------------------------------------------------------------------------
    def _push(self, item: _Item) -> None:
        """Caller holds the lock."""
        heapq.heappush(self._heap, item)
        self._known.add(item.key)
        self._bytes += item.size

    def _scan_leftovers(self) -> int:
        found = []
        for top in ("raw", "reference"):
            for root, _dirs, files in os.walk(os.path.join(self.data_dir, top)):
                for name in files:
                    if name.endswith(".parquet") and not name.startswith("."):
                        path = os.path.join(root, name)
                        try:
                            st = os.stat(path)
                        except FileNotFoundError:
                            continue
                        found.append((st.st_mtime, path, st.st_size))
        found.sort()
        with self._cond:
            for mtime, path, size in found:
                key = _current_layout(os.path.relpath(path, self.data_dir).replace(os.sep, "/"))
                if key not in self._known:
                    self._push(_Item((mtime, next(self._seq)), key, path, size, mtime, maybe_there=True))
            self._cond.notify_all()
        self._update_backlog()
        return len(found)

    def _update_backlog(self) -> None:
        with self._cond:
            files = len(self._known)
            nbytes = self._bytes
            oldest = [i.mtime for i in self._inflight.values()]
            if self._heap:
                oldest.append(self._heap[0].mtime)
        age = max(0.0, time.time() - min(oldest)) if oldest else 0.0
        self.state.upload_backlog = {"files": files, "bytes": nbytes, "oldest_age_s": round(age, 3)}

    def _measure(self) -> None:
        """Spool usage against the budget; flips `accepting` and logs the transitions."""
        spool = 0
        try:
            with os.scandir(self.spool_dir) as it:
                for e in it:
                    try:
                        spool += e.stat().st_size
                    except FileNotFoundError:
                        pass
        except FileNotFoundError:
            pass
        used = spool + self._bytes
        ratio = used / self.budget if self.budget else 0.0
        near = ratio >= self.near_full_ratio
        if self._accepting and ratio >= 1.0:
            self._accepting = False
            log.error("spool_full", extra={"bytes": used, "budget": self.budget,
                                           "note": "new data is dropped and counted until uploads catch up"})
        elif not self._accepting and ratio < RESUME_RATIO:
            self._accepting = True
            log.warning("spool_accepting", extra={"bytes": used, "budget": self.budget})
        if near != self._near_full:
            self._near_full = near
            (log.warning if near else log.info)("spool_near_full" if near else "spool_ok",
                                                extra={"bytes": used, "budget": self.budget,
                                                       "ratio": round(ratio, 4)})
        self.state.spool_usage = {"bytes": used, "budget": self.budget, "ratio": round(ratio, 4),
                                  "near_full": near, "full": not self._accepting}

    def _monitor(self) -> None:
        last_probe = time.monotonic()
        while not self._monitor_stop.wait(1.0):
            try:
                self._update_backlog()
                self._measure()
                if (self.state.storage_problem is not None and time.monotonic() - last_probe >= RECHECK_S
                        and not (self._reprobe and self._reprobe.is_alive())):
                    # on its own thread: the spool budget above is enforced every second, also
                    # while a probe waits on a store that does not answer
                    last_probe = time.monotonic()
                    self._reprobe = threading.Thread(target=self._probe_again, name="s3-reprobe", daemon=True)
                    self._reprobe.start()
            except Exception as e:  # noqa: BLE001 - a metric must never kill storage
                log.error("spool_monitor_error", extra={"error": repr(e)})

    def _probe_again(self) -> None:
        try:
            self._set_problem(self.probe())
        except Exception as e:  # noqa: BLE001 - the next round probes again
            log.error("s3_reprobe_error", extra={"error": repr(e)})

    # ---- workers -------------------------------------------------------------------------
    def _take(self) -> _Item | None:
        with self._cond:
            while True:
                if self._abort:
                    return None
                if not self._heap:
                    if self._closing and not self._inflight:
                        return None
                    self._cond.wait(1.0)
                    continue
                if self._failures:
                    now = time.monotonic()
                    if self._probing or now < self._retry_at:
                        self._cond.wait(1.0 if self._probing else max(0.01, self._retry_at - now))
                        continue
                item = heapq.heappop(self._heap)
                item.probe = bool(self._failures)
                self._probing = item.probe
                self._inflight[item.key] = item
                return item

    def _worker(self) -> None:
        while True:
            item = self._take()
            if item is None:
                return
            try:
                self._upload(item)
            except Exception as e:  # noqa: BLE001 - every failure is retried, nothing is lost
                self._failed(item, e)
                continue
            try:
                self._succeeded(item)
            except Exception as e:  # noqa: BLE001 - the object is confirmed; never kill a worker
                log.error("upload_bookkeeping_error", extra={"key": item.key, "error": repr(e)})
                with self._cond:
                    if self._inflight.pop(item.key, None) is not None:
                        self._known.discard(item.key)
                        self._bytes -= item.size
                    self._probing = False
                    self._cond.notify_all()

    def _upload(self, item: _Item) -> None:
        t0 = time.monotonic()
        item.attempts += 1
        size = os.path.getsize(item.path)
        if size != item.size:
            with self._cond:
                self._bytes += size - item.size
            item.size = size
        cfg = self.transfer_config
        etag = expected_etag(item.path, size, cfg.multipart_threshold, cfg.multipart_chunksize) \
            if self.verify_etag else None
        okey = self.object_key(item.key)
        # a retry, or a file left by a previous run: its upload may have landed with only the
        # confirmation lost; if the store already holds exactly this file, do not send it again
        if item.maybe_there and self._confirm(okey, size, etag, before=True):
            item.already = True
        else:
            self._tm.upload(item.path, self.bucket, okey).result()
            self._confirm(okey, size, etag)
        item.seconds = time.monotonic() - t0

    def _confirm(self, okey: str, size: int, etag: str | None, before: bool = False) -> bool:
        """HEAD the object: True when it matches the local file. After an upload a mismatch
        raises IntegrityError; before one (`before`) absent or different just means: send it."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=okey)
        except bexc.ClientError as e:
            if before and e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        problem = None
        if head["ContentLength"] != size:
            problem = f"size {head['ContentLength']} in the store, {size} local"
        elif etag is not None:
            got = head.get("ETag", "").strip('"')
            if got != etag:
                hint = "" if _MD5_ETAG.match(got) else " (not an MD5 ETag: set s3_verify = size)"
                problem = f"ETag {got} in the store, {etag} local{hint}"
        if problem is None:
            return True
        if before:
            return False
        raise IntegrityError(problem)

    def _succeeded(self, item: _Item) -> None:
        """Confirmed in the store: delete the local copy, count, log (before the next upload
        can start, so that the log order after an outage is the upload order)."""
        try:
            os.remove(item.path)
        except FileNotFoundError:
            pass
        except OSError as e:       # stays on disk; the next start uploads it again (same bytes)
            log.error("spool_delete_failed", extra={"path": item.path, "error": repr(e)})
        self._prune_dir(os.path.dirname(item.path))
        ex, ds = _labels(item.key)
        self.state.count("files_uploaded", ex, 1, ds)
        self.state.count("bytes_uploaded", ex, item.size, ds)
        log.info("file_uploaded", extra={"key": self.object_key(item.key), "bytes": item.size,
                                         "seconds": round(item.seconds, 3),
                                         "multipart": item.size >= self.transfer_config.multipart_threshold,
                                         "attempts": item.attempts, "already_there": item.already})
        with self._cond:
            self._inflight.pop(item.key, None)
            self._known.discard(item.key)
            self._bytes -= item.size
            recovered = self._failures
            self._failures = 0
            self._probing = False
            backlog = len(self._known)
            self._cond.notify_all()
        if recovered:
            log.info("upload_resumed", extra={"after_failures": recovered, "backlog_files": backlog})
        if self.state.storage_problem is not None:     # the store took a file: it works now
            self._set_problem(None)
        self._update_backlog()

    def _failed(self, item: _Item, e: BaseException) -> None:
        ex, ds = _labels(item.key)
        if isinstance(e, FileNotFoundError) and not os.path.exists(item.path):
            with self._cond:
                self._inflight.pop(item.key, None)
                self._known.discard(item.key)
                self._bytes -= item.size
                if item.probe:
                    self._probing = False
                self._cond.notify_all()
            log.error("upload_source_missing", extra={"path": item.path, "key": item.key})
            self._update_backlog()
            return
        with self._cond:
            self._inflight.pop(item.key, None)
            if self._abort:
                # stop() gave up (cancelled transfer): the file stays on disk for the next start
                heapq.heappush(self._heap, item)
                self._cond.notify_all()
                return
            self.state.count("upload_failures", ex, 1, ds)
            item.maybe_there = True
            heapq.heappush(self._heap, item)          # back in its place: oldest first
            if item.probe or not self._failures:
                self._failures += 1
                delay = min(self.retry_max, self.retry_min * 2 ** (self._failures - 1))
                self._retry_at = time.monotonic() + delay * random.uniform(0.8, 1.0)
            if item.probe:
                self._probing = False
            retry_in = max(0.0, self._retry_at - time.monotonic())
            backlog = len(self._known)
            self._cond.notify_all()
        self._fail_log(logging.WARNING, "upload_failed", key="store", object=self.object_key(item.key),
                       reason=error_reason(e), attempt=item.attempts, retry_in_s=round(retry_in, 2),
                       backlog_files=backlog)

    def _prune_dir(self, path: str) -> None:
        """Remove an emptied date=... directory once its day is over (the finalizer may still
        be creating files in today's and yesterday's)."""
        base = os.path.basename(path)
        if not base.startswith("date="):
            return
        yesterday = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86_400))
        if base[len("date="):] < yesterday:
            try:
                os.rmdir(path)
            except OSError:
                pass


class IntegrityError(RuntimeError):
    """The object in the store does not match the local file: upload again."""
