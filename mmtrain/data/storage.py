"""Where shards live: a local path or an object-store URL, read and written through one small interface.

Schemes and the library behind each:

- ``s3://bucket/key``: boto3. Endpoint: ``S3_ENDPOINT_URL`` (mosaicml-streaming's name),
  else boto3's own ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (S3-compatible stores:
  MinIO, Ceph, R2, ...). Credentials and region: boto3's chain (``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` + ``~/.aws``,
  instance and pod roles; ``AWS_DEFAULT_REGION``).
- ``gs://bucket/key``: fsspec with gcsfs (``pip install gcsfs``); credentials as gcsfs
  finds them (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud login, the metadata server).
- ``http://`` / ``https://``: requests (read only; no listing, so name shards with a
  brace pattern). ``MMTRAIN_HTTP_BEARER_TOKEN`` adds an ``Authorization: Bearer`` header.
- anything else: a local path.

Faults. boto3's and requests' own retries are off, so every retry is made, and counted,
here: a timeout, a dropped connection, a 5xx / 429 / ``SlowDown`` answer or a short body
is retried up to ``MMTRAIN_IO_RETRIES`` times (default 5) with exponential backoff from
``MMTRAIN_IO_BACKOFF_S`` (default 0.5 s, doubling, jittered, at most 30 s); a missing key
raises :class:`FileNotFoundError` and a denied request :class:`PermissionError`, both
naming the URL, never retried. ``MMTRAIN_IO_TIMEOUT_S`` (default 60) bounds connecting
and each read. Counters of this process are in :data:`IO_STATS`.
"""
from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

from mmtrain.atomic import atomic_write_bytes

REMOTE_SCHEMES: tuple[str, ...] = ("s3", "gs", "http", "https")
CHUNK = 1 << 20  # download copy size
IO_STATS: Counter = Counter()  # this process: requests, retries, bytes_fetched, bytes_uploaded (+ the cache's)
_STATS_LOCK = threading.Lock()  # prefetch threads count too
T = TypeVar("T")


def count(name: str, n: int = 1) -> None:
    with _STATS_LOCK:
        IO_STATS[name] += n


def io_snapshot() -> Counter:
    with _STATS_LOCK:
        return Counter(IO_STATS)


class TransientIOError(OSError):
    """A failure worth retrying: timeout, reset, 5xx, a short body."""


def is_url(path: str | os.PathLike) -> bool:
    return urlparse(os.fspath(path)).scheme in REMOTE_SCHEMES


def join(base: str, *names: str) -> str:
    """``base/name`` for a URL or a local path."""
    if is_url(base):
        return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])
    return os.path.join(base, *names)


def dirname(path: str) -> str:
    return path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(path)


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] if is_url(path) else os.path.basename(path)


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    try:
        return float(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected a number") from None


def retrying(what: str, url: str, call: Callable[[], T]) -> T:
    """``call()``, retried with backoff on :class:`TransientIOError`; the last error names ``url``."""
    retries = int(_env_float("MMTRAIN_IO_RETRIES", 5))
    backoff = _env_float("MMTRAIN_IO_BACKOFF_S", 0.5)
    for attempt in range(retries + 1):
        try:
            count("requests", 1)
            return call()
        except TransientIOError as exc:
            if attempt == retries:
                raise TransientIOError(f"{url}: {what} failed {retries + 1} times; the last error: {exc}") from exc
            count("retries", 1)
            time.sleep(min(30.0, backoff * 2 ** attempt) * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")


class Store:
    """Operations on objects of one scheme. Every method takes full URLs."""

    def read(self, url: str) -> bytes:
        raise NotImplementedError

    def download(self, url: str, dest: str, size: int | None = None) -> int:
        """Write the object to ``dest`` (a temp name, then renamed); returns its bytes. Checks ``size`` when given."""
        tmp = f"{dest}.{os.getpid()}.part"
        try:
            with open(tmp, "wb") as fh:
                got = self._download_to(url, fh)
                fh.flush()
            if size is not None and got != size:
                raise TransientIOError(f"short read: {got} of {size} bytes")
            os.replace(tmp, dest)
            return got
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def _download_to(self, url: str, fh) -> int:
        data = self.read(url)
        fh.write(data)
        return len(data)

    def write(self, url: str, data: bytes) -> None:
        raise PermissionError(f"{url}: this storage is read-only")

    def upload(self, local: str, url: str) -> None:
        with open(local, "rb") as fh:
            self.write(url, fh.read())

    def sizes(self, prefix: str) -> dict[str, int] | None:
        """``{url: bytes}`` of every object under ``prefix/``; None when the scheme cannot list."""
        return None

    def check_writable(self, url: str) -> None:
        """Raise before any work when nothing can be written under ``url`` (its bucket does not exist, or the
        store is read-only): a command that stages a dataset locally checks this first, not at the upload."""
        raise PermissionError(f"{url}: this storage is read-only (write to s3:// or gs://, or a local directory)")

    def size(self, url: str) -> int:
        raise NotImplementedError


# --------------------------------------------------------------------------- s3


def _s3_error(exc: Exception, url: str, what: str) -> Exception:
    """A botocore error as FileNotFoundError / PermissionError / TransientIOError (or itself)."""
    import botocore.exceptions as bex

    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404") or status == 404:
            return FileNotFoundError(f"{url}: no such object ({code or status}) while trying to {what}")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403",
                    "ExpiredToken", "InvalidToken") or status in (401, 403):
            return PermissionError(f"{url}: access denied ({code or status}) while trying to {what}; check "
                                   "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the bucket policy")
        if status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout", "InternalError",
                                                       "ServiceUnavailable", "Throttling"):
            return TransientIOError(f"{code or status}: {err.get('Message', '')}")
        return OSError(f"{url}: {what}: {code or status}: {err.get('Message', exc)}")
    if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, bex.ReadTimeoutError,
                        bex.ResponseStreamingError, bex.IncompleteReadError)):
        return TransientIOError(str(exc))
    if isinstance(exc, bex.NoCredentialsError):
        return PermissionError(f"{url}: no AWS credentials found (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                               "or AWS_PROFILE)")
    return exc


