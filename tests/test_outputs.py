"""Ownership markers and the output lock (issue #19 items 1 and 2), on local folders and moto S3.

No Ray here: this is storage-level. Races run as real `python -c` processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emotion_ray import outputs, storage
from emotion_ray.config import StorageConfig
from emotion_ray.errors import ConfigError, StageError

MARKER = "_emotion_ray_dataset"
PREPARE_NAMES = ["split=*", "rejects.parquet", "manifest.json"]  # what prepare writes (old markers)
ROOT = str(Path(__file__).resolve().parents[1])


def write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fake_prepare_output(out: str, cfg: StorageConfig | None = None) -> None:
    """What a prepare run leaves: the marker listing its names, then the names themselves."""
    outputs.claim_folder(out, MARKER, "prepare", cfg)
    outputs.record_written(out, MARKER, ["split=train", "split=val", "rejects.parquet", "manifest.json"], cfg)
    for name in ["split=train/a.parquet", "split=val/b.parquet", "rejects.parquet", "manifest.json"]:
        storage.write_bytes_atomic(storage.join(out, *name.split("/")), b"ours", cfg)


# --- ownership -----------------------------------------------------------------------------------

def test_cleanup_deletes_only_what_the_marker_lists(tmp_path):
    """Fault 1: a user's raw/ and notes.txt in a prepared folder survive an --overwrite cleanup."""
    out = str(tmp_path / "ds")
    fake_prepare_output(out)
    write(tmp_path / "ds" / "raw" / "happy" / "1.jpg", "user image")
    write(tmp_path / "ds" / "notes.txt", "user notes")

    names = outputs.claim_folder(out, MARKER, "prepare")
    removed = outputs.remove_owned(out, MARKER, first=["manifest.json"])

    assert removed[0] == "manifest.json"
    assert sorted(removed) == ["manifest.json", "rejects.parquet", "split=train", "split=val"]
    assert "raw" in names and "notes.txt" in names
    assert sorted(os.listdir(out)) == [MARKER, "notes.txt", "raw"]
    assert (tmp_path / "ds" / "raw" / "happy" / "1.jpg").read_text() == "user image"
    assert (tmp_path / "ds" / "notes.txt").read_text() == "user notes"
    assert json.loads((tmp_path / "ds" / MARKER).read_text())["written"] == []


def test_keep_patterns_and_leftover_temp_files(tmp_path):
    """Score's re-run: part files stay (resume), _SUCCESS.json and an interrupted part's temp go."""
    out = str(tmp_path / "scores")
    outputs.claim_folder(out, "_emotion_ray_scores", "score")
    outputs.record_written(out, "_emotion_ray_scores", ["part-a-00000.parquet", "part-a-00001.parquet",
                                                        "_SUCCESS.json"])
    for name in ["part-a-00000.parquet", "_SUCCESS.json", "part-a-00001.parquet.tmp-0123abcd", "notes.txt",
                 "part-user.parquet.tmp-1"]:
        write(tmp_path / "scores" / name)

    removed = outputs.remove_owned(out, "_emotion_ray_scores", keep=["part-*.parquet"])

    assert sorted(removed) == ["_SUCCESS.json", "part-a-00001.parquet.tmp-0123abcd"]
    assert sorted(os.listdir(out)) == ["_emotion_ray_scores", "notes.txt", "part-a-00000.parquet",
                                       "part-user.parquet.tmp-1"]
    marker = json.loads((tmp_path / "scores" / "_emotion_ray_scores").read_text())
    assert marker["written"] == ["part-a-00000.parquet", "part-a-00001.parquet"]


@pytest.mark.fast
def test_a_stage_s_own_marker_fields_survive_every_ownership_update(tmp_path):
    """Score remembers its model in the marker; claiming, recording and cleaning keep it."""
    out = str(tmp_path / "scores")
    assert outputs.marker_fields(out, "_emotion_ray_scores") == {}
    outputs.claim_folder(out, "_emotion_ray_scores", "score")
    outputs.set_marker_fields(out, "_emotion_ray_scores", {"model": {"sha256": "ab"}})
    outputs.record_written(out, "_emotion_ray_scores", ["data/part-a.parquet", "_SUCCESS.json"])
    write(tmp_path / "scores" / "_SUCCESS.json")
    outputs.claim_folder(out, "_emotion_ray_scores", "score")
    assert outputs.remove_owned(out, "_emotion_ray_scores", keep=["data/part-*.parquet"]) == ["_SUCCESS.json"]
    outputs.set_marker_fields(out, "_emotion_ray_scores", {"rows": 3})
    marker = json.loads((tmp_path / "scores" / "_emotion_ray_scores").read_text())
    assert marker["written"] == ["data/part-a.parquet"] and marker["owner"] == "score"
    assert outputs.marker_fields(out, "_emotion_ray_scores") == {"model": {"sha256": "ab"}, "rows": 3}


