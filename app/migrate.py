"""RAW layouts, and `bin/check_raw_sanity --migrate-layout`: move the first layout to the current one.

    first:   <root>/raw/v1/<dataset>/exchange=<x>/date=<YYYY-MM-DD>/<file>.parquet
    current: <root>/raw/v1/<dataset>/<x>/date=<YYYY-MM-DD>/<file>.parquet   (app.schema.partition_path)

Why: the files carry `exchange` as a column, and a Hive key of the same name makes
pandas.read_parquet and pyarrow.parquet.read_table refuse the dataset ("Unable to merge: Field
exchange has incompatible types"). The file schema is frozen, so the layout changed instead
(CONTRACT.md section 2). Only the `exchange=<x>` path component changes; everything below it
(date=..., the file name) stays as it is, and the bytes are not touched.

How a file moves, so that nothing is lost and a second run is a no-op:

* Plan first: every old-layout file and its new place. A new place already holding a file with
  different bytes is a conflict: the run stops before moving anything and deletes nothing. The
  same bytes already there (a run interrupted between copy and delete, a manual copy) is not a
  conflict: the old copy is removed.
* Local: `os.replace` (atomic, same filesystem; the new place is checked free just before), then
  fsync of the new and the old directory; emptied old directories are removed. A crash leaves
  each file in one place (rename is atomic) or, for an interrupted removal of an identical old
  copy, in both.
* S3: CopyObject, then HEAD of the copy: its size must equal the original's and its ETag too (or,
  where ETags cannot be compared - a multipart original, SSE-KMS - the bytes are compared), and
  only then is the old key deleted. A crash leaves the file under the old key, or under both.
  Run it while no collector of the old version is writing (collectors of this version write
  the new layout only); run it again afterwards to move what arrived meanwhile.
"""
from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlparse

from app import schema, storage_s3

S3_COPY_MAX = 5 * 1024 ** 3     # CopyObject's limit; larger objects go through a multipart copy


# ---- layout ----------------------------------------------------------------------------------------

def command(root: str, config: str | None = None) -> str:
    """The one command that moves a root's old-layout files (printed by check_raw_sanity)."""
    cmd = f"bin/check_raw_sanity --migrate-layout --root {shlex.quote(root)}"
    return cmd + (f" --config {shlex.quote(config)}" if config else "")


# ---- result ----------------------------------------------------------------------------------------

@dataclass
class DirResult:
    old: str                      # raw/v1/<ds>/exchange=<x>
    new: str                      # raw/v1/<ds>/<x>
    moved: int = 0
    bytes: int = 0
    identical: int = 0            # already at the new place with the same bytes: old copy removed


@dataclass
class Result:
    root: str
    dry_run: bool = False
    dirs: dict[str, DirResult] = field(default_factory=dict)
    conflicts: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    removed_dirs: int = 0
    leftover_dirs: int = 0        # old-layout exchange directories found (local; files or not)
    elapsed_s: float = 0.0

    def dir(self, old: str, new: str) -> DirResult:
        return self.dirs.setdefault(old, DirResult(old, new))

    @property
    def exit_code(self) -> int:
        return 2 if self.conflicts or self.errors else 0

    def as_dict(self) -> dict:
        return {"root": self.root, "dry_run": self.dry_run, "exit_code": self.exit_code,
                "moved": sum(d.moved for d in self.dirs.values()),
                "bytes": sum(d.bytes for d in self.dirs.values()),
                "identical": sum(d.identical for d in self.dirs.values()),
                "dirs": [vars(d) for d in self.dirs.values()], "removed_dirs": self.removed_dirs,
                "old_dirs_found": self.leftover_dirs,
                "conflicts": self.conflicts, "errors": self.errors, "elapsed_s": round(self.elapsed_s, 3)}

    def render(self) -> str:
        out = []
        w = out.append
        verb = "would move" if self.dry_run else "moved"
        w(f"check_raw_sanity --migrate-layout  root={self.root}" + ("  (dry run: nothing changed)" if self.dry_run else ""))
        if not self.dirs and not self.conflicts and not self.errors:
            if self.removed_dirs:
                w(f"result: no file to move; removed {self.removed_dirs} empty old director(ies)")
            elif self.leftover_dirs and self.dry_run:
                w(f"result: no file to move; would remove {self.leftover_dirs} empty old exchange=<x> director(ies)")
            else:
                w("nothing to migrate: no exchange=<x> directory under raw/v1/ (already in the current layout)")
            return "\n".join(out)
        for d in self.dirs.values():
            extra = (f", {d.identical} already there with the same bytes"
                     + (" (old copy would be removed)" if self.dry_run else " (old copy removed)")) if d.identical else ""
            w(f"  {d.old}/ -> {d.new}/: {verb} {d.moved} file(s), {d.bytes:,} bytes{extra}")
        for c in self.conflicts:
            w(f"  CONFLICT {c['old']} -> {c['new']}: {c['detail']}")
        for e in self.errors:
            w(f"  ERROR {e['path']}: {e['detail']}")
        r = self.as_dict()
        w("")
        if self.conflicts:
            w(f"result: {len(self.conflicts)} conflict(s): a different file is already at the new place; "
              "nothing was moved or deleted. Compare the files named above, remove the wrong one, run again.")
        elif self.errors and not self.dirs:
            w(f"result: {len(self.errors)} error(s) while planning; nothing was moved or deleted")
        elif self.errors:
            w(f"result: {len(self.errors)} error(s); {r['moved']} file(s) {verb}; every file not moved is "
              "still at its old place: fix the cause and run again")
        else:
            w(f"result: {verb} {r['moved']} file(s) ({r['bytes']:,} bytes)"
              + (f", removed {r['identical']} old copies already in place" if r["identical"] and not self.dry_run else "")
              + (f", removed {self.removed_dirs} empty old director(ies)" if self.removed_dirs else "")
              + f" in {self.elapsed_s:.1f} s")
        return "\n".join(out)


