"""Listing inputs (one skip rule for folders, archives and path lists) and the decode UDF."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pyarrow as pa
import pytest
from PIL import Image

from emotion_ray.config import DecodeLimits, StorageConfig
from emotion_ray.sources import decode_table, list_images, skip_reason

pytestmark = pytest.mark.fast


def jpeg(colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("relative, reason", [
    ("happy/a.jpg", None), ("./happy/a.jpg", None), ("a.PNG", None),
    ("happy/.a.jpg", "hidden"), (".cache/a.jpg", "hidden"), ("happy/notes.txt", "not_an_image_extension"),
    ("happy/", "not_an_image_extension"),
])
def test_one_skip_rule(relative, reason):
    assert skip_reason(relative) == reason


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
    assert dict(skipped) == {"hidden": 2, "not_an_image_extension": 1}


def test_decode_table_keeps_columns_and_makes_bad_files_rows(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(jpeg())
    batch = pa.table({"path": [str(tmp_path / "ok.jpg"), str(tmp_path / "missing.jpg"), "<given>"],
                      "label": ["a", "b", "c"], "data": [None, None, b"not an image"]})
    out = decode_table(batch, 8, DecodeLimits(), StorageConfig())
    assert out.column_names == ["path", "label", "image", "width", "height", "error", "content_hash"]
    rows = out.to_pylist()
    assert len(rows[0]["image"]) == 8 * 8 * 3 and rows[0]["error"] is None and rows[0]["width"] == 20
    assert rows[1]["error"].startswith("unreadable") and rows[1]["content_hash"] is None
    assert rows[2]["error"].startswith("not_an_image") and rows[2]["content_hash"] is not None