def test_old_style_marker_owns_only_the_stage_well_known_names(tmp_path):
    ds = tmp_path / "ds"
    write(ds / MARKER, json.dumps({"written_by": "emotion_ray 0.3.0", "note": "managed by prepare"}))
    for name in ["split=train/a.parquet", "manifest.json", "raw/1.jpg", "notes.txt", "split.txt"]:
        write(ds / name)

    outputs.claim_folder(str(ds), MARKER, "prepare", legacy_names=PREPARE_NAMES)
    removed = outputs.remove_owned(str(ds), MARKER)

    assert sorted(removed) == ["manifest.json", "split=train"]
    assert sorted(os.listdir(ds)) == [MARKER, "notes.txt", "raw", "split.txt"]


def test_old_style_marker_without_patterns_deletes_nothing(tmp_path):
    ds = tmp_path / "ds"
    write(ds / MARKER, json.dumps({"written_by": "emotion_ray 0.3.0"}))
    write(ds / "manifest.json")
    assert outputs.remove_owned(str(ds), MARKER) == []  # not even claimed yet
    outputs.claim_folder(str(ds), MARKER, "prepare")
    assert outputs.remove_owned(str(ds), MARKER) == []
    assert sorted(os.listdir(ds)) == [MARKER, "manifest.json"]


def test_folder_that_is_not_ours_is_refused_untouched(tmp_path):
    write(tmp_path / "photos" / "1.jpg")
    with pytest.raises(ConfigError, match="not an emotion_ray prepare output"):
        outputs.claim_folder(str(tmp_path / "photos"), MARKER, "prepare")
    assert os.listdir(tmp_path / "photos") == ["1.jpg"]


def test_output_inside_input_is_refused(tmp_path):
    write(tmp_path / "small" / "happy" / "1.jpg")
    with pytest.raises(ConfigError, match="inside input"):
        outputs.claim_folder(str(tmp_path / "small" / "ds"), MARKER, "prepare", inputs=[str(tmp_path / "small")])
    assert not (tmp_path / "small" / "ds").exists()


def test_input_inside_output_is_refused(tmp_path):
    """Fault 1's `prepare --input ds/raw --output ds --overwrite`, also through a symlink and as
    the same folder; a sibling whose name extends the output's is not inside it."""
    out = str(tmp_path / "ds")
    fake_prepare_output(out)
    write(tmp_path / "ds" / "raw" / "happy" / "1.jpg")
    (tmp_path / "link").symlink_to(tmp_path / "ds" / "raw")
    for inp in [tmp_path / "ds" / "raw", tmp_path / "link", tmp_path / "ds"]:
        with pytest.raises(ConfigError, match="inside output"):
            outputs.claim_folder(out, MARKER, "prepare", inputs=[str(inp)])
    outputs.check_apart(out, [str(tmp_path / "ds2"), "s3://bucket" + out])
    assert (tmp_path / "ds" / "raw" / "happy" / "1.jpg").exists()


def test_recorded_names_must_stay_inside_the_output(tmp_path):
    outputs.claim_folder(str(tmp_path / "ds"), MARKER, "prepare")
    for bad in ["../x", "/etc/passwd", MARKER, outputs.LOCK_NAME]:
        with pytest.raises(ValueError):
            outputs.record_written(str(tmp_path / "ds"), MARKER, [bad])


# --- the output lock, local ----------------------------------------------------------------------

RACER = """
import os, sys, time
from emotion_ray import outputs, storage
from emotion_ray.config import StorageConfig
from emotion_ray.errors import StageError
uri, go, endpoint = sys.argv[1], sys.argv[2], sys.argv[3] or None
print("READY", flush=True)
while not os.path.exists(go):
    time.sleep(0.002)
try:
    with outputs.OutputLock(uri, "racer " + str(os.getpid()), StorageConfig(s3_endpoint_url=endpoint)):
        print("WON", flush=True)
        time.sleep(3)
except StageError as exc:
    print("REFUSED", exc, flush=True)
"""


