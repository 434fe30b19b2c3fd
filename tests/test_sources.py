"""Listing inputs (one skip rule for folders, archives and path lists) and the decode UDF."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile

import pyarrow as pa
import pytest
from PIL import Image

from emotion_ray import storage
from emotion_ray.config import DecodeLimits, StorageConfig
from emotion_ray.sources import decode_table, list_images, skip_reason


def jpeg(colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("relative, reason", [
    ("happy/a.jpg", None), ("./happy/a.jpg", None), ("a.PNG", None),
    ("happy/.a.jpg", "hidden"), (".cache/a.jpg", "hidden"), ("happy/notes.txt", "not_an_image_extension"),
    ("happy/", "not_an_image_extension"),
])
@pytest.mark.fast
def test_one_skip_rule(relative, reason):
    assert skip_reason(relative) == reason


@pytest.mark.fast
def test_folders_archives_and_path_lists_share_the_rule(tmp_path):
    (tmp_path / "in" / "happy").mkdir(parents=True)
    (tmp_path / "in" / "happy" / "a.jpg").write_bytes(jpeg())
    (tmp_path / "in" / "happy" / ".b.jpg").write_bytes(jpeg())
    (tmp_path / "in" / "happy" / "c.txt").write_text("x")
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:
        zf.writestr("sad/d.jpg", jpeg())
        zf.writestr("sad/.e.jpg", jpeg())
    with tarfile.open(tmp_path / "dot.tar", "w") as tf:  # `tar -C dir -cf dot.tar .` names members ./...
        info = tarfile.TarInfo("./angry/f.jpg")
        data = jpeg()
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (tmp_path / "list.txt").write_text(f"# a comment\n\n{tmp_path / 'in' / 'happy' / 'a.jpg'}\n")
    paths, skipped = list_images([str(tmp_path / "in"), str(tmp_path / "x.zip"), str(tmp_path / "dot.tar"),
                                  str(tmp_path / "list.txt")], StorageConfig())
    assert len(paths) == 3 and any(p.startswith("zip://sad/d.jpg::") for p in paths)
    assert any(p.startswith("tar://") and p.split("::")[0].endswith("angry/f.jpg") for p in paths)
    assert skipped.counts() == {"hidden": 2, "not_an_image_extension": 1}
    assert sorted(skipped.rows) == sorted([(str(tmp_path / "in" / "happy" / ".b.jpg"), "hidden"),
                                           (str(tmp_path / "in" / "happy" / "c.txt"), "not_an_image_extension"),
                                           (f"zip://sad/.e.jpg::{tmp_path / 'x.zip'}", "hidden")])


@pytest.mark.fast
def test_names_that_are_not_utf8_are_rows_escaped_losslessly_and_read_by_their_real_name(tmp_path):
    """A JPEG whose name holds the latin-1 byte 0xF1 between two good files: three rows, the odd
    name written `%F1` (and a `%` as `%25`), each escaped path leading back to its file's bytes."""
    folder = os.fsencode(tmp_path / "in")
    os.makedirs(folder)
    names = [b"ok_before.jpg", b"ok_after.png", b"espa\xf1a.jpg", b"50%.jpg"]
    for i, name in enumerate(names):
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(jpeg((40 * i, 90, 200)))
    paths, skipped = list_images([str(tmp_path / "in")], StorageConfig())
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["50%25.jpg", "espa%F1a.jpg", "ok_after.png",
                                                         "ok_before.jpg"]
    assert len(skipped) == 0
    for path in paths:  # lossless: the text names the real bytes of the name
        assert os.path.isfile(os.fsencode(storage.unescape(path)))
        assert storage.escape(storage.unescape(path)) == path
    rows = decode_table(pa.table({"path": paths}), 8, DecodeLimits(), StorageConfig()).to_pylist()
    assert [r["error"] for r in rows] == [None] * 4 and len({r["image"] for r in rows}) == 4