_S3_ENV = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
           "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "MMTRAIN_IO_TIMEOUT_S")


class S3Store(Store):
    def __init__(self) -> None:
        self._client: Any = None
        self._pid: Any = None

    @property
    def client(self):
        # boto3 clients do not survive a fork, and one built for other credentials must not be reused
        ident = (os.getpid(), *(os.environ.get(k) for k in _S3_ENV))
        if self._client is None or self._pid != ident:
            import boto3
            from botocore.config import Config

            timeout = _env_float("MMTRAIN_IO_TIMEOUT_S", 60.0)
            endpoint = os.environ.get("S3_ENDPOINT_URL") or None
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint,
                config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                              connect_timeout=timeout, read_timeout=timeout, max_pool_connections=16))
            self._pid = ident
        return self._client

    @staticmethod
    def _split(url: str) -> tuple[str, str]:
        parsed = urlparse(url)
        return parsed.netloc, parsed.path.lstrip("/")

    def _call(self, what: str, url: str, fn: Callable[[], T]) -> T:
        def once() -> T:
            try:
                return fn()
            except Exception as exc:
                mapped = _s3_error(exc, url, what)
                if mapped is exc:
                    raise
                raise mapped from exc
        return retrying(what, url, once)

    def read(self, url: str) -> bytes:
        bucket, key = self._split(url)

        def get() -> bytes:
            response = self.client.get_object(Bucket=bucket, Key=key)
            data = response["Body"].read()
            if len(data) != int(response.get("ContentLength", len(data))):
                raise TransientIOError(f"short read: {len(data)} of {response['ContentLength']} bytes")
            count("bytes_fetched", len(data))
            return data
        return self._call("read", url, get)

    def download(self, url: str, dest: str, size: int | None = None) -> int:
        return self._call("download", url, lambda: Store.download(self, url, dest, size))

    def _download_to(self, url: str, fh) -> int:
        bucket, key = self._split(url)
        response = self.client.get_object(Bucket=bucket, Key=key)
        got = 0
        for chunk in response["Body"].iter_chunks(CHUNK):
            fh.write(chunk)
            got += len(chunk)
            count("bytes_fetched", len(chunk))
        expected = int(response.get("ContentLength", got))
        if got != expected:
            raise TransientIOError(f"short read: {got} of {expected} bytes")
        return got

    def write(self, url: str, data: bytes) -> None:
        bucket, key = self._split(url)

        def put() -> None:
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
            count("bytes_uploaded", len(data))
        self._call("write", url, put)

    def upload(self, local: str, url: str) -> None:
        bucket, key = self._split(url)

        def put() -> None:
            with open(local, "rb") as fh:  # streamed from the file: shards can be GBs
                self.client.put_object(Bucket=bucket, Key=key, Body=fh)
            count("bytes_uploaded", os.path.getsize(local))
        self._call("upload", url, put)

    def sizes(self, prefix: str) -> dict[str, int]:
        bucket, key = self._split(prefix.rstrip("/") + "/")

        def listing() -> dict[str, int]:
            out: dict[str, int] = {}
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents", []):
                    out[f"s3://{bucket}/{obj['Key']}"] = int(obj["Size"])
            return out
        return self._call("list", prefix, listing)

    def size(self, url: str) -> int:
        bucket, key = self._split(url)
        return self._call("stat", url, lambda: int(self.client.head_object(Bucket=bucket, Key=key)["ContentLength"]))

    def check_writable(self, url: str) -> None:
        bucket, _ = self._split(url)

        def head() -> None:
            import botocore.exceptions as bex

            try:
                self.client.head_bucket(Bucket=bucket)
            except bex.ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
                if code in ("NoSuchBucket", "NotFound", "404") or status == 404:
                    endpoint = os.environ.get("S3_ENDPOINT_URL")
                    raise FileNotFoundError(
                        f"{url}: bucket {bucket!r} does not exist{f' at {endpoint}' if endpoint else ''}; create it first "
                        f"(e.g. `aws s3 mb s3://{bucket}`{' --endpoint-url ' + endpoint if endpoint else ''}), then run "
                        "again (nothing was written)") from None
                raise
        self._call("check the bucket", url, head)


