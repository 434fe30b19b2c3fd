"""Shared fixtures: one local Ray per test session, a moto S3 server, demo data.

Dummy AWS credentials are set before Ray starts so that every Ray worker inherits them;
they only ever reach the moto server the tests start on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_ENDPOINT_URL_S3", None)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from emotion_ray import runtime  # noqa: E402

runtime.setup_process()  # before anything imports TensorFlow
from emotion_ray.demo import make_demo_dataset  # noqa: E402

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    runtime.init_ray("local")  # a private instance, even while a test's `ray start` head runs
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real moto S3 server on a free loopback port, stopped by the process id we started."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture()
def s3_bucket(s3_endpoint, request):
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:40] + f"-{int(time.time() * 1000) % 100000}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory) -> Path:
    """100 small demo faces per class: enough for a model to beat chance clearly."""
    root = tmp_path_factory.mktemp("demo") / "images"
    make_demo_dataset(root, per_class=100, seed=1, canvas=96)
    return root


@pytest.fixture(scope="session")
def prepared_demo(ray_session, demo_images, tmp_path_factory) -> Path:
    from emotion_ray.config import PrepareConfig
    from emotion_ray.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "ds"
    prepare(PrepareConfig(inputs=[str(demo_images)], output=str(out), image_size=48))
    return out


@pytest.fixture(scope="session")
def tiny_prepared(ray_session, tmp_path_factory) -> Path:
    """36 demo faces (12 a class) prepared at 32 px: the smallest data a search or a 2-fold
    cross-validation runs end to end on, for tests about how runs are scheduled, not what they learn."""
    from emotion_ray.config import PrepareConfig
    from emotion_ray.prepare import prepare

    root = tmp_path_factory.mktemp("tiny")
    make_demo_dataset(root / "images", per_class=12, seed=2, canvas=48)
    prepare(PrepareConfig(inputs=[str(root / "images")], output=str(root / "ds"), image_size=32))
    return root / "ds"


READERS = ("pandas", "polars", "polars *.parquet", "duckdb *", "duckdb *.parquet", "pyarrow.dataset")


def read_with_every_reader(folder: Path) -> dict[str, int]:
    """The rows each reader finds in a Parquet folder, pointed at it as its users would (README)."""
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads

    return {
        "pandas": len(pd.read_parquet(folder)),
        "polars": pl.read_parquet(folder).height,
        "polars *.parquet": pl.read_parquet(folder / "*.parquet").height,
        "duckdb *": duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder}/*')").fetchall()[0][0],
        "duckdb *.parquet": duckdb.sql(f"SELECT count(*) FROM '{folder}/*.parquet'").fetchall()[0][0],
        "pyarrow.dataset": pads.dataset(folder, format="parquet").count_rows(),
    }


def ray_processes(kind: str) -> list:
    """This test session's Ray processes whose command line names `kind` (e.g. RayTrainWorker,
    TrainController): its Ray runs under this process; other Rays on the machine don't count."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if kind in " ".join(p.cmdline())]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
