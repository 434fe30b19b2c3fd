"""Paths: local vs s3://, archive member URIs."""

from __future__ import annotations

import os

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


@pytest.mark.parametrize("raw, text", [
    (b"/data/ok_before.jpg", "/data/ok_before.jpg"), (b"/data/espa\xf1a.jpg", "/data/espa%F1a.jpg"),
    ("/data/espa\u00f1a.jpg".encode(), "/data/espa\u00f1a.jpg"), (b"/data/50%.jpg", "/data/50%25.jpg"),
    (b"/d/%F1.jpg", "/d/%25F1.jpg"), (b"/d/\xc3\xb1\xff\xc3.png", "/d/\u00f1%FF%C3.png"), (b"/d/a:b.jpg", "/d/a:b.jpg"),
])
def test_the_path_escape_is_lossless_and_leaves_plain_names_alone(raw, text):
    name = os.fsdecode(raw)  # Python's form of the name, as os.walk gives it
    assert storage.escape(name) == text
    assert os.fsencode(storage.unescape(text)) == raw


def test_member_uris_escape_the_member_and_the_archive():
    archive = os.fsdecode(b"/data/\xf1/photos.tar")
    uri = storage.member_uri(archive, "/a::b%.jpg")
    assert uri == "tar://a%3A%3Ab%25.jpg::/data/%F1/photos.tar"
    escaped_archive, member = storage.split_member_uri(uri)
    assert (storage.unescape(escaped_archive), storage.unescape(member)) == (archive, "a::b%.jpg")
    assert storage.as_listed(uri) == uri and storage.as_listed("/x/50%.jpg") == "/x/50%25.jpg"