def race(uri: str, tmp_path: Path, endpoint: str = "", n: int = 2) -> list[str]:
    """Start `n` processes that take the lock on `uri` at the same moment; their outputs."""
    go = tmp_path / f"go-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, uri, str(go), endpoint], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for _ in range(n)]
    for p in procs:
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.strip())
    return outs


def assert_one_winner(outs: list[str]) -> None:
    assert sorted(o.split()[0] for o in outs) == ["REFUSED"] * (len(outs) - 1) + ["WON"], outs
    loser = next(o for o in outs if o.startswith("REFUSED"))
    assert "is being written by another run" in loser and f"on host {socket.gethostname()}" in loser
    assert "'racer " in loser and "since " in loser


def test_two_processes_race_for_the_lock_one_wins(tmp_path):
    out = str(tmp_path / "scores")
    assert_one_winner(race(out, tmp_path))
    assert os.listdir(out) == []  # released, and no helper file left behind


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def lock_body(**holder) -> str:
    return json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "pidns": outputs._pid_namespace(),
                       "command": "score (killed)", "started_at": "2026-01-01T00:00:00+00:00",
                       "token": "t0", **holder})


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
    write(tmp_path / "out" / outputs.LOCK_NAME, lock_body())
    with outputs.OutputLock(str(tmp_path / "out"), "score new") as lock:
        held = json.loads((tmp_path / "out" / outputs.LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["command"] == "score new"
        lock.check()
    assert not (tmp_path / "out" / outputs.LOCK_NAME).exists()


def test_two_processes_race_to_take_over_a_stale_lock(tmp_path):
    write(tmp_path / "out" / outputs.LOCK_NAME, lock_body())
    assert_one_winner(race(str(tmp_path / "out"), tmp_path, n=3))


def test_lock_without_heartbeat_is_stale_only_after_its_timeout(tmp_path):
    """A lock from another host: its pid cannot be checked, only its heartbeat's age."""
    path = write(tmp_path / "out" / outputs.LOCK_NAME, lock_body(host="elsewhere", pid=1, stale_after_s=60))
    with pytest.raises(StageError, match=r"pid 1 on host elsewhere, since 2026-01-01"):
        outputs.OutputLock(str(tmp_path / "out"), "score").acquire()
    old = time.time() - 61
    os.utime(path, (old, old))
    with outputs.OutputLock(str(tmp_path / "out"), "score"):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_live_lock_refuses_then_frees_on_release(tmp_path):
    out = str(tmp_path / "out")
    first = outputs.OutputLock(out, "score first", heartbeat_s=0.05).acquire()
    time.sleep(0.2)  # heartbeats run
    with pytest.raises(StageError, match=f"'score first' \\(pid {os.getpid()}"):
        outputs.OutputLock(out, "score second").acquire()
    first.release()
    first.release()
    with outputs.OutputLock(out, "score second"):
        pass


def test_lock_taken_over_is_noticed_and_not_deleted_by_the_old_holder(tmp_path):
    """A holder whose lock was replaced (it looked stale) stops (check raises) and leaves the new one."""
    out = tmp_path / "out"
    lock = outputs.OutputLock(str(out), "score slow", heartbeat_s=0.05).acquire()
    other = write(out / "other", json.dumps({"host": "elsewhere", "pid": 7, "token": "theirs"}))
    os.replace(other, out / outputs.LOCK_NAME)
    deadline = time.time() + 5
    while not lock.lost and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(StageError, match="taken over by another run"):
        lock.check()
    lock.release()
    assert json.loads((out / outputs.LOCK_NAME).read_text())["token"] == "theirs"


def test_claim_ignores_the_lock_file(tmp_path):
    out = str(tmp_path / "new")
    with outputs.OutputLock(out, "prepare"):
        assert outputs.claim_folder(out, MARKER, "prepare") == []
    assert os.listdir(out) == [MARKER]


# --- the same on S3 (moto) -----------------------------------------------------------------------

@pytest.fixture()
def s3(s3_endpoint, s3_bucket):
    return f"s3://{s3_bucket}", StorageConfig(s3_endpoint_url=s3_endpoint)


def s3_names(base: str, cfg: StorageConfig) -> list[str]:
    fs = storage.filesystem(base, cfg)
    fs.invalidate_cache()
    return sorted(p.split("/", 1)[1] for p in fs.find(storage.strip_scheme(base)))


def test_s3_cleanup_deletes_only_what_the_marker_lists(s3):
    bucket, cfg = s3
    out = f"{bucket}/ds"
    fake_prepare_output(out, cfg)
    storage.write_bytes_atomic(f"{out}/raw/happy/1.jpg", b"user image", cfg)
    storage.write_bytes_atomic(f"{out}/notes.txt", b"user notes", cfg)

    outputs.claim_folder(out, MARKER, "prepare", cfg, inputs=[f"{bucket}/ds-raw"])
    removed = outputs.remove_owned(out, MARKER, cfg, first=["manifest.json"])

    assert removed[0] == "manifest.json" and len(removed) == 4
    assert s3_names(bucket, cfg) == [f"ds/{MARKER}", "ds/notes.txt", "ds/raw/happy/1.jpg"]


def test_s3_overlapping_input_and_output_are_refused(s3):
    bucket, cfg = s3
    with pytest.raises(ConfigError, match="inside output"):
        outputs.claim_folder(f"{bucket}/ds", MARKER, "prepare", cfg, inputs=[f"{bucket}/ds/raw/"])
    with pytest.raises(ConfigError, match="inside input"):
        outputs.claim_folder(f"{bucket}/ds", MARKER, "prepare", cfg, inputs=[bucket])
    with pytest.raises(ConfigError, match="inside output"):  # an archive's member counts as its archive
        outputs.check_apart(f"{bucket}/ds", [storage.member_uri(f"{bucket}/ds/raw.zip", "happy/1.jpg")])
    outputs.check_apart(f"{bucket}/ds", [f"{bucket}/ds2", f"{bucket}/d", "/ds"])


def test_s3_old_style_marker(s3):
    bucket, cfg = s3
    out = f"{bucket}/ds"
    storage.write_bytes_atomic(f"{out}/{MARKER}", b'{"written_by": "emotion_ray 0.3.0"}', cfg)
    for name in ["split=test/a.parquet", "rejects.parquet", "notes.txt"]:
        storage.write_bytes_atomic(f"{out}/{name}", b"x", cfg)
    outputs.claim_folder(out, MARKER, "prepare", cfg, legacy_names=PREPARE_NAMES)
    assert sorted(outputs.remove_owned(out, MARKER, cfg)) == ["rejects.parquet", "split=test"]
    assert s3_names(bucket, cfg) == [f"ds/{MARKER}", "ds/notes.txt"]


def test_s3_store_honours_conditional_writes(s3):
    """moto (like S3 since 2024) answers If-None-Match: * on an existing key with 412."""
    bucket, cfg = s3
    lease = outputs._S3Lease(f"{bucket}/out", cfg)
    assert lease._conditional()
    assert lease.create(b'{"token": "a"}') and not lease.create(b'{"token": "b"}')


def test_s3_two_processes_race_for_the_lock_one_wins(s3, tmp_path):
    bucket, cfg = s3
    assert_one_winner(race(f"{bucket}/scores", tmp_path, endpoint=cfg.s3_endpoint_url))
    assert s3_names(bucket, cfg) == []


def test_s3_stale_lock_is_taken_over_and_a_live_one_refused(s3):
    bucket, cfg = s3
    key = f"{bucket}/out/{outputs.LOCK_NAME}"
    live = lock_body(host="elsewhere", pid=1, heartbeat_at=time.time())
    storage.write_bytes_atomic(key, live.encode(), cfg)
    with pytest.raises(StageError, match="pid 1 on host elsewhere"):
        outputs.OutputLock(f"{bucket}/out", "score", cfg).acquire()
    stale = lock_body(host="elsewhere", pid=1, heartbeat_at=time.time() - outputs.STALE_AFTER_S - 1)
    storage.write_bytes_atomic(key, stale.encode(), cfg)
    with outputs.OutputLock(f"{bucket}/out", "score new", cfg):
        assert storage.read_json(key, cfg)["command"] == "score new"
    assert not storage.exists(key, cfg)


def test_s3_lock_taken_over_is_noticed_and_not_deleted(s3):
    bucket, cfg = s3
    key = f"{bucket}/out/{outputs.LOCK_NAME}"
    lock = outputs.OutputLock(f"{bucket}/out", "score slow", cfg, heartbeat_s=0.1).acquire()
    storage.write_bytes_atomic(key, b'{"host": "elsewhere", "pid": 7, "token": "theirs"}', cfg)
    deadline = time.time() + 10
    while not lock.lost and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(StageError, match="taken over"):
        lock.check()
    lock.release()
    assert storage.read_json(key, cfg)["token"] == "theirs"