# --------------------------------------------------------------------------- http


class HttpStore(Store):
    """``send_token`` False: never send ``MMTRAIN_HTTP_BEARER_TOKEN`` (a store for fetching from arbitrary web
    hosts, e.g. the image URLs of web documents, which must not see the token meant for the shard server).
    ``pool_size``: connections kept per host (default None: requests' 10), for a store many threads share."""

    def __init__(self, send_token: bool = True, pool_size: int | None = None) -> None:
        self._session: Any = None
        self._pid = -1
        self.send_token = send_token
        self.pool_size = pool_size

    @property
    def session(self):
        ident = (os.getpid(), os.environ.get("MMTRAIN_HTTP_BEARER_TOKEN"))
        if self._session is None or self._pid != ident:
            import requests

            self._session = requests.Session()
            if self.pool_size:
                adapter = requests.adapters.HTTPAdapter(pool_connections=self.pool_size, pool_maxsize=self.pool_size)
                self._session.mount("http://", adapter)
                self._session.mount("https://", adapter)
            token = os.environ.get("MMTRAIN_HTTP_BEARER_TOKEN") if self.send_token else None
            if token:
                self._session.headers["Authorization"] = f"Bearer {token}"
            self._pid = ident
        return self._session

    @staticmethod
    def _check(response, url: str, what: str) -> None:
        status = response.status_code
        if status == 404:
            raise FileNotFoundError(f"{url}: no such object (HTTP 404) while trying to {what}")
        if status in (401, 403):
            raise PermissionError(f"{url}: access denied (HTTP {status}) while trying to {what}; "
                                  "MMTRAIN_HTTP_BEARER_TOKEN sets a bearer token")
        if status >= 500 or status in (408, 429):
            raise TransientIOError(f"HTTP {status}")
        if status >= 400:
            raise OSError(f"{url}: HTTP {status} while trying to {what}")

    def _call(self, what: str, url: str, fn: Callable[[], T]) -> T:
        import requests
        import urllib3

        def once() -> T:
            try:
                return fn()
            # urllib3's own errors come out of response.raw.stream: a reset or a short body mid-download
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    urllib3.exceptions.HTTPError) as exc:
                raise TransientIOError(str(exc)) from exc
        return retrying(what, url, once)

    def _get(self, url: str, fh=None) -> bytes | int:
        timeout = _env_float("MMTRAIN_IO_TIMEOUT_S", 60.0)
        with self.session.get(url, stream=True, timeout=timeout) as response:
            self._check(response, url, "read")
            expected = response.headers.get("Content-Length")
            parts, got = [], 0
            for chunk in response.raw.stream(CHUNK, decode_content=True):
                got += len(chunk)
                count("bytes_fetched", len(chunk))
                if fh is None:
                    parts.append(chunk)
                else:
                    fh.write(chunk)
            if expected is not None and got != int(expected):
                raise TransientIOError(f"short read: {got} of {expected} bytes")
        return b"".join(parts) if fh is None else got

    def read(self, url: str) -> bytes:
        return self._call("read", url, lambda: self._get(url))

    def _download_to(self, url: str, fh) -> int:
        return self._get(url, fh)

    def download(self, url: str, dest: str, size: int | None = None) -> int:
        return self._call("download", url, lambda: Store.download(self, url, dest, size))

    def size(self, url: str) -> int:
        def head() -> int:
            response = self.session.head(url, timeout=_env_float("MMTRAIN_IO_TIMEOUT_S", 60.0), allow_redirects=True)
            self._check(response, url, "stat")
            return int(response.headers.get("Content-Length", -1))
        return self._call("stat", url, head)