@pytest.mark.fast
def test_tar_members_with_absolute_odd_or_non_utf8_names_are_rows(tmp_path):
    """GNU tar extracts `/abs/rooted.jpg` as abs/rooted.jpg: it is a row named so (fsspec lists it
    as ''); `::`, `#`, `?`, `%` and a byte that is not UTF-8 in member names survive the path."""
    members = {"/abs/rooted.jpg": "abs/rooted.jpg", "odd/a::b.jpg": "odd/a%3A%3Ab.jpg",
               "odd/50%#?.jpg": "odd/50%25#?.jpg", "odd/espa\udcf1a.jpg": "odd/espa%F1a.jpg"}
    with tarfile.open(tmp_path / "odd.tar", "w") as tf:
        for i, name in enumerate(members):
            data = jpeg((50 * i, 10, 10))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    paths, skipped = list_images([str(tmp_path / "odd.tar")], StorageConfig())
    assert paths == sorted(f"tar://{m}::{tmp_path / 'odd.tar'}" for m in members.values()) and len(skipped) == 0
    rows = decode_table(pa.table({"path": paths}), 8, DecodeLimits(), StorageConfig()).to_pylist()
    assert [r["error"] for r in rows] == [None] * 4 and len({r["image"] for r in rows}) == 4


@pytest.mark.fast
def test_decode_table_keeps_columns_and_makes_bad_files_rows(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(jpeg())
    batch = pa.table({"path": [str(tmp_path / "ok.jpg"), str(tmp_path / "missing.jpg"), "<given>"],
                      "label": ["a", "b", "c"], "data": [None, None, b"not an image"]})
    out = decode_table(batch, 8, DecodeLimits(), StorageConfig(), hash_files=True)
    assert out.column_names == ["path", "label", "image", "width", "height", "error", "content_hash"]
    rows = out.to_pylist()
    assert len(rows[0]["image"]) == 8 * 8 * 3 and rows[0]["error"] is None and rows[0]["width"] == 20
    assert rows[1]["error"].startswith("unreadable") and rows[1]["content_hash"] is None
    assert rows[2]["error"].startswith("not_an_image") and rows[2]["content_hash"] is not None


@pytest.mark.fast
def test_member_names_are_data_never_a_filesystem(tmp_path):
    """`::`, `%`, `#`, `?` and `s3://` inside member names: scored as what they are, and a stub
    S3 endpoint on 127.0.0.1 sees no request."""
    import http.server
    import threading

    requests = []

    class Stub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            requests.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_PUT = do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    names = ["faces/a::b.jpg", "faces/x::s3://some-bucket/key.jpg", "faces/50%#?.jpg"]
    with zipfile.ZipFile(tmp_path / "odd.zip", "w") as zf, tarfile.open(tmp_path / "odd.tar", "w") as tf:
        for name in names:
            zf.writestr(name, jpeg())
            info = tarfile.TarInfo(name)
            info.size = len(jpeg())
            tf.addfile(info, io.BytesIO(jpeg()))
    store = StorageConfig(s3_endpoint_url=f"http://127.0.0.1:{server.server_address[1]}")
    try:
        paths, _ = list_images([str(tmp_path / "odd.zip"), str(tmp_path / "odd.tar")], store)
        rows = decode_table(pa.table({"path": paths}), 8, DecodeLimits(), store).to_pylist()
    finally:
        server.shutdown()
    assert len(rows) == 6 and all(r["error"] is None for r in rows), rows
    assert all(r["path"].endswith((f"::{tmp_path / 'odd.zip'}", f"::{tmp_path / 'odd.tar'}"))
               and r["path"].count("::") == 1 for r in rows)
    assert requests == []


BOMB_SCRIPT = """
import json, sys
import pyarrow as pa
from emotion_ray.config import DecodeLimits, StorageConfig
from emotion_ray.sources import decode_table, list_images
paths, _ = list_images(sys.argv[1:], StorageConfig())
rows = decode_table(pa.table({"path": paths}), 8, DecodeLimits(), StorageConfig()).to_pylist()
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (a big pytest).
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"errors": sorted(r["error"].split(":")[0] for r in rows), "peak_mib": peak_kib / 1024}))
"""


def test_bombs_are_refused_from_their_declared_size_before_any_byte_is_read(tmp_path):
    """A 2 GiB sparse file, and a zip and a tar.gz each holding a 512 MiB member: too_large rows,
    and the process's peak memory stays far below any of them."""
    import json
    import subprocess
    import sys

    member = 512 * 1024**2
    with open(tmp_path / "sparse.jpg", "wb") as fh:
        fh.truncate(2 * 1024**3)
    zeros = bytes(16 * 1024**2)
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("big.jpg", "w", force_zip64=True) as out:
            for _ in range(member // len(zeros)):
                out.write(zeros)
    with tarfile.open(tmp_path / "bomb.tar.gz", "w:gz", compresslevel=1) as tf:
        info = tarfile.TarInfo("big.jpg")
        info.size = member

        class Zeros(io.RawIOBase):
            left = member

            def readable(self):
                return True

            def readinto(self, buf):
                n = min(len(buf), self.left)
                buf[:n] = bytes(n)
                self.left -= n
                return n

        tf.addfile(info, io.BufferedReader(Zeros()))
    res = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(tmp_path / "sparse.jpg"), str(tmp_path / "bomb.zip"),
                          str(tmp_path / "bomb.tar.gz")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["errors"] == ["too_large"] * 3
    assert out["peak_mib"] < 300, out  # a member read whole would need 512 MiB


@pytest.mark.fast
def test_linked_folders_are_followed_once_and_loops_do_not_hang(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "album"
    elsewhere.mkdir(parents=True)
    for i in range(2):
        (elsewhere / f"photo{i}.jpg").write_bytes(jpeg())
    root = tmp_path / "in"
    (root / "happy").mkdir(parents=True)
    (root / "happy" / "own.jpg").write_bytes(jpeg())
    os.symlink(elsewhere, root / "happy" / "album")
    os.symlink(".", root / "happy" / "loop")
    os.symlink(tmp_path / "gone", root / "happy" / "dangling.jpg")
    paths, skipped = list_images([str(root)], StorageConfig())
    assert sorted(p.split("/in/")[1] for p in paths) == ["happy/album/photo0.jpg", "happy/album/photo1.jpg",
                                                           "happy/own.jpg"]
    assert len(skipped) == 0


@pytest.mark.fast
def test_path_lists_with_bom_crlf_relative_lines_and_bad_bytes(tmp_path):
    (tmp_path / "lists" / "imgs").mkdir(parents=True)
    (tmp_path / "lists" / "imgs" / "a.jpg").write_bytes(jpeg())
    (tmp_path / "b.jpg").write_bytes(jpeg())
    body = ("\ufeff" + "imgs/a.jpg\r\n# comment\r\n\r\n").encode() + b"bad\xf1name.jpg\n" + f"{tmp_path / 'b.jpg'}\n".encode()
    (tmp_path / "lists" / "todo.txt").write_bytes(body)
    paths, skipped = list_images([str(tmp_path / "lists" / "todo.txt")], StorageConfig())
    assert paths == sorted([str(tmp_path / "b.jpg"), str(tmp_path / "lists" / "imgs" / "a.jpg")])
    assert skipped.rows == [(str(tmp_path / "lists" / "bad%F1name.jpg"), "undecodable_list_line")]
    rows = decode_table(pa.table({"path": paths}), 8, DecodeLimits(), StorageConfig()).to_pylist()
    assert [r["error"] for r in rows] == [None, None]


@pytest.mark.fast
def test_a_decode_batch_no_node_can_hold_names_the_largest_that_fits():
    from emotion_ray.errors import StageError
    from emotion_ray.sources import check_decode_fits, decode_task_memory

    nodes = [{"CPU": 0, "memory": 1e12}, {"CPU": 4, "memory": 8 * 2**30}]  # a head that takes no work
    check_decode_fits(100, 256, None, nodes)
    check_decode_fits(10**7, 256, None, None)  # node sizes unknown (autoscaling from zero): Ray decides
    with pytest.raises(StageError, match=r"needs 110\.1 GiB .* largest has 8\.0 GiB.*at most (\d+)") as err:
        check_decode_fits(200_000, 256, None, nodes)
    most = int(err.value.args[0].split("at most ")[1].split(",")[0])
    assert decode_task_memory(most, 256) <= 8 * 2**30 < decode_task_memory(most + 1, 256)
