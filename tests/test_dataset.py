"""Reading a prepared dataset: only complete ones, one split at a time, at the manifest's size."""

from __future__ import annotations

import pytest

from emotion_ray.config import ConfigError
from emotion_ray.dataset import load_split, read_manifest


@pytest.mark.fast
def test_incomplete_dataset_is_never_read(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ConfigError, match="not a complete prepared dataset"):
        read_manifest(str(tmp_path / "half"))


def test_load_split_gives_images_of_the_manifest_size(prepared_demo):
    import ray

    manifest = read_manifest(str(prepared_demo))
    callers_reader = ray.data.DataContext.get_current().use_datasource_v2
    ds = load_split(str(prepared_demo), "val")
    assert ray.data.DataContext.get_current().use_datasource_v2 == callers_reader  # left as it was
    batch = next(iter(ds.iter_batches(batch_size=4, batch_format="numpy")))
    assert len(batch["image"][0]) == manifest["image_size"] ** 2 * 3
    assert ds.count() == manifest["split_rows"]["val"]
