"""The URI layer on local files and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.errors import InputError, StorageError
from pipelines.storage import Location, S3Settings


def test_round_trip_bytes_json_and_listing(any_root):
    root = Location.parse(any_root)
    root.join("a", "one.json").write_json({"x": 1})
    root.join("a", "b", "two.bin").write_bytes(b"\x00\x01")
    assert root.join("a", "one.json").read_json() == {"x": 1}
    assert root.join("a", "b", "two.bin").read_bytes() == b"\x00\x01"
    assert root.join("a", "one.json").exists() and root.join("a", "one.json").is_file()
    assert not root.join("a", "nope.json").exists()
    listed = [loc.uri for loc in root.join("a").list_files()]
    assert listed == [f"{root.uri}/a/b/two.bin", f"{root.uri}/a/one.json"]
    assert [loc.uri for loc in root.join("a").list_files(recursive=False)] == [f"{root.uri}/a/one.json"]
    assert [loc.name for loc in root.join("a").list_dirs()] == ["b"]


def test_failed_write_leaves_nothing(any_root):
    target = Location.parse(any_root).join("partial.parquet")
    with pytest.raises(RuntimeError, match="boom"):
        with target.open_atomic_output() as stream:
            stream.write(b"x" * 100_000)
            raise RuntimeError("boom")
    assert not target.exists()
    # and nothing else is left behind under a temporary name either
    assert Location.parse(any_root).list_files() == []


def test_parquet_readable_with_plain_pyarrow(any_root):
    target = Location.parse(any_root).join("t.parquet")
    with target.open_atomic_output() as stream:
        pq.write_table(pa.table({"a": [1, 2, 3]}), stream)
    assert pq.read_table(target.path, filesystem=target.fs).column("a").to_pylist() == [1, 2, 3]


def test_missing_file_is_an_input_error_naming_the_uri(any_root):
    missing = Location.parse(any_root).join("missing.json")
    with pytest.raises(InputError, match="missing.json.*not found"):
        missing.read_json()


def test_invalid_json_is_reported(any_root):
    location = Location.parse(any_root).join("bad.json")
    location.write_bytes(b"{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        location.read_json()


def test_unsupported_scheme():
    with pytest.raises(InputError, match="unsupported storage URI"):
        Location.parse("gs://bucket/x")


def test_wrong_secret_is_rejected_without_printing_it(s3_store, s3_root, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-123")
    fs = storage._s3_filesystem(S3Settings())
    location = Location(f"{s3_root}/x.json", fs)
    with pytest.raises(StorageError) as caught:
        location.write_bytes(b"{}")
    message = str(caught.value)
    assert "not-the-secret-123" not in message and s3_store.secret_key not in message
    assert "secret key does not match" in message or "access denied" in message


def test_unknown_access_key_is_rejected(s3_store, s3_root, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    fs = storage._s3_filesystem(S3Settings())
    with pytest.raises(StorageError, match="access key|access denied"):
        Location(f"{s3_root}/x.json", fs).write_bytes(b"{}")


def test_missing_bucket_is_reported(s3_store):
    # (SeaweedFS creates buckets on upload for admin identities, so this reads rather than writes.)
    with pytest.raises((InputError, StorageError), match="no-such-bucket-xyz"):
        Location.parse("s3://no-such-bucket-xyz/a/b.json").read_bytes()


def test_unreachable_endpoint_fails_fast_with_a_clear_message(s3_store):
    from pipelines.objectstore import free_port

    settings = S3Settings(endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="cannot connect|endpoint"):
        Location.parse("s3://adpipe-test/x.json", settings).read_bytes()


def test_endpoint_comes_from_environment(s3_store):
    assert S3Settings().resolved_endpoint() == s3_store.endpoint
    assert S3Settings(endpoint="http://other:9000").resolved_endpoint() == "http://other:9000"


def test_location_repr_has_no_credentials(s3_store, s3_root):
    location = Location.parse(s3_root)
    assert s3_store.secret_key not in repr(location)
    assert s3_store.secret_key not in location.describe()


@pytest.mark.parametrize("part", ["..", "../../escaped", "a/../b", ".", "", "a//b", "%2e%2e", "%2E%2e/x",
                                  ".%2e", "a\0b", "a\\..\\b", "/etc/passwd"])
def test_joining_an_unsafe_path_is_refused(tmp_path, part):
    root = Location.parse(str(tmp_path))
    with pytest.raises(InputError, match="unsafe path"):
        root.join("scores", part)


def test_safe_relative_paths_join(tmp_path):
    root = Location.parse(str(tmp_path))
    assert root.join("images", "cell0001.png").uri == f"file://{tmp_path}/images/cell0001.png"
    assert root.join("date=2026-11-21/cam 1.png", "..x").uri.endswith("date=2026-11-21/cam 1.png/..x")


def test_a_manifest_listing_parts_outside_its_folder_is_refused(tmp_path):
    import json

    from pipelines import datasets

    folder = Location.parse(str(tmp_path)).join("datasets", "evil", "1")
    datasets.publish(folder, name="evil", version="1", table="images", schema=pa.schema([("a", pa.int32())]),
                     parts=[datasets.PartRecord(path="../../../outside.parquet", rows=1, bytes=1)], lineage={})
    manifest = datasets.read_manifest(folder)
    with pytest.raises(InputError, match="unsafe path '../../../outside.parquet'"):
        datasets.part_locations(folder, manifest)
    assert json.loads(folder.join("_manifest.json").read_bytes())["name"] == "evil"


def test_the_object_store_cli_leaves_no_sockets_behind(tmp_path):
    """`python -m pipelines.objectstore up/down` (what ops/objectstore.sh runs): every local socket
    weed makes in /tmp is named after a port the server recorded, and `down` removes them all
    (weed itself leaves most behind, a few per server and test run)."""
    from pipelines import objectstore

    def weed_sockets() -> set:
        return set(objectstore.LOCAL_SOCKET_DIR.glob("seaweedfs-*.sock"))

    state_dir = tmp_path / "store"
    before = weed_sockets()  # other servers' (the session's store, litter of older weed runs)
    assert objectstore.main(["up", "--state-dir", str(state_dir)]) == 0
    store = objectstore.load_state(state_dir)
    assert store is not None and len(store.ports) == 8
    try:
        sockets = objectstore.local_sockets(store.ports)
        # weed makes them as its servers come up; S3 answering means the s3 and master ones exist
        assert any("master-grpc" in p.name for p in sockets) and any("-s3-" in p.name for p in sockets), sockets
        assert weed_sockets() - before <= set(sockets), "a socket named after a port the store did not record"
    finally:
        assert objectstore.main(["down", "--state-dir", str(state_dir)]) == 0
    assert objectstore.local_sockets(store.ports) == []
    assert objectstore.main(["down", "--state-dir", str(state_dir)]) == 0  # already stopped: still fine


def test_a_restarted_object_store_serves_every_object_as_soon_as_it_starts(tmp_path):
    """A restart over existing data returns only when the master knows every volume on disk: S3
    answers before that, and a read in between fails with "volume N not found" (seen once in CI,
    the nightly fault test reading its lease right after restarting the store)."""
    import boto3

    from pipelines import objectstore

    def client(store):
        return boto3.client("s3", endpoint_url=store.endpoint, aws_access_key_id=store.access_key,
                            aws_secret_access_key=store.secret_key, region_name="us-east-1")

    state_dir = tmp_path / "store"
    store = objectstore.start(state_dir, buckets=["restart-reads"])
    try:
        for i in range(12):
            client(store).put_object(Bucket="restart-reads", Key=f"k{i}", Body=bytes([i]) * 1000)
    finally:
        objectstore.stop_server(store)
    on_disk = objectstore._volumes_on_disk(Path(store.data_dir))
    assert len(on_disk) >= 2, on_disk  # weed spreads a bucket over several volumes
    store = objectstore.start(state_dir)
    try:
        assert on_disk <= objectstore._volumes_known_to_master(store.master_port)
        s3 = client(store)
        assert [s3.get_object(Bucket="restart-reads", Key=f"k{i}")["Body"].read() for i in range(12)] \
            == [bytes([i]) * 1000 for i in range(12)]
    finally:
        objectstore.stop_server(store)
