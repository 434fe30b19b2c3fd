"""Local paths and `s3://` URIs behind one small interface (fsspec; s3fs for S3).

Paths handed to fsspec are "stripped" (no scheme); `join` and `uri` keep the user's form.
Writes that must appear whole go through `write_bytes_atomic`: a local temp file renamed
into place, or a single S3 PUT (S3 shows an object only once it is fully written).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import tarfile
import uuid
from functools import lru_cache
from typing import Any

import fsspec
import pyarrow.fs as pafs

from emotion_ray.config import StorageConfig

log = logging.getLogger(__name__)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://") or uri.startswith("s3a://")


def strip_scheme(uri: str) -> str:
    if is_s3(uri):
        return uri.split("://", 1)[1].rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


@lru_cache(maxsize=8)
def _s3fs(endpoint_url: str | None) -> fsspec.AbstractFileSystem:
    import s3fs

    client_kwargs = {"endpoint_url": endpoint_url} if endpoint_url else {}
    # The region comes from AWS_DEFAULT_REGION; a region in client_kwargs makes some
    # S3-compatible stores reject bucket location constraints.
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True)


# Archives are read in place, never unpacked: a member is named by fsspec's chained-URL form,
# e.g. zip://happy/a.jpg::s3://bucket/photos.zip, which is also what the output's path says.
ARCHIVE_PROTOCOLS = {".zip": "zip", ".tar": "tar", ".tar.gz": "tar", ".tgz": "tar",
                     ".tar.bz2": "tar", ".tar.xz": "tar"}


def archive_protocol(uri: str) -> str | None:
    """'zip' or 'tar' when `uri` names an archive by its suffix, else None."""
    lower = uri.lower()
    return next((proto for suffix, proto in ARCHIVE_PROTOCOLS.items() if lower.endswith(suffix)), None)


# --- Names as text --------------------------------------------------------------------------
# A local file name is bytes (any but `/` and NUL, not always UTF-8); a Parquet `path` is UTF-8
# text. One lossless escape joins them, URL-style percent-encoding: `%` is written `%25`, and
# each byte that is not part of valid UTF-8 `%XX` (a name holding the latin-1 byte 0xF1 lists
# as `caf%F1.jpg`); an archive member's name also writes `:` as `%3A` (member_uri). Everything
# else reads as it is. `escape` takes Python's form of such a name (os.fsdecode's
# surrogateescape: the byte 0xF1 is the character U+DCF1); `unescape` gives it back.

_UNESCAPED = {"": re.compile("[%\udc80-\udcff]"), ":": re.compile("[%:\udc80-\udcff]")}
_ESCAPED = re.compile("%([0-9A-Fa-f]{2})")


def _percent(match: re.Match) -> str:
    code = ord(match.group())
    return f"%{code - 0xDC00 if code >= 0xDC80 else code:02X}"


def escape(name: str, also: str = "") -> str:
    """`name` as text for a `path` column (see above); `also`: "" or ":" (member names)."""
    return _UNESCAPED[also].sub(_percent, name)


def unescape(text: str) -> str:
    """The name `escape` wrote as `text` (a stray `%` without two hex digits stays as it is)."""
    if "%" not in text:
        return text
    parts = _ESCAPED.split(text)  # odd items: the hex digits of an escaped byte
    raw = b"".join(bytes([int(part, 16)]) if i % 2 else part.encode("utf-8", "surrogateescape")
                   for i, part in enumerate(parts))
    return raw.decode("utf-8", "surrogateescape")


def as_listed(path: str) -> str:
    """A path a user named (a `.txt` list line, a `predict` argument, a `path` given to the
    MLflow model) as the `path` column writes it: escaped, unless it is an archive member's
    URI (those are written in member_uri's form already)."""
    return path if split_member_uri(path) else escape(path)


def read_listed(path: str, storage: StorageConfig | None = None, max_bytes: int | None = None) -> bytes:
    """read_bytes of a file named as the `path` column names it (escaped): read by its real name."""
    return read_bytes(path if split_member_uri(path) else unescape(path), storage, max_bytes)


def _member_path(member: str) -> str:
    """A member's name as GNU tar extracts it: a leading `/` or `./` dropped."""
    name = member.lstrip("/")
    while name.startswith("./"):
        name = name[2:].lstrip("/")
    return name


def member_uri(archive: str, member: str) -> str:
    """`zip://<member>::<archive>` (or tar://), fsspec's chained-URL form.

    Member names are data, never a filesystem: they are escaped (see above) with `:` too, as
    `%3A` (so `a::s3://b/k.jpg` cannot chain to S3), and a leading `/` or `./` is dropped (as
    GNU tar extracts such members); the archive's own path is escaped as any path is.
    """
    return f"{archive_protocol(archive)}://{escape(_member_path(member), ':')}::{escape(archive)}"


def split_member_uri(uri: str) -> tuple[str, str] | None:
    """(archive, member name), both as member_uri escaped them, for a member URI, else None."""
    head, sep, archive = uri.partition("::")
    proto, _, member = head.partition("://")
    return (archive, member) if sep and proto in ("zip", "tar") else None


def _archive_on(archive: str, handle) -> fsspec.AbstractFileSystem:
    """The members of the archive open as `handle`, as a read-only filesystem."""
    return fsspec.filesystem(archive_protocol(archive), fo=handle, skip_instance_cache=True)


# Workers keep an archive open (with its member index) across the members a decode task reads;
# an archive is assumed not to change while a job reads it.
@lru_cache(maxsize=16)
def _open_archive(archive: str, endpoint_url: str | None) -> fsspec.AbstractFileSystem:
    handle = filesystem(archive, StorageConfig(s3_endpoint_url=endpoint_url)).open(strip_scheme(archive), "rb")
    return _archive_on(archive, handle)


def _index(archive_fs: fsspec.AbstractFileSystem) -> dict[str, Any]:
    """The archive's member files by member_uri's name (_member_path) -> the member as the
    archive knows it: the zip's own name, or the tar's TarInfo. fsspec's tar filesystem strips
    a leading `/` from every name it is asked for, so a member stored as `/abs/rooted.jpg` (an
    absolute name) lists as '' and cannot be opened through it: tar members come from the tar's
    own table."""
    tar = getattr(archive_fs, "tar", None)
    if isinstance(tar, tarfile.TarFile):
        return {_member_path(m.name): m for m in tar.getmembers() if not m.isdir()}
    return {_member_path(name): name for name in archive_fs.find("", withdirs=False)}


@lru_cache(maxsize=16)
def _archive_index(archive: str, endpoint_url: str | None) -> dict[str, Any]:
    return _index(_open_archive(archive, endpoint_url))


def archive_members(archive: str, storage: StorageConfig | None = None) -> list[str]:
    """The archive's member files as it is now (paths relative to its root, as GNU tar extracts
    them: see _member_path), sorted; closes it after."""
    with filesystem(archive, storage).open(strip_scheme(archive), "rb") as handle:
        return sorted(_index(_archive_on(archive, handle)))


def filesystem(uri: str, storage: StorageConfig | None = None) -> fsspec.AbstractFileSystem:
    if is_s3(uri):
        return _s3fs((storage or StorageConfig()).s3_endpoint_url)
    return fsspec.filesystem("file")


def pyarrow_filesystem(uri: str, storage: StorageConfig | None = None) -> pafs.FileSystem:
    """The pyarrow filesystem Ray wants for `storage_filesystem=` and Parquet reads."""
    if is_s3(uri):
        endpoint = (storage or StorageConfig()).s3_endpoint_url
        return pafs.PyFileSystem(pafs.FSSpecHandler(_s3fs(endpoint))) if endpoint else pafs.S3FileSystem()
    return pafs.LocalFileSystem()


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    return filesystem(uri, storage).exists(strip_scheme(uri))


class FileTooLarge(Exception):
    """A file (or archive member) declares more bytes than a reader accepts; nothing was read."""

    reason = "too_large"  # the reject reason decoding reports (images.read_and_decode)

    def __init__(self, size: int, limit: int):
        super().__init__(f"{size} bytes > limit {limit}")
        self.size, self.limit = size, limit


def _member_reader(archive: str, member: str, storage: StorageConfig | None):
    """(declared size, opener) of the member `member` of `archive`, both as member_uri escaped them."""
    archive, name = unescape(archive), unescape(member)
    endpoint = (storage or StorageConfig()).s3_endpoint_url
    archive_fs = _open_archive(archive, endpoint)
    entry = _archive_index(archive, endpoint).get(name)
    if entry is None:
        raise FileNotFoundError(f"no member {name!r} in {archive}")
    if not isinstance(entry, tarfile.TarInfo):
        return archive_fs.info(entry).get("size"), lambda: archive_fs.open(entry, "rb")

    def extract():
        handle = archive_fs.tar.extractfile(entry)  # follows a link member to its target
        if handle is None:
            raise IsADirectoryError(f"member {name!r} of {archive} is not a file")
        return handle

    return entry.size, extract


def read_bytes(uri: str, storage: StorageConfig | None = None, max_bytes: int | None = None) -> bytes:
    """The bytes of a local file, an `s3://` object or an archive member (read_listed: of a file
    named as the `path` column names it).

    With `max_bytes`, the declared size (file system, S3 object, zip or tar header) is checked
    before anything is read, and FileTooLarge raised above it: a bomb is refused unread. A
    file that grows past its declared size is still cut at max_bytes + 1 (and then refused).
    """
    member = split_member_uri(uri)
    if member:
        size, opener = _member_reader(*member, storage)
    else:
        fs, path = filesystem(uri, storage), strip_scheme(uri)
        if max_bytes is None:
            return fs.cat_file(path)
        size, opener = fs.size(path), lambda: fs.open(path, "rb")
    if max_bytes is None:
        with opener() as handle:
            return handle.read()
    if size is not None and size > max_bytes:
        raise FileTooLarge(size, max_bytes)
    with opener() as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLarge(len(data), max_bytes)
    return data


def read_json(uri: str, storage: StorageConfig | None = None) -> Any:
    return json.loads(read_bytes(uri, storage))


def write_bytes_atomic(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    fs = filesystem(uri, storage)
    path = strip_scheme(uri)
    if is_s3(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_parquet_atomic(uri: str, table, storage: StorageConfig | None = None) -> None:
    """`table` (a pyarrow Table) as one Parquet file at `uri`, appearing whole (write_bytes_atomic)."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(uri, buf.getvalue(), storage)


def write_json_atomic(uri: str, obj: Any, storage: StorageConfig | None = None) -> None:
    write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=False, default=str).encode(), storage)


def upload_file(local_path: str, uri: str, storage: StorageConfig | None = None) -> None:
    if is_s3(uri):
        filesystem(uri, storage).put_file(local_path, strip_scheme(uri))
    else:
        with open(local_path, "rb") as fh:
            write_bytes_atomic(uri, fh.read())


def download_file(uri: str, local_path: str, storage: StorageConfig | None = None) -> str:
    filesystem(uri, storage).get_file(strip_scheme(uri), local_path)
    return local_path


def remove(uri: str, storage: StorageConfig | None = None, recursive: bool = False) -> None:
    fs = filesystem(uri, storage)
    path = strip_scheme(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def makedirs(uri: str, storage: StorageConfig | None = None) -> None:
    if not is_s3(uri):
        os.makedirs(strip_scheme(uri), exist_ok=True)


def listdir_names(uri: str, storage: StorageConfig | None = None) -> list[str]:
    fs = filesystem(uri, storage)
    path = strip_scheme(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
