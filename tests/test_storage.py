"""Paths: local vs s3://, archive member URIs."""

from __future__ import annotations

import pytest

from emotion_ray import storage

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("archive, protocol", [
    ("photos.zip", "zip"), ("s3://b/x/photos.ZIP", "zip"), ("a.tar", "tar"), ("a.tar.gz", "tar"), ("a.tgz", "tar"),
    ("a.jpg", None), ("folder", None),
])
def test_archive_protocol_by_suffix(archive, protocol):
    assert storage.archive_protocol(archive) == protocol


def test_member_uri_round_trip():
    uri = storage.member_uri("s3://bucket/photos.zip", "happy/a.jpg")
    assert uri == "zip://happy/a.jpg::s3://bucket/photos.zip"
    assert storage.split_member_uri(uri) == ("s3://bucket/photos.zip", "happy/a.jpg")
    assert storage.split_member_uri("/plain/path.jpg") is None
    assert storage.split_member_uri("s3://bucket/a.jpg") is None


def test_join_and_strip_keep_the_users_form(tmp_path):
    assert storage.join("s3://b/p/", "x", "y.json") == "s3://b/p/x/y.json"
    assert storage.strip_scheme("s3://b/p/") == "b/p"
    assert storage.strip_scheme(str(tmp_path / "a" / ".." / "b")) == str(tmp_path / "b")
    assert storage.is_s3("s3a://b/k") and not storage.is_s3("/s3/b")
