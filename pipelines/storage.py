"""One URI layer for `file://` and `s3://`, on pyarrow filesystems.

A `Location` is a URI plus the filesystem that serves it; everything adpipe reads or writes goes
through one. S3 endpoints come from the spec or `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`;
credentials come from the environment or the standard AWS files (resolved by the AWS SDK in each process),
never from a spec, and are never printed: error messages name the URI and endpoint only.

Writes are atomic: a local file is written under a temporary name and renamed; an S3 object only
becomes visible when its upload completes.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.errors import InputError, StorageError

DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Settings:
    """Where an S3 endpoint is; no secrets in here (they are resolved when a filesystem is built)."""

    endpoint: str | None = None
    region: str | None = None

    def resolved_endpoint(self) -> str | None:
        return self.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    endpoint = settings.resolved_endpoint()
    kwargs: dict[str, Any] = {
        "region": settings.region or os.environ.get("AWS_REGION") or DEFAULT_REGION,
        # Fail fast on a wrong endpoint instead of retrying for minutes.
        "connect_timeout": 5,
        "request_timeout": 60,
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    # No keys are given: the AWS SDK inside pyarrow resolves them with the standard chain
    # (environment, shared credentials and config files, profiles) in each process that uses the
    # filesystem. A filesystem built with explicit keys carries them when pickled (Ray pickles it
    # into read tasks and Ray Train workers); one without them pickles as endpoint and region only,
    # and a Ray worker (on a cluster: with the cluster's identity) finds its own credentials.
    return pafs.S3FileSystem(**kwargs)


_FILESYSTEMS: dict[tuple[str, S3Settings], pafs.FileSystem] = {}


def filesystem_for(scheme: str, settings: S3Settings) -> pafs.FileSystem:
    """This process's filesystem for a scheme and S3 settings (built once, with this process's
    environment: also where an unpickled Location gets its filesystem)."""
    key = (scheme, settings if scheme == "s3" else S3Settings())
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = pafs.LocalFileSystem() if scheme == "file" else _s3_filesystem(settings)
    return _FILESYSTEMS[key]


@dataclass(frozen=True)
class Location:
    """A file or folder in storage: `uri` for people and records, `fs` + `path` for pyarrow.

    The filesystem stays in the process that built it (it holds the credentials it resolved) and
    is left out of repr and comparisons. Pickled (into a Ray task, say), a location is its `uri`
    and `settings` only; the receiving process builds its own filesystem with `filesystem_for`,
    from its own environment and AWS files: on a cluster, the cluster's identity. (An embedded
    Ray's workers inherit the environment the driver had when Ray started.)
    """

    uri: str
    fs: pafs.FileSystem = field(compare=False, repr=False)
    settings: S3Settings = S3Settings()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Location._from_pickle, (self.uri, self.settings))

    @classmethod
    def _from_pickle(cls, uri: str, settings: S3Settings) -> Location:
        return cls(uri, filesystem_for(uri.split("://", 1)[0], settings), settings)

    @classmethod
    def parse(cls, uri: str, settings: S3Settings | None = None) -> Location:
        if uri.startswith("/"):
            uri = "file://" + uri
        if not (uri.startswith("file://") or uri.startswith("s3://")):
            raise InputError(f"unsupported storage URI {uri!r}: expected file:///abs/path or s3://bucket/prefix")
        settings = settings or S3Settings()
        scheme = uri.split("://", 1)[0]
        return cls(uri.rstrip("/") if uri != "file:///" else uri, filesystem_for(scheme, settings), settings)

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]

    @property
    def path(self) -> str:
        """The path in pyarrow's form: `/abs/path` locally, `bucket/key` on S3."""
        rest = self.uri.split("://", 1)[1]
        return rest if self.scheme == "file" else rest.strip("/")

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def join(self, *parts: str) -> Location:
        """A location below this one. Every segment of `parts` is checked, because some come from
        storage (a manifest's name or part paths) and are not to be trusted: a `..` there must not
        reach outside the storage root."""
        for part in parts:
            check_relative_path(part)
        return Location(posixpath.join(self.uri, *parts), self.fs, self.settings)

    def parent(self) -> Location:
        head = posixpath.dirname(self.uri)
        return Location(head if not head.endswith(":/") else self.uri, self.fs, self.settings)

    def describe(self) -> str:
        """The URI, plus the endpoint for S3: what an error message shows (never credentials)."""
        if self.scheme == "s3":
            return f"{self.uri} (endpoint {self.settings.resolved_endpoint() or 'AWS default'})"
        return self.uri

    # ---- errors -------------------------------------------------------------------------------

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise InputError(f"cannot {action} {self.describe()}: not found") from None
        except OSError as error:
            raise StorageError(f"cannot {action} {self.describe()}: {_explain(error)}") from None

    # ---- reading ------------------------------------------------------------------------------

    def exists(self) -> bool:
        with self._errors("look up"):
            return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        with self._errors("look up"):
            return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self._errors("read"):
            with self.fs.open_input_stream(self.path) as stream:
                return stream.read()

    def read_json(self) -> Any:
        data = self.read_bytes()
        try:
            return json.loads(data)
        except ValueError as error:
            raise InputError(f"{self.describe()} is not valid JSON: {error}") from None

    def list_files(self, recursive: bool = True) -> list[Location]:
        """Files (not folders, not S3 directory-marker keys) below this folder, sorted by URI."""
        return [location for location, _ in self.list_file_sizes(recursive)]

    def list_file_sizes(self, recursive: bool = True) -> list[tuple[Location, int]]:
        """`list_files` with each file's size in bytes (from the same listing: no extra requests)."""
        with self._errors("list"):
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))
        base = self.uri
        out = []
        for info in infos:
            if info.type != pafs.FileType.File or info.path.endswith("/"):
                continue
            relative = posixpath.relpath(info.path, self.path)
            out.append((Location(posixpath.join(base, relative), self.fs, self.settings), int(info.size or 0)))
        return sorted(out, key=lambda pair: pair[0].uri)

    def list_dirs(self) -> list[Location]:
        with self._errors("list"):
            if not self.exists():
                return []
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted(
            (Location(posixpath.join(self.uri, posixpath.basename(i.path.rstrip("/"))), self.fs, self.settings)
             for i in infos if i.type == pafs.FileType.Directory),
            key=lambda loc: loc.uri,
        )

    # ---- writing ------------------------------------------------------------------------------

    @contextmanager
    def open_atomic_output(self) -> Iterator[Any]:
        """A stream whose content appears at this location only if the block finishes."""
        with self._errors("write"):
            if self.scheme == "file":
                os.makedirs(posixpath.dirname(self.path), exist_ok=True)
                temporary = f"{self.path}.tmp-{uuid.uuid4().hex[:12]}"
                try:
                    with self.fs.open_output_stream(temporary) as stream:
                        yield stream
                    os.replace(temporary, self.path)
                finally:
                    if os.path.exists(temporary):
                        os.unlink(temporary)
            else:
                # pyarrow's S3 stream commits the upload when it is closed, even when the block
                # raised (Python cannot abort it), so the content is buffered and only uploaded
                # once complete. Parts are bounded by rows_per_part, so the buffer stays small.
                buffer = pa.BufferOutputStream()
                yield buffer
                data = buffer.getvalue()
                with self.fs.open_output_stream(self.path) as stream:
                    stream.write(data)

    def write_bytes(self, data: bytes) -> None:
        with self.open_atomic_output() as stream:
            stream.write(data)

    def write_json(self, value: Any) -> None:
        self.write_bytes(json.dumps(value, indent=2, sort_keys=True, default=str).encode() + b"\n")

    def delete(self) -> None:
        with self._errors("delete"):
            if self.exists():
                self.fs.delete_file(self.path)


