"""Output folders that protect themselves: ownership lists and one writer at a time.

A stage writes only into a folder that is empty or carries its marker file, deletes only the
names its marker lists (`claim_folder`, `record_written`, `remove_owned`), refuses an output
that overlaps its inputs (`check_apart`), and holds `OutputLock` while it writes, so a second
run on the same output stops at once instead of doubling rows. Local folders and `s3://`
prefixes alike (storage.py underneath).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fsspec.asyn import sync as fsspec_sync

from emotion_ray import __version__
from emotion_ray.config import StorageConfig
from emotion_ray.errors import ConfigError, StageError
from emotion_ray.storage import (
    exists, filesystem, is_s3, join, listdir_names, makedirs, read_json, remove, split_member_uri,
    strip_scheme, write_json_atomic,
)

log = logging.getLogger(__name__)


# --- Ownership: a stage deletes only what its marker says it wrote --------------------------
#
# The marker file (e.g. `_emotion_ray_dataset`) is JSON. Besides who wrote it, it lists under
# "written" the names (relative paths, "/"-separated) that the stage wrote or is about to
# write. A listed folder is owned whole. Everything else in the output (a user's notes.txt or
# raw/) is never deleted. A marker from before these lists has no "written": its folder's
# owned names are then only those matching the caller's well-known patterns.

LOCK_NAME = "_emotion_ray_lock.json"  # OutputLock's file; never listed, never counted as content
LOG_PREFIX = "_emotion_ray_log"  # the CLI's log files (console.py): never listed, never content, never deleted
# The sub-folder of an output that holds its Parquet files and nothing else (as an Iceberg table's
# data/): point pandas, polars, DuckDB ('data/*') or pyarrow.dataset at it and they read only
# Parquet. Markers, summaries and manifests stay beside it, in the output folder.
PARQUET_DIR = "data"
_OWNERSHIP_KEYS = ("written_by", "note", "owner", "written")  # a marker's other fields belong to its stage


def _is_lock_name(name: str) -> bool:
    """The lock file and its short-lived helpers (temp, mutex, probe) all start with LOCK_NAME;
    the run logs are treated alike."""
    return name.startswith((LOCK_NAME, LOG_PREFIX))


def _comparable(uri: str) -> tuple[str, str]:
    """(kind, path) to compare locations: local real paths (symlinks resolved), S3 bucket/key.

    An archive member compares as its archive."""
    member = split_member_uri(uri)
    uri = member[0] if member else uri
    if is_s3(uri):
        return "s3", strip_scheme(uri)
    return "file", os.path.realpath(strip_scheme(uri))


def _within(path: str, root: str, sep: str) -> bool:
    return path == root or path.startswith(root.rstrip(sep) + sep)


def check_apart(output: str, inputs: Iterable[str]) -> None:
    """Raise ConfigError when `output` is, contains, or lies inside any of `inputs`.

    Local paths compare as resolved real paths (so a symlink does not hide an overlap); S3
    URIs compare as bucket/key prefixes on "/" boundaries (s3://b/ds and s3://b/ds2 are apart).
    A local path and an S3 URI never overlap."""
    kind, out = _comparable(output)
    sep = "/" if kind == "s3" else os.sep
    for item in inputs:
        item_kind, inp = _comparable(item)
        if item_kind != kind:
            continue
        if _within(inp, out, sep):
            raise ConfigError(f"input {item} is inside output {output} (or is it); cleaning the output "
                              "could delete the input: choose an output outside every input")
        if _within(out, inp, sep):
            raise ConfigError(f"output {output} is inside input {item}; the output would be read back "
                              "as input: choose an output outside every input")


def _read_marker(uri: str, marker: str, storage: StorageConfig | None) -> dict[str, Any] | None:
    """The marker's JSON; {} when unreadable or not an object; None when there is no marker."""
    try:
        info = read_json(join(uri, marker), storage)
    except FileNotFoundError:
        return None
    except ValueError:  # a torn or foreign file: same as an old marker with no list
        return {}
    return info if isinstance(info, dict) else {}


def _write_marker(uri: str, marker: str, owner: str, written: Sequence[str],
                  storage: StorageConfig | None, fields: dict[str, Any] | None = None) -> None:
    """(Re)write the marker; `fields` are the stage's own (see `marker_fields`), kept as they are."""
    write_json_atomic(join(uri, marker), {"written_by": f"emotion_ray {__version__}",
                                          "note": f"this folder is managed by emotion-ray {owner}; "
                                                  "it deletes only the names listed under written",
                                          "owner": owner,
                                          **(fields or {}),
                                          "written": list(dict.fromkeys(written))}, storage)


def _written(info: dict[str, Any]) -> list[str]:
    return info.get("written") if isinstance(info.get("written"), list) else []


def _stage_fields(info: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (info or {}).items() if k not in _OWNERSHIP_KEYS}


def _marker_to_update(uri: str, marker: str, storage: StorageConfig | None) -> dict[str, Any]:
    """The marker's JSON, or StageError when it is gone (another process removed it)."""
    info = _read_marker(uri, marker, storage)
    if info is None:
        raise StageError(f"output {uri} lost its marker {marker} while being written; "
                         "another process removed it: not writing further")
    return info


def marker_fields(uri: str, marker: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """What the stage recorded in its marker besides ownership (e.g. the model a score output is
    of); {} when there is no marker or it holds none."""
    return _stage_fields(_read_marker(uri, marker, storage))


def set_marker_fields(uri: str, marker: str, fields: dict[str, Any], storage: StorageConfig | None = None) -> None:
    """Record `fields` in the marker (replacing those of the same names); ownership is untouched.
    Raises StageError when the marker is gone (call `claim_folder` first)."""
    info = _marker_to_update(uri, marker, storage)
    written = _written(info)
    _write_marker(uri, marker, info.get("owner", "stage"), written, storage, {**_stage_fields(info), **fields})


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def claim_folder(uri: str, marker: str, owner: str, storage: StorageConfig | None = None,
                 inputs: Iterable[str] = (), legacy_names: Iterable[str] = ()) -> list[str]:
    """Make `uri` a folder that `owner` may write into, or refuse; returns the names there now.

    Refuses (ConfigError) an output that overlaps any of `inputs` (see `check_apart`), and a
    folder that holds anything but is not ours (no `marker`); the lock file does not count.
    (Re)writes the marker, keeping its "written" list. A marker without a list (an older
    emotion_ray) gets one: the names present that match `legacy_names` (fnmatch patterns of
    what the stage writes, e.g. "split=*"); nothing else there is ever treated as ours.
    Call it while holding the output's OutputLock: the list is read, then rewritten."""
    check_apart(uri, inputs)
    names = [n for n in listdir_names(uri, storage) if not _is_lock_name(n)]
    if names and marker not in names:
        raise ConfigError(f"output {uri} is not empty and is not an emotion_ray {owner} output; "
                          "refusing to write into it (choose an empty or new folder)")
    info = _read_marker(uri, marker, storage) if marker in names else {}
    written = (info or {}).get("written")
    if not isinstance(written, list):
        written = [n for n in names if n != marker and _matches(n, legacy_names)]
    makedirs(uri, storage)
    _write_marker(uri, marker, owner, written, storage, _stage_fields(info))
    return names


def _check_name(name: str, marker: str) -> str:
    """`name` as a clean relative "/" path, or ValueError (a caller bug, not a user error)."""
    clean = posixpath.normpath(name.replace(os.sep, "/"))
    if clean.startswith(("/", "../")) or clean in (".", "..", marker) or _is_lock_name(clean):
        raise ValueError(f"cannot record {name!r} as written: not a name inside the output")
    return clean


def record_written(uri: str, marker: str, names: Iterable[str], storage: StorageConfig | None = None) -> None:
    """Add `names` (relative paths; a folder is owned whole) to the marker's "written" list.

    Record a name BEFORE writing it, so that a crash mid-write still leaves it ours to clean.
    Raises StageError when the marker is gone (call `claim_folder` first)."""
    info = _marker_to_update(uri, marker, storage)
    written = _written(info)
    added = [_check_name(n, marker) for n in names]
    _write_marker(uri, marker, info.get("owner", "stage"), written + added, storage, _stage_fields(info))


def _temp_siblings(uri: str, owned: Sequence[str], storage: StorageConfig | None) -> list[str]:
    """Names of `write_bytes_atomic` temp files (`<owned name>.tmp-<hex>`) next to owned names."""
    out: list[str] = []
    for parent in sorted({posixpath.dirname(n) for n in owned}):
        mine = {posixpath.basename(n) for n in owned if posixpath.dirname(n) == parent}
        for entry in listdir_names(join(uri, *parent.split("/")) if parent else uri, storage):
            stem, sep, _ = entry.partition(".tmp-")
            if sep and stem in mine:
                out.append(posixpath.join(parent, entry) if parent else entry)
    return out


def remove_owned(uri: str, marker: str, storage: StorageConfig | None = None,
                 keep: Iterable[str] = (), first: Iterable[str] = ()) -> list[str]:
    """Delete what the marker lists, and leftover temp files of listed names (never complete),
    except names matching the fnmatch patterns in `keep`; returns the names deleted (that existed).

    Names in `first` go before the rest (e.g. the manifest, so that a crash mid-cleanup never
    leaves a complete-looking output). Nothing unlisted is touched; a marker without a list
    (see `claim_folder`) deletes nothing. Deleted names leave the list; kept ones stay."""
    info = _read_marker(uri, marker, storage) or {}
    written = _written(info)
    keep = list(keep)
    doomed = [n for n in written if not _matches(n, keep)]
    doomed += [n for n in _temp_siblings(uri, written, storage) if not _matches(n, keep)]
    first = list(first)
    doomed.sort(key=lambda n: first.index(n) if n in first else len(first))
    removed = []
    for name in doomed:
        target = join(uri, *name.split("/"))
        if exists(target, storage):
            remove(target, storage, recursive=True)
            removed.append(name)
    if info:
        _write_marker(uri, marker, info.get("owner", "stage"), [n for n in written if n not in doomed], storage,
                      _stage_fields(info))
    return removed


# --- One writer per output: a lease in the output folder --------------------------------------
#
# `_emotion_ray_lock.json` names its holder (host, pid, command, started_at) and carries a token
# only the holder knows. It is created only if absent (local: a complete temp file hard-linked
# into place, which fails if the name exists; S3: PUT with If-None-Match: *). The holder's daemon
# thread refreshes a heartbeat every HEARTBEAT_S seconds (local: the file's mtime, touched through
# the holder's own file descriptor; S3: a re-PUT with If-Match on the holder's ETag, "heartbeat_at"
# in the body). A lock is stale when its heartbeat is older than its stale_after_s
# (STALE_AFTER_S by default: host clocks must agree to well within that), or at once when its
# holder ran on this host, in this pid namespace, and that pid no longer exists. A stale lock is
# replaced atomically (local: under an flock of a short-lived mutex file, after checking that it
# is still the same file; S3: PUT with If-Match on the stale ETag), so of two takers one wins.

STALE_AFTER_S = 120.0  # seconds without heartbeat after which a lock is abandoned
HEARTBEAT_S = 15.0  # seconds between heartbeats
_MUTEX_WAIT_S = 10.0  # the local mutex is held for milliseconds; waiting longer means a hung process
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux), so that a pid is only judged in its own namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: Any) -> bool:
    """False only when `pid` (on this host) surely does not exist; any doubt answers True."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _stale_reason(holder: dict[str, Any], age_s: float, stale_after_s: float) -> str | None:
    """Why the lock of `holder` (its file's JSON) with a heartbeat `age_s` old is abandoned, or None."""
    if (holder.get("host") == socket.gethostname() and holder.get("pidns") == _pid_namespace()
            and not _pid_alive(holder.get("pid"))):
        return f"its process {holder.get('pid')} on {holder.get('host')} no longer exists"
    limit = holder.get("stale_after_s")
    limit = float(limit) if isinstance(limit, (int, float)) and limit > 0 else stale_after_s
    if age_s > limit:
        return f"its last heartbeat was {age_s:.0f} s ago (limit {limit:.0f} s)"
    return None


@dataclass
class _Seen:
    """A lock as read: its holder's JSON ({} if torn), heartbeat age in seconds, and version."""

    holder: dict[str, Any]
    age_s: float
    version: Any


def _parse(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


class _LocalLease:
    """The lock file on a local (or NFS) folder; the version of a lock is (inode, token)."""

    def __init__(self, uri: str):
        self.folder = strip_scheme(uri)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.fd: int | None = None

    @contextlib.contextmanager
    def _mutex(self):
        """Serialise take-over and release between processes: flock a mutex file, delete it after."""
        path, deadline = self.path + ".mutex", time.monotonic() + _MUTEX_WAIT_S
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_ino == os.stat(path).st_ino:  # not a file a releaser just deleted
                    break
            except (BlockingIOError, FileNotFoundError):
                pass
            os.close(fd)
            if time.monotonic() > deadline:
                raise StageError(f"{path} has been locked for {_MUTEX_WAIT_S:.0f} s by a hung process; "
                                 "stop it, or delete the file if no emotion_ray run uses this output")
            time.sleep(0.01)
        try:
            yield
        finally:
            os.unlink(path)
            os.close(fd)

    def create(self, body: bytes) -> bool:
        """Create the lock with `body` if there is none; True when created (and now held)."""
        os.makedirs(self.folder, exist_ok=True)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            os.write(fd, body)
            os.fsync(fd)
            os.link(tmp, self.path)  # atomic, and the lock appears whole; FileExistsError if one is there
        except FileExistsError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_HARD_LINKS:
                raise
            return self._create_in_place(body)
        finally:
            os.unlink(tmp)
        self.fd = fd
        return True

    def _create_in_place(self, body: bytes) -> bool:
        """Where hard links are unsupported: O_CREAT|O_EXCL (atomic too; a reader may briefly see
        the file empty, which reads as a live lock whose holder is unknown)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        os.write(fd, body)
        os.fsync(fd)
        self.fd = fd
        return True

    def read(self) -> _Seen | None:
        try:
            with open(self.path, "rb") as fh:
                st, holder = os.fstat(fh.fileno()), _parse(fh.read())
        except FileNotFoundError:
            return None
        return _Seen(holder, time.time() - st.st_mtime, (st.st_ino, holder.get("token")))

    def replace(self, seen: _Seen, body: bytes) -> bool:
        """Replace the lock `seen` (stale) with ours; False when it changed since it was read."""
        with self._mutex():
            now = self.read()
            if now is None or now.version != seen.version:
                return False
            os.unlink(self.path)
            return self.create(body)

    def still_ours(self) -> bool:
        try:
            return self.fd is not None and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def refresh(self, body: bytes) -> bool:
        """Heartbeat: touch our own file (through our descriptor: never a taker's); False if lost."""
        os.utime(self.fd)
        return self.still_ours()

    def release(self) -> None:
        """Delete the lock if it is still ours (checked and deleted under the mutex)."""
        if self.fd is None:
            return
        with self._mutex():
            if self.still_ours():
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def _s3_condition_failed(exc: BaseException) -> bool:
    """Whether an s3fs error means a precondition failed (412), a concurrent conditional write
    conflicted (409), or the object is gone (404), as opposed to a network or access error."""
    if isinstance(exc, (FileExistsError, FileNotFoundError)):
        return True
    cause = getattr(exc, "__cause__", None)
    code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404")


# Stores that ignore If-None-Match / If-Match (some S3-compatible ones) are detected once per
# bucket; on them the lock is best effort: write, wait _SETTLE_S, and check our token survived.
_SETTLE_S = 2.0
_conditional_support: dict[tuple[str | None, str], bool] = {}


class _S3Lease:
    """The lock object under an S3 prefix; the version of a lock is its ETag."""

    def __init__(self, uri: str, storage: StorageConfig | None):
        self.storage = storage or StorageConfig()
        self.fs = filesystem(uri, self.storage)
        self.bucket, self.key, _ = self.fs.split_path(strip_scheme(join(uri, LOCK_NAME)))
        self.etag: str | None = None

    def _put(self, body: bytes, **condition: str) -> str | None:
        """PUT the lock under `condition`; its new ETag, or None when the condition failed."""
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]
        except OSError as exc:
            if _s3_condition_failed(exc):
                return None
            raise

    def _conditional(self) -> bool:
        """Whether the store honours If-None-Match (probed once per endpoint and bucket)."""
        key = (self.storage.s3_endpoint_url, self.bucket)
        if key not in _conditional_support:
            probe = {"Bucket": self.bucket, "Key": f"{self.key}.probe-{uuid.uuid4().hex}"}
            self.fs.call_s3("put_object", Body=b"{}", **probe)
            try:
                self.fs.call_s3("put_object", Body=b"{}", IfNoneMatch="*", **probe)
                _conditional_support[key] = False
                log.warning("s3://%s ignores conditional writes (If-None-Match); the output lock is "
                            "best effort there: two runs started within %s s may both proceed",
                            self.bucket, _SETTLE_S)
            except OSError as exc:
                if not _s3_condition_failed(exc):
                    raise
                _conditional_support[key] = True
            finally:
                self.fs.call_s3("delete_object", **probe)
        return _conditional_support[key]

    def _settled(self, body: bytes) -> bool:
        """On a store without conditional writes: whether our write is still there after a while."""
        time.sleep(_SETTLE_S)
        seen = self.read()
        return seen is not None and seen.holder.get("token") == _parse(body).get("token")

    def create(self, body: bytes) -> bool:
        if not self._conditional() and self.read() is not None:
            return False
        self.etag = self._put(body, IfNoneMatch="*")
        return self.etag is not None and (self._conditional() or self._settled(body))

    def read(self) -> _Seen | None:
        async def get():
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with resp["Body"] as stream:
                return await stream.read(), resp

        try:
            data, resp = fsspec_sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        holder = _parse(data)
        beat = holder.get("heartbeat_at")
        beat = beat if isinstance(beat, (int, float)) else resp["LastModified"].timestamp()
        return _Seen(holder, time.time() - beat, resp["ETag"])

    def replace(self, seen: _Seen, body: bytes) -> bool:
        self.etag = self._put(body, IfMatch=seen.version)
        return self.etag is not None and (self._conditional() or self._settled(body))

    def refresh(self, body: bytes) -> bool:
        etag = self._put(body, IfMatch=self.etag)
        self.etag = etag or self.etag
        return etag is not None

    def release(self) -> None:
        """Delete the lock only if its ETag is still ours (DeleteObject with If-Match)."""
        if self.etag is None:
            return
        seen = self.read()
        if seen is not None and seen.version == self.etag:
            try:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            except OSError as exc:
                if not _s3_condition_failed(exc):
                    raise
        self.etag = None


class OutputLock:
    """One writer per output folder: `with OutputLock(uri, "score ..."):` or acquire()/release().

    acquire() raises StageError at once when a live run holds the output, naming it (host,
    pid, command, since, last heartbeat); a stale lock (see the section comment) is taken over.
    While held, a daemon thread refreshes the heartbeat every `heartbeat_s` seconds; if it finds
    the lock taken over (after heartbeats stopped for over `stale_after_s` seconds, e.g. a
    suspended process), `lost` becomes True and check() raises StageError: call check() before
    each commit (a part file, a manifest). release() deletes the lock only if it is still ours.
    """

    def __init__(self, uri: str, command: str, storage: StorageConfig | None = None, *,
                 stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S):
        self.uri, self.command = uri, command
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self._lease = _S3Lease(uri, storage) if is_s3(uri) else _LocalLease(uri)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self.holder: dict[str, Any] = {}

    def _body(self) -> bytes:
        return json.dumps({**self.holder, "heartbeat_at": time.time()}, indent=2).encode()

    def acquire(self) -> OutputLock:
        """Take the lock or raise StageError (held by a live run, or changing hands right now)."""
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(),
                       "command": self.command, "started_at": datetime.now(timezone.utc).isoformat(),
                       "stale_after_s": self.stale_after_s, "token": uuid.uuid4().hex}
        for _ in range(3):
            if self._lease.create(self._body()):
                return self._held()
            seen = self._lease.read()
            if seen is None:
                continue  # released meanwhile: try again
            reason = _stale_reason(seen.holder, seen.age_s, self.stale_after_s)
            if reason is None:
                raise StageError(self._held_by(seen))
            if self._lease.replace(seen, self._body()):
                log.warning("took over the lock on %s from %s: %s", self.uri, _describe(seen.holder), reason)
                return self._held()
        raise StageError(f"output {self.uri}: its lock changed hands while this run tried to take it; "
                         "another run is starting on it: try again once it ends")

    def _held(self) -> OutputLock:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.uri}", daemon=True)
        self._thread.start()
        return self

    def _held_by(self, seen: _Seen) -> str:
        return (f"output {self.uri} is being written by another run: {_describe(seen.holder)}, last "
                f"heartbeat {seen.age_s:.0f} s ago; wait for it to end (a lock without heartbeat for "
                f"{self.stale_after_s:.0f} s, or whose process has died on this host, is taken over)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                ok = self._lease.refresh(self._body())
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the lock may survive it
                log.warning("heartbeat of the lock on %s failed (retrying): %s", self.uri, exc)
                continue
            if not ok:
                self.lost = True
                log.error("the lock on %s was taken over by another run; this run must stop writing", self.uri)
                return

    def check(self) -> None:
        """Raise StageError when this run no longer holds the lock (another run took it over)."""
        if self.lost:
            raise StageError(f"output {self.uri} was taken over by another run (this run's heartbeat "
                             f"stopped for over {self.stale_after_s:.0f} s); stopped writing")

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._lease.release()

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a run whose lock file is unreadable"
    return (f"{holder.get('command', '?')!r} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {holder.get('started_at', '?')})")
