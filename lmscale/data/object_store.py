"""Objects in S3 and S3-compatible stores (MinIO, Ceph, R2, GCS's XML API), through boto3.

boto3 rather than s3fs/fsspec: it is the AWS client the others wrap (s3fs runs aiobotocore, which pins
botocore to a narrow range and adds an event loop), it is what OLMo-core, llm-foundry's object stores and
MosaicML streaming use, and it brings the standard configuration with it: the endpoint from
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``, or a profile's ``endpoint_url``) and credentials from the
AWS chain (environment, ``AWS_PROFILE`` and ``~/.aws``, web identity, instance and container roles).

Every request is retried here, not in botocore, so that one policy covers the requests and the bodies they
return: a dropped connection mid-object resumes from the byte it reached with a ranged GET, after a backoff,
and a read that keeps making progress never runs out of tries. Errors that retrying cannot cure (no such
bucket or key, refused credentials) and transport errors that outlast the tries end in one line naming the
URL (``ObjectStoreError``).
"""

from __future__ import annotations

import fnmatch
import io
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lmscale.errors import LmscaleError, UsageError, one_line

SCHEME = "s3://"
TRIES = 6
"""Tries of a request that fails without progress; waits between them double from BACKOFF_SECONDS."""
BACKOFF_SECONDS = 0.25
MAX_BACKOFF_SECONDS = 8.0
READ_CHUNK = 8 * 2**20
BODY_READ = 2**20
"""Bytes asked of a response body at a time. A body cut short returns what arrived before the next read fails,
so a resumed request starts at the first byte missing."""
RETRIED_CODES = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                 "Throttling", "ThrottlingException", "RequestLimitExceeded"}  # fmt: skip
CREDENTIAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                    "403", "AllAccessDisabled", "AccountProblem"}  # fmt: skip
T = TypeVar("T")


class ObjectStoreError(LmscaleError):
    """A request to the object store failed for good; the message names the URL."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing
        """The bucket or the object does not exist."""


def is_s3(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(SCHEME)


@dataclass(frozen=True)
class ObjectUrl:
    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> ObjectUrl:
        bucket, _, key = url.removeprefix(SCHEME).partition("/")
        if not bucket:
            raise UsageError(f"{url}: no bucket (expected s3://BUCKET/KEY)")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"


_clients: dict[int, Any] = {}


def client() -> Any:
    """This process's S3 client: one per pid, as a client must not cross a fork (DataLoader workers)."""
    pid = os.getpid()
    if pid not in _clients:
        import boto3
        from botocore.config import Config

        config = Config(connect_timeout=20, read_timeout=60, retries={"total_max_attempts": 1},
                        max_pool_connections=32)  # fmt: skip
        _clients.clear()
        _clients[pid] = boto3.session.Session().client("s3", config=config)
        for name in ("boto3", "botocore", "s3transfer", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)  # where credentials were found, at every start
    return _clients[pid]


def _error_code(err: BaseException) -> str | None:
    response = getattr(err, "response", None)
    return str(response.get("Error", {}).get("Code")) if isinstance(response, dict) else None


def _transient(err: BaseException) -> bool:
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as TransportError

    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return _error_code(err) in RETRIED_CODES or status >= 500
    # Connection refused or reset, timeouts, a body cut short: the transport, not the request.
    return isinstance(err, TransportError | HTTPClientError | IncompleteReadError | ConnectionError | TimeoutError)


def describe(err: BaseException, url: str) -> str:
    """One line for a failed request on ``url``, saying what to fix where that is known."""
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    code = _error_code(err)
    if code in ("NoSuchBucket",):
        return f"{url}: the bucket {ObjectUrl.parse(url).bucket} does not exist"
    if code in ("NoSuchKey", "404", "NotFound"):
        return f"{url}: no such object"
    if code in CREDENTIAL_CODES:
        return (f"{url}: access refused ({code}); check the credentials (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the bucket's policy")  # fmt: skip
    if isinstance(err, NoCredentialsError | PartialCredentialsError):
        return f"{url}: no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    if isinstance(err, EndpointConnectionError):
        return f"{url}: cannot reach the endpoint {client().meta.endpoint_url} (AWS_ENDPOINT_URL)"
    return f"{url}: {one_line(err)}"


def failed(err: BaseException, url: str, failures: int, where: str = "") -> ObjectStoreError:
    suffix = f" (after {failures} tries{where})" if failures > 1 else ""
    missing = _error_code(err) in ("NoSuchBucket", "NoSuchKey", "404", "NotFound")
    return ObjectStoreError(describe(err, url) + suffix, missing=missing)


def backoff(failures: int) -> float:
    """Seconds to wait after the ``failures``-th failure in a row: doubling, capped, with jitter so that the
    ranks of a job do not retry in step."""
    return min(BACKOFF_SECONDS * 2 ** (failures - 1), MAX_BACKOFF_SECONDS) * random.uniform(0.5, 1.0)


def retrying(url: str, request: Callable[[], T]) -> T:
    """``request()``, tried again after a transient failure, up to TRIES times in all."""
    from botocore.exceptions import BotoCoreError, ClientError

    for failures in range(1, TRIES + 1):
        try:
            return request()
        except (BotoCoreError, ClientError, OSError) as err:
            if not _transient(err) or failures == TRIES:
                raise failed(err, url, failures) from None
            time.sleep(backoff(failures))
    raise AssertionError("unreachable")