# --------------------------------------------------------------------------- gs (fsspec)


class FsspecStore(Store):
    """gs:// (and any scheme fsspec knows) through fsspec; errors map by exception type only."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self._fs: Any = None
        self._pid = -1

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            try:
                self._fs = fsspec.filesystem(self.scheme)
            except ImportError as exc:
                raise ImportError(f"{self.scheme}:// needs gcsfs: pip install gcsfs ({exc})") from exc
            self._pid = os.getpid()
        return self._fs

    def _call(self, what: str, url: str, fn: Callable[[], T]) -> T:
        def once() -> T:
            try:
                return fn()
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"{url}: no such object while trying to {what} ({exc})") from exc
            except PermissionError as exc:
                raise PermissionError(f"{url}: access denied while trying to {what} ({exc}); check "
                                      "GOOGLE_APPLICATION_CREDENTIALS") from exc
            except (TimeoutError, ConnectionError) as exc:
                raise TransientIOError(str(exc)) from exc
        return retrying(what, url, once)

    def read(self, url: str) -> bytes:
        data = self._call("read", url, lambda: self.fs.cat_file(url))
        count("bytes_fetched", len(data))
        return data

    def write(self, url: str, data: bytes) -> None:
        self._call("write", url, lambda: self.fs.pipe_file(url, data))

    def sizes(self, prefix: str) -> dict[str, int]:
        prefix = prefix.rstrip("/")
        found = self._call("list", prefix, lambda: self.fs.find(prefix, detail=True))
        stripped = self.fs._strip_protocol(prefix)  # find() answers in the filesystem's own path form
        return {prefix + k[len(stripped):]: int(v["size"]) for k, v in found.items() if k.startswith(stripped)}

    def size(self, url: str) -> int:
        return int(self._call("stat", url, lambda: self.fs.size(url)))

    def check_writable(self, url: str) -> None:
        bucket = urlparse(url).netloc
        if not self._call("check the bucket", url, lambda: self.fs.exists(f"{self.scheme}://{bucket}")):
            raise FileNotFoundError(f"{url}: bucket {bucket!r} does not exist; create it first (e.g. "
                                    f"`gcloud storage buckets create {self.scheme}://{bucket}`), then run again (nothing was written)")


_STORES: dict[str, Store] = {}


def store_for(url: str) -> Store:
    scheme = urlparse(url).scheme
    if scheme not in REMOTE_SCHEMES:
        raise ValueError(f"{url!r} is not a URL with one of the schemes {list(REMOTE_SCHEMES)}")
    key = "http" if scheme == "https" else scheme
    if key not in _STORES:
        _STORES[key] = S3Store() if scheme == "s3" else HttpStore() if key == "http" else FsspecStore(scheme)
    return _STORES[key]


def read_bytes(path: str) -> bytes:
    """The whole object or file at ``path``."""
    if is_url(path):
        return store_for(path).read(path)
    with open(path, "rb") as fh:
        return fh.read()


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (a URL, or a local file written atomically)."""
    if is_url(path):
        store_for(path).write(path, data)
    else:
        atomic_write_bytes(path, data)


def upload_tree(local_dir: str, url: str, last: tuple[str, ...] = ("index.json", "stats.json")) -> list[str]:
    """Upload every non-hidden file under ``local_dir`` to ``url/...``; files named in ``last`` go last.

    Shards and their indexes go before the directory files that list them, so a reader
    never finds an ``index.json`` naming a shard that is not there yet.
    """
    files = []
    for root, dirs, names in os.walk(local_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
    files.sort(key=lambda p: os.path.basename(p) in last)
    store = store_for(url)
    uploaded = []
    for path in files:
        target = join(url, *os.path.relpath(path, local_dir).split(os.sep))
        store.upload(path, target)
        uploaded.append(target)
    return uploaded