# ---- local -----------------------------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs(path: str) -> None:
    """mkdir -p, with each created directory's entry fsynced in its parent."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    _makedirs(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    _fsync_dir(parent)


def _same_file(a: str, b: str) -> bool:
    return os.path.getsize(a) == os.path.getsize(b) and filecmp.cmp(a, b, shallow=False)


def local_plan(base: str) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """([(old dir rel, new dir rel, old path, new path)] of every file under an old-layout
    exchange directory, in path order; [every old-layout exchange directory, empty or not])."""
    plan, roots = [], []
    raw = os.path.join(base, "raw", "v1")
    if not os.path.isdir(raw):
        return plan, roots
    for ds in sorted(os.listdir(raw)):
        ds_dir = os.path.join(raw, ds)
        if not os.path.isdir(ds_dir) or os.path.islink(ds_dir):
            continue
        for name in sorted(os.listdir(ds_dir)):
            ex = schema.exchange_dir(name)
            src_root = os.path.join(ds_dir, name)
            if ex is None or not ex[1] or not os.path.isdir(src_root) or os.path.islink(src_root):
                continue
            roots.append(src_root)
            dst_root = os.path.join(ds_dir, ex[0])
            old_rel, new_rel = f"raw/v1/{ds}/{name}", f"raw/v1/{ds}/{ex[0]}"
            for dirpath, dirs, files in os.walk(src_root):
                dirs.sort()
                for f in sorted(files):
                    src = os.path.join(dirpath, f)
                    plan.append((old_rel, new_rel, src, os.path.join(dst_root, os.path.relpath(src, src_root))))
    return plan, roots


def migrate_local(root: str, dry_run: bool = False) -> Result:
    t0 = time.monotonic()
    base = os.path.abspath(root)
    res = Result(root, dry_run)
    plan, roots = local_plan(base)
    res.leftover_dirs = len(roots)
    todo = []
    for old_rel, new_rel, src, dst in plan:
        d = res.dir(old_rel, new_rel)
        if os.path.lexists(dst):
            try:
                same = _same_file(src, dst)
            except OSError as e:
                res.errors.append({"path": dst, "detail": f"cannot compare with {src}: {e}"})
                continue
            if not same:
                res.conflicts.append({"old": src, "new": dst, "detail":
                                      f"{os.path.getsize(src):,} bytes at the old place, "
                                      f"{os.path.getsize(dst):,} different bytes at the new place"})
                continue
        todo.append((d, src, dst))
    if res.conflicts or res.errors:      # stop before anything is moved or deleted
        res.dirs = {}
        res.elapsed_s = time.monotonic() - t0
        return res
    if dry_run:
        for d, src, dst in todo:
            if os.path.lexists(dst):
                d.identical += 1
            else:
                d.moved += 1
                d.bytes += os.path.getsize(src)
        res.elapsed_s = time.monotonic() - t0
        return res
    touched: dict[str, set[str]] = {}          # new dir -> old dirs whose entries changed
    for d, src, dst in todo:
        dst_dir = os.path.dirname(dst)
        try:
            _makedirs(dst_dir)
            size = os.path.getsize(src)
            if os.path.lexists(dst):           # same bytes (checked above, again now): drop the old copy
                if not _same_file(src, dst):
                    res.errors.append({"path": src, "detail": f"a different file appeared at {dst}: not moved"})
                    continue
                os.remove(src)
                d.identical += 1
            else:
                os.replace(src, dst)
                d.moved += 1
                d.bytes += size
        except OSError as e:
            res.errors.append({"path": src, "detail": f"{type(e).__name__}: {e}"})
            continue
        touched.setdefault(dst_dir, set()).add(os.path.dirname(src))
    for dst_dir, src_dirs in touched.items():        # the new entries first, then the removals
        _fsync_dir(dst_dir)
        for s in src_dirs:
            _fsync_dir(s)
    # remove the emptied old directories (also those a crashed run emptied), children first
    for top in roots:
        for dirpath, _dirs, _files in list(os.walk(top, topdown=False)):
            try:
                os.rmdir(dirpath)
            except OSError:
                continue
            res.removed_dirs += 1
            _fsync_dir(os.path.dirname(dirpath))
    res.elapsed_s = time.monotonic() - t0
    return res


# ---- S3 --------------------------------------------------------------------------------------------

def s3_client(endpoint: str = "", region: str = "us-east-1", workers: int = 8):
    """A boto3 S3 client configured as the collector's storage builds it (credentials from the
    standard AWS variables, files or an instance role); patient: a migration is run by hand."""
    import boto3
    cfg = storage_s3.client_config(region, endpoint, pool=max(10, 2 * workers), attempts=5,
                                   connect_timeout=10, read_timeout=120)
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None, config=cfg)


def _split_s3(root: str) -> tuple[str, str]:
    u = urlparse(root)
    return u.netloc, u.path.strip("/")


def _list(client, bucket: str, prefix: str, delimiter: str | None = None):
    kw = {"Bucket": bucket, "Prefix": prefix}
    if delimiter:
        kw["Delimiter"] = delimiter
    for page in client.get_paginator("list_objects_v2").paginate(**kw):
        yield page


def _same_bytes(client, bucket: str, a: str, b: str) -> bool:
    """Stream both objects and compare them."""
    ba = client.get_object(Bucket=bucket, Key=a)["Body"]
    bb = client.get_object(Bucket=bucket, Key=b)["Body"]
    try:
        ha, hb = hashlib.sha256(), hashlib.sha256()
        for chunk in iter(lambda: ba.read(1 << 20), b""):
            ha.update(chunk)
        for chunk in iter(lambda: bb.read(1 << 20), b""):
            hb.update(chunk)
        return ha.digest() == hb.digest()
    finally:
        ba.close()
        bb.close()


def _same_object(client, bucket: str, a: str, a_size: int, a_etag: str, b: str, b_size: int, b_etag: str) -> bool:
    """Same content: sizes equal and ETags equal, or (ETags not comparable: multipart, SSE-KMS,
    a copy's new ETag) the bytes equal."""
    if a_size != b_size:
        return False
    if a_etag and a_etag == b_etag:
        return True
    return _same_bytes(client, bucket, a, b)


def migrate_s3(root: str, endpoint: str = "", region: str = "us-east-1", dry_run: bool = False,
               workers: int = 8, client=None) -> Result:
    t0 = time.monotonic()
    res = Result(root, dry_run)
    bucket, prefix = _split_s3(root)
    client = client or s3_client(endpoint, region, workers)
    base = f"{prefix}/raw/v1/" if prefix else "raw/v1/"
    # the old-layout exchange directories: <base><ds>/exchange=<x>/
    legacy: list[tuple[str, str, str]] = []           # (ds, old dir name, exchange)
    for page in _list(client, bucket, base, "/"):
        for cp in page.get("CommonPrefixes", []):
            ds = cp["Prefix"][len(base):].strip("/")
            for page2 in _list(client, bucket, cp["Prefix"], "/"):
                for cp2 in page2.get("CommonPrefixes", []):
                    name = cp2["Prefix"][len(cp["Prefix"]):].strip("/")
                    ex = schema.exchange_dir(name)
                    if ex is not None and ex[1]:
                        legacy.append((ds, name, ex[0]))
    plan = []                        # (DirResult, old key, new key, size, etag, (size, etag) at new key | None)
    storage_class: dict[str, str] = {}
    for ds, name, ex in legacy:
        old_pre, new_pre = f"{base}{ds}/{name}/", f"{base}{ds}/{ex}/"
        d = res.dir(f"raw/v1/{ds}/{name}", f"raw/v1/{ds}/{ex}")
        existing = {o["Key"]: (o["Size"], o.get("ETag", "")) for page in _list(client, bucket, new_pre)
                    for o in page.get("Contents", [])}
        for page in _list(client, bucket, old_pre):
            for o in page.get("Contents", []):
                new = new_pre + o["Key"][len(old_pre):]
                if o.get("StorageClass", "STANDARD") != "STANDARD":
                    storage_class[o["Key"]] = o["StorageClass"]
                plan.append((d, o["Key"], new, o["Size"], o.get("ETag", ""), existing.get(new)))

    def conflict_check(item):
        d, old, new, size, etag, there = item
        if there is None:
            return None
        try:
            if _same_object(client, bucket, old, size, etag, new, there[0], there[1]):
                return None
        except Exception as e:  # noqa: BLE001 - cannot compare: an error, nothing is deleted
            return ("error", {"path": f"s3://{bucket}/{new}", "detail": f"cannot compare with {old}: {storage_s3.error_reason(e)}"})
        return ("conflict", {"old": f"s3://{bucket}/{old}", "new": f"s3://{bucket}/{new}",
                             "detail": f"{size:,} bytes at the old place, {there[0]:,} different bytes at the new place"})

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for r in pool.map(conflict_check, plan):
            if r is not None:
                (res.conflicts if r[0] == "conflict" else res.errors).append(r[1])
        if res.conflicts or res.errors:      # stop before anything is copied or deleted
            res.dirs = {}
            res.elapsed_s = time.monotonic() - t0
            return res
        if dry_run:
            for d, _old, _new, size, _etag, there in plan:
                if there is None:
                    d.moved += 1
                    d.bytes += size
                else:
                    d.identical += 1
            res.elapsed_s = time.monotonic() - t0
            return res

        def move(item):
            d, old, new, size, etag, there = item
            try:
                if there is None:
                    # metadata and tags are copied by default; the storage class is kept explicitly
                    extra = {"StorageClass": storage_class[old]} if old in storage_class else {}
                    if size < S3_COPY_MAX:
                        client.copy_object(Bucket=bucket, Key=new, CopySource={"Bucket": bucket, "Key": old}, **extra)
                    else:
                        client.copy({"Bucket": bucket, "Key": old}, bucket, new, ExtraArgs=extra or None)
                    head = client.head_object(Bucket=bucket, Key=new)
                    if not _same_object(client, bucket, old, size, etag, new, head["ContentLength"], head.get("ETag", "")):
                        client.delete_object(Bucket=bucket, Key=new)      # our bad copy; the original stays
                        return d, "error", {"path": f"s3://{bucket}/{old}",
                                            "detail": f"the copy at {new} differs from the original: not deleted"}
                client.delete_object(Bucket=bucket, Key=old)
            except Exception as e:  # noqa: BLE001 - this file stays at its old place
                return d, "error", {"path": f"s3://{bucket}/{old}", "detail": storage_s3.error_reason(e)}
            return d, ("moved" if there is None else "identical"), size

        for d, what, v in pool.map(move, plan):
            if what == "moved":
                d.moved += 1
                d.bytes += v
            elif what == "identical":
                d.identical += 1
            else:
                res.errors.append(v)
    res.elapsed_s = time.monotonic() - t0
    return res


# ---- entry point -----------------------------------------------------------------------------------

def run(root: str, endpoint: str = "", region: str = "us-east-1", dry_run: bool = False,
        as_json: bool = False, out=None) -> int:
    """Migrate a root (local directory or s3://bucket/prefix); print what was done; exit code
    0 = done (or nothing to do), 2 = conflicts or errors (every file not moved is still at its
    old place)."""
    out = out or sys.stdout
    if root.startswith("s3://"):
        res = migrate_s3(root, endpoint, region, dry_run)
    else:
        if not os.path.isdir(root):
            print(f"check_raw_sanity: root not found: {root}", file=sys.stderr)
            return 2
        res = migrate_local(root, dry_run)
    print(json.dumps(res.as_dict(), indent=1) if as_json else res.render(), file=out)
    return res.exit_code