class ObjectReader(io.RawIOBase):
    """An object as a seekable binary file. Reads stream one ranged GET from the current position; a
    connection that breaks mid-body is reopened where it broke."""

    def __init__(self, url: str, size: int | None = None) -> None:
        super().__init__()
        self.url, self.location = url, ObjectUrl.parse(url)
        self.position = 0
        self._size = size
        self._body: Any = None

    @property
    def size(self) -> int:
        if self._size is None:
            head = retrying(self.url, lambda: client().head_object(Bucket=self.location.bucket,
                                                                   Key=self.location.key))  # fmt: skip
            self._size = int(head["ContentLength"])
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        if base + offset != self.position:
            self._drop_body()
            self.position = base + offset
        return self.position

    def _open_body(self) -> Any:
        response = client().get_object(Bucket=self.location.bucket, Key=self.location.key,
                                       Range=f"bytes={self.position}-")  # fmt: skip
        if self._size is None:
            self._size = self.position + int(response["ContentLength"])
        return response["Body"]

    def _drop_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        view = memoryview(buffer).cast("B")
        if (self._size is not None and self.position >= self._size) or not len(view):
            return 0
        for failures in range(1, TRIES + 1):
            try:
                if self._body is None:
                    self._body = self._open_body()
                data = self._body.read(min(len(view), self.size - self.position, BODY_READ))
                if not data:
                    raise ConnectionError(f"the body ended at byte {self.position} of {self.size}")
            except (BotoCoreError, ClientError, OSError) as err:
                self._drop_body()
                if _error_code(err) == "InvalidRange":
                    self._size = self.position  # an empty object: no byte range to read
                    return 0
                if not _transient(err) or failures == TRIES:
                    raise failed(err, self.url, failures, f" at byte {self.position}") from None
                time.sleep(backoff(failures))
                continue
            view[: len(data)] = data
            self.position += len(data)
            return len(data)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._drop_body()
        super().close()


def open_object(url: str) -> io.BufferedReader:
    return io.BufferedReader(ObjectReader(url), buffer_size=READ_CHUNK)


def read_object(url: str) -> bytes:
    """The whole object, resumed across dropped connections."""
    with ObjectReader(url) as reader:
        data = bytearray()
        while chunk := reader.read(BODY_READ):
            data += chunk
    return bytes(data)


def exists(url: str) -> bool:
    location = ObjectUrl.parse(url)
    try:
        retrying(url, lambda: client().head_object(Bucket=location.bucket, Key=location.key))
    except ObjectStoreError as err:
        if not err.missing:
            raise
        _check_bucket(location.bucket, url)
        return False
    return True


def _check_bucket(bucket: str, url: str) -> None:
    """HEAD of a missing key answers 404 whether or not its bucket exists: a missing bucket is an error."""
    try:
        retrying(url, lambda: client().head_bucket(Bucket=bucket))
    except ObjectStoreError as err:
        if err.missing:
            raise ObjectStoreError(f"{url}: the bucket {bucket} does not exist", missing=True) from None
        raise


def list_objects(prefix_url: str) -> list[str]:
    """The URLs of every object under ``prefix_url`` (a folder: a trailing / is implied), in key order."""
    location = ObjectUrl.parse(prefix_url.rstrip("/") + "/")
    key_prefix = "" if location.key == "/" else location.key
    urls: list[str] = []
    query = {"Bucket": location.bucket, "Prefix": key_prefix}
    while True:
        page = retrying(prefix_url, lambda query=query: client().list_objects_v2(**query))
        urls.extend(f"{SCHEME}{location.bucket}/{item['Key']}" for item in page.get("Contents", []))
        if not page.get("IsTruncated"):
            return sorted(urls)
        query = {**query, "ContinuationToken": page["NextContinuationToken"]}


def glob_objects(pattern_url: str) -> list[str]:
    """The objects whose URL matches a glob pattern (``*`` crosses folders, as keys have none)."""
    literal = pattern_url[: min(pattern_url.index(ch) for ch in "*?[" if ch in pattern_url)]
    folder = literal[: literal.rfind("/") + 1]
    return [url for url in list_objects(folder) if fnmatch.fnmatchcase(url, pattern_url)]


def upload_file(path: Path, url: str) -> None:
    """A local file to ``url`` in one PUT (up to 5 GB: shards are far smaller), read again on each try."""
    location = ObjectUrl.parse(url)

    def put() -> None:
        with open(path, "rb") as body:
            client().put_object(Bucket=location.bucket, Key=location.key, Body=body)

    retrying(url, put)


def put_bytes(url: str, data: bytes) -> None:
    location = ObjectUrl.parse(url)
    retrying(url, lambda: client().put_object(Bucket=location.bucket, Key=location.key, Body=data))


def delete_prefix(prefix_url: str) -> int:
    """Remove every object under ``prefix_url``; how many there were."""
    urls = list_objects(prefix_url)
    bucket = ObjectUrl.parse(prefix_url).bucket
    for first in range(0, len(urls), 1000):  # DeleteObjects takes up to 1000 keys
        keys = [{"Key": ObjectUrl.parse(u).key} for u in urls[first : first + 1000]]
        retrying(prefix_url, lambda keys=keys: client().delete_objects(Bucket=bucket, Delete={"Objects": keys}))
    return len(urls)