def check_relative_path(path: str) -> str:
    """Refuse a relative path that could point anywhere but below the folder it is joined to:
    absolute, empty segments, `.` / `..` (also percent-encoded), NUL or backslashes."""
    segments = path.split("/") if isinstance(path, str) else [None]
    for segment in segments:
        unsafe = (segment is None or segment in ("", ".", "..") or "\0" in segment or "\\" in segment
                  or segment.lower().replace("%2e", ".") in (".", ".."))
        if unsafe:
            raise InputError(f"unsafe path {path!r}: path components must not be empty, '.', '..', absolute, "
                             "or contain NUL or backslashes")
    return path


def _explain(error: OSError) -> str:
    text = str(error)
    for code, meaning in (
        ("ACCESS_DENIED", "access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"),
        ("INVALID_ACCESS_KEY_ID", "the access key is not known to the server (check AWS_ACCESS_KEY_ID)"),
        ("SIGNATURE_DOES_NOT_MATCH", "the secret key does not match (check AWS_SECRET_ACCESS_KEY)"),
        ("NO_SUCH_BUCKET", "the bucket does not exist"),
        ("Bucket does not exist", "the bucket does not exist"),
        ("NETWORK_CONNECTION", "cannot connect to the S3 endpoint (is it running? check AWS_ENDPOINT_URL_S3)"),
        ("Couldn't connect", "cannot connect to the S3 endpoint (is it running? check AWS_ENDPOINT_URL_S3)"),
    ):
        if code in text:
            return meaning
    return text.splitlines()[0] if text else type(error).__name__
