"""Object storage for pipeline artifacts: one layer over S3, GCS, Azure and local filesystems.

Built on `obstore` (Python bindings of the Rust `object_store` crate used by Arrow/DataFusion):
one API for `s3://`, `gs://`, `az://` and `file://` destinations, native async, streaming
multipart uploads with bounded part concurrency, per-request retries with exponential backoff,
and credentials from the standard environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`) or
a credentials file (`credentials_file`), never from events.

Objects and keys
    A file artifact (a raw tile) becomes one object at its key. A directory artifact (a Zarr
    store: many files) becomes one object per file at `<key>/<relative path>`, plus a
    completeness marker `<key>/.tilepipe-complete.json` written LAST. The marker holds the
    listing: every file's path, size, SHA-256 (and S3 ETag), the total bytes and the checksum.

Checksums (computed once, in one read of each local file)
    A file's checksum is `sha256:<hex>` of its bytes. A directory's checksum is
    `sha256-tree:<hex>`: the SHA-256 of its canonical listing, one line `<sha256> <size> <path>`
    per file sorted by path, so it changes when any file's content, size or name changes.

Verification against the stored object (after every PUT, and before a skip)
    `etag` (S3 default): the size and the ETag the server computed must equal what S3
    computes for these bytes: MD5 for a single PUT, MD5 of the part MD5s + `-N` for a multipart
    upload cut at `part_size_mb`; the MD5s are computed in the same local read as the SHA-256.
    `read` (default elsewhere; use it for SSE-KMS buckets, whose ETags are not MD5s): the
    object is read back and its SHA-256 compared. For a skip decision on stores that keep
    metadata (GCS, Azure) the SHA-256 stored as attribute `tilepipe-sha256` at upload suffices.

Never visible partially
    One object: a single PUT is atomic, a multipart upload appears only when completed, and
    the local store writes a staging file and renames it. A directory cannot appear atomically
    on an object store, so completeness is defined by the marker: readers treat `<key>` as
    present only when the marker exists, and every object the marker lists is uploaded and
    verified (and re-checked by a LIST) before it is written. For Zarr readers the order also
    holds without the marker: chunks first, then metadata documents deepest first, the root
    `zarr.json` last, so an array or group becomes openable only once everything below it is
    stored. Re-uploading a changed artifact first deletes its marker, then uploads, deletes
    the objects the old marker listed that the new listing lacks, and writes the new marker.

Idempotence and resumption
    A marker with the same checksum whose objects are all LISTed with the right sizes (and
    ETags) means the artifact is skipped without any PUT. Otherwise each object that already
    exists and verifies is skipped, so a replay or a retry after a crash sends only what is
    missing. A multipart upload cut off by a crash is never visible; set a bucket lifecycle
    rule to abort incomplete multipart uploads after a day.

Retries
    Each request is retried by obstore (connection errors, 5xx) with exponential backoff;
    each object operation (PUT + verify, HEAD, LIST) is retried `retries` times more with
    exponential backoff and jitter, starting over if the server lost an upload (e.g. after a
    restart). Refused credentials or permissions are not retried: `StorageAccessError`.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import hashlib
import io
import json
import os
import random
import re
import time
import tomllib
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, BinaryIO, Literal, TypeVar
from urllib.parse import urlparse

import obstore
from obstore.exceptions import (
    InvalidPathError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnknownConfigurationKeyError,
)
from obstore.store import LocalStore, MemoryStore, from_url
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.core.errors import StorageAccessError, StorageConfigError, VerificationError
from services.core.logs import get_logger
from services.core.metrics import UPLOAD_BYTES, UPLOAD_FAILURES, UPLOAD_OBJECTS

T = TypeVar("T")
_ERROR_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")

MARKER = ".tilepipe-complete.json"
MARKER_FORMAT = "tilepipe-artifact/1"
SHA_ATTR = "tilepipe-sha256"
METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"})
MIB = 1024 * 1024

S3_SCHEMES = frozenset({"s3", "s3a"})
GCS_SCHEMES = frozenset({"gs"})
AZURE_SCHEMES = frozenset({"az", "azure", "abfs", "abfss", "adl"})
LOCAL_SCHEMES = frozenset({"file", "memory"})
SCHEMES = S3_SCHEMES | GCS_SCHEMES | AZURE_SCHEMES | LOCAL_SCHEMES

# Store settings that are secrets: only from the environment or `credentials_file`.
SECRET_KEYS = frozenset(
    {
        "access_key_id",
        "secret_access_key",
        "session_token",
        "token",
        "account_key",
        "access_key",
        "sas_key",
        "sas_token",
        "client_secret",
        "bearer_token",
        "service_account",
        "service_account_key",
        "application_credentials",
        "password",
    }
)
AWS_INI_KEYS = {
    "aws_access_key_id": "access_key_id",
    "aws_secret_access_key": "secret_access_key",
    "aws_session_token": "session_token",
}
NOT_FOUND = (NotFoundError, FileNotFoundError)
REFUSED = (PermissionDeniedError, UnauthenticatedError)
MISCONFIGURED = (NotSupportedError, InvalidPathError, UnknownConfigurationKeyError)


def _bare_key(key: str) -> str:
    return key.lower().removeprefix("aws_").removeprefix("google_").removeprefix("azure_")


class StorageSettings(BaseModel):
    """Where and how artifacts are uploaded (the storage part of `[stages.upload] options`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    url: str = Field(description="destination, e.g. s3://bucket/prefix, gs://b/p, file:///p")
    endpoint: str | None = Field(default=None, description="S3-compatible / emulator endpoint")
    region: str | None = None
    """S3 region (s3:// only)"""
    credentials_file: Path | None = Field(
        default=None,
        description="AWS-style INI (see credentials_profile), flat TOML/JSON of store keys, "
        "or a GCS service-account JSON",
    )
    credentials_profile: str = "default"
    """section of an AWS-style credentials_file"""
    allow_http: bool | None = Field(default=None, description="default: endpoint is http://")
    store_options: dict[str, str | bool | int | float] = Field(
        default_factory=dict, description="extra non-secret obstore settings"
    )
    concurrency: Annotated[int, Field(ge=1, le=256)] = 8
    """files uploaded at once"""
    part_size_mb: Annotated[float, Field(ge=0.0625, le=5120)] = 8.0
    """multipart part size (larger files are sent in parts)"""
    part_concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    """parts of one file sent at once"""
    verify: Literal["auto", "etag", "read"] = "auto"
    """how a stored object is checked: auto is etag on S3, else read"""
    retries: Annotated[int, Field(ge=0, le=50)] = 4
    """retries of each object operation (PUT + verify, HEAD, LIST)"""
    request_retries: Annotated[int, Field(ge=0, le=50)] = 3
    """retries of each request inside obstore (connection, 5xx)"""
    backoff_initial_s: Annotated[float, Field(gt=0, le=600)] = 0.5
    """first retry delay (exponential, with jitter)"""
    backoff_max_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """longest retry delay"""
    request_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
    """one request's time limit"""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in SCHEMES:
            raise ValueError(
                f"unsupported destination {value!r}; use one of "
                "s3://bucket[/prefix], gs://bucket[/prefix], az://container[/prefix], "
                "file:///absolute/path"
            )
        if parsed.scheme == "file" and not parsed.path.startswith("/"):
            raise ValueError("file:// destinations need an absolute path (file:///data/out)")
        if parsed.scheme not in LOCAL_SCHEMES and not parsed.netloc:
            raise ValueError(f"{value!r} names no bucket or container")
        if parsed.password or parsed.username:
            raise ValueError("credentials never go in the url: use the environment or a file")
        return value.rstrip("/")

    @field_validator("store_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        secret = sorted(k for k in value if _bare_key(k) in SECRET_KEYS)
        if secret:
            raise ValueError(
                f"{secret} are credentials: put them in credentials_file or the environment"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> StorageSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        if self.region is not None and self.scheme not in S3_SCHEMES:
            raise ValueError("region applies to s3:// destinations only")
        if self.verify == "etag" and self.scheme not in S3_SCHEMES:
            raise ValueError("verify = 'etag' needs an s3:// destination (MD5 ETags)")
        if self.credentials_file is not None and not self.credentials_file.is_file():
            raise ValueError(f"credentials_file {self.credentials_file} is not a readable file")
        return self

    @property
    def scheme(self) -> str:
        return urlparse(self.url).scheme

    @property
    def part_size(self) -> int:
        return int(self.part_size_mb * MIB)

    @property
    def verify_mode(self) -> Literal["etag", "read"]:
        if self.verify != "auto":
            return self.verify
        return "etag" if self.scheme in S3_SCHEMES else "read"


def load_credentials(settings: StorageSettings) -> dict[str, str]:
    """Store settings from `credentials_file` (empty without one)."""
    path = settings.credentials_file
    if path is None:
        return {}
    try:
        text = path.read_text()
    except OSError as exc:
        raise StorageConfigError(f"credentials_file {path}: {exc.strerror or exc}") from None
    data: Any
    try:
        if path.suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict) and data.get("type") == "service_account":
                if settings.scheme not in GCS_SCHEMES:
                    raise StorageConfigError(f"{path} is a GCS service account, not for S3/Azure")
                return {"service_account": str(path)}
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            parser = configparser.ConfigParser()
            parser.read_string(text)
            if not parser.has_section(settings.credentials_profile):
                raise StorageConfigError(
                    f"credentials_file {path} has no profile [{settings.credentials_profile}]"
                )
            section = parser[settings.credentials_profile]
            data = {AWS_INI_KEYS.get(k, k): v for k, v in section.items() if k != "region"}
    except (ValueError, configparser.Error) as exc:
        if isinstance(exc, StorageConfigError):
            raise
        raise StorageConfigError(f"credentials_file {path} cannot be parsed: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, str | int | float | bool) for v in data.values()
    ):
        raise StorageConfigError(f"credentials_file {path} must hold flat key = value pairs")
    return {str(k): str(v) for k, v in data.items()}


def open_store(settings: StorageSettings) -> Any:
    """The obstore store of a destination (credentials from the environment or the file)."""
    scheme = settings.scheme
    if scheme == "memory":
        return MemoryStore()
    if scheme == "file":
        return LocalStore(prefix=Path(urlparse(settings.url).path), mkdir=True)
    config: dict[str, Any] = {**settings.store_options, **load_credentials(settings)}
    if settings.endpoint:
        config["base_url" if scheme in GCS_SCHEMES else "endpoint"] = settings.endpoint
    if settings.region:
        config["region"] = settings.region
    allow_http = settings.allow_http
    if allow_http is None:
        allow_http = bool(settings.endpoint and settings.endpoint.startswith("http://"))
    client = {
        "allow_http": allow_http,
        "timeout": timedelta(seconds=settings.request_timeout_s),
        "connect_timeout": timedelta(seconds=min(10.0, settings.request_timeout_s)),
    }
    retry = {
        "max_retries": settings.request_retries,
        "backoff": {
            "init_backoff": timedelta(seconds=settings.backoff_initial_s),
            "max_backoff": timedelta(seconds=settings.backoff_max_s),
            "base": 2,
        },
        "retry_timeout": timedelta(seconds=settings.request_timeout_s),
    }
    try:
        return from_url(settings.url, config=config, client_options=client, retry_config=retry)
    except Exception as exc:
        raise StorageConfigError(f"cannot open {settings.url}: {first_line(exc)}") from None


def first_line(exc: BaseException, limit: int = 600) -> str:
    """The readable head of an (often multi-line) obstore error, with the S3 error code."""
    text = str(exc).strip()
    head = text.split("\n", 1)[0].split("<?xml", 1)[0].rstrip(": ") or type(exc).__name__
    code = _ERROR_CODE.search(text)
    if code:
        head = f"{code.group(1)}: {head}"
    return head[:limit]


@dataclass(frozen=True)
class FileDigest:
    """What one read of a file yields: size, SHA-256 and the S3 ETag for the part size."""

    size: int
    sha256: str
    etag: str = ""


def _digest_stream(stream: BinaryIO, part_size: int, etag: bool, block: int = MIB) -> FileDigest:
    sha = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False)
    parts: list[bytes] = []
    size = in_part = 0
    while chunk := stream.read(min(block, part_size - in_part) if etag else block):
        sha.update(chunk)
        size += len(chunk)
        if etag:
            md5.update(chunk)
            in_part += len(chunk)
            if in_part == part_size:
                parts.append(md5.digest())
                md5, in_part = hashlib.md5(usedforsecurity=False), 0
    if not etag:
        return FileDigest(size, sha.hexdigest())
    if in_part or not parts:
        parts.append(md5.digest())
    if size <= part_size:  # a single PUT (obstore uses multipart only above the part size)
        tag = parts[0].hex()
    else:
        tag = f"{hashlib.md5(b''.join(parts), usedforsecurity=False).hexdigest()}-{len(parts)}"
    return FileDigest(size, sha.hexdigest(), tag)


def digest_file(path: Path, part_size: int, etag: bool = True) -> FileDigest:
    """SHA-256 (and S3 ETag) of a file in one read."""
    with open(path, "rb") as stream:
        return _digest_stream(stream, part_size, etag)


def digest_bytes(data: bytes, part_size: int, etag: bool = True) -> FileDigest:
    return _digest_stream(io.BytesIO(data), part_size, etag)


@dataclass
class Listing:
    """The files of a directory artifact; what the completeness marker records."""

    files: dict[str, FileDigest]

    def canonical(self) -> bytes:
        return "".join(
            f"{d.sha256} {d.size} {path}\n" for path, d in sorted(self.files.items())
        ).encode()

    @property
    def checksum(self) -> str:
        return "sha256-tree:" + hashlib.sha256(self.canonical()).hexdigest()

    @property
    def bytes(self) -> int:
        return sum(d.size for d in self.files.values())

    def to_json(self, **extra: Any) -> bytes:
        doc = {
            "format": MARKER_FORMAT,
            "checksum": self.checksum,
            "bytes": self.bytes,
            "files": {
                p: {"size": d.size, "sha256": d.sha256, **({"etag": d.etag} if d.etag else {})}
                for p, d in sorted(self.files.items())
            },
            **extra,
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Listing:
        doc = json.loads(data)
        if doc.get("format") != MARKER_FORMAT:
            raise ValueError(f"not a {MARKER_FORMAT} marker")
        files = {
            p: FileDigest(int(f["size"]), str(f["sha256"]), str(f.get("etag", "")))
            for p, f in doc["files"].items()
        }
        listing = cls(files)
        if listing.checksum != doc.get("checksum"):
            raise ValueError("marker checksum does not match its listing")
        return listing


@dataclass
class UploadReport:
    """One artifact at its destination, verified."""

    key: str
    url: str
    bytes: int
    checksum: str
    seconds: float
    objects_uploaded: int = 0
    objects_skipped: int = 0
    bytes_sent: int = 0
    bytes_hashed: int = 0

    @property
    def skipped(self) -> bool:
        return self.objects_uploaded == 0


def scan_tree(root: Path) -> list[str]:
    """Relative POSIX paths of the regular files under `root`, sorted (symlinks refused)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                raise ValueError(f"{path}: symbolic links are not uploaded")
            if rel == MARKER:
                raise ValueError(f"{path}: {MARKER} is reserved for the completeness marker")
            if path.is_file():
                found.append(rel)
    return sorted(found)


def upload_phases(paths: list[str]) -> list[list[str]]:
    """Upload order: data files, then metadata documents deepest first (root `zarr.json` last)."""
    data = [p for p in paths if PurePosixPath(p).name not in METADATA_NAMES]
    meta: dict[int, list[str]] = {}
    for p in paths:
        if PurePosixPath(p).name in METADATA_NAMES:
            meta.setdefault(len(PurePosixPath(p).parts), []).append(p)
    return [group for group in [data, *(meta[d] for d in sorted(meta, reverse=True))] if group]


def check_key(key: str) -> str:
    """An object key relative to the destination: non-empty segments, no `..`, not absolute."""
    parts = key.split("/")
    if (
        not key
        or len(key) > 900
        or key.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or "\\" in key
        or any(ord(c) < 32 for c in key)
    ):
        raise StorageConfigError(f"invalid object key {key!r}")
    return key


class Storage:
    """Uploads file and directory artifacts to one destination; see the module docstring."""

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self.store = open_store(settings)
        self.verify = settings.verify_mode
        self.part_size = settings.part_size
        self.attributes = not isinstance(self.store, LocalStore)
        self.log = get_logger(component="storage", destination=settings.url)
        self._pool = ThreadPoolExecutor(
            max_workers=max(2, settings.concurrency), thread_name_prefix="tp-hash"
        )
        self._sem: asyncio.Semaphore | None = None
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def url_of(self, key: str) -> str:
        return f"{self.settings.url}/{key}"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def upload(self, key: str, source: Path, product: str = "") -> UploadReport:
        """Upload a file or a directory to `key` (idempotent; verified; see module docstring)."""
        check_key(key)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            started = time.perf_counter()
            if source.is_dir():
                report = await self._upload_dir(key, source, product)
            elif source.is_file():
                report = await self._upload_file(key, source, product)
            else:
                raise FileNotFoundError(f"{source} does not exist")
            report.seconds = time.perf_counter() - started
            return report

    async def stored_listing(self, key: str) -> Listing | None:
        """The listing of a complete directory artifact at `key`, if its marker exists."""
        return await self._retrying(f"read {key}/{MARKER}", lambda: self._read_marker(key))

    async def read_back(self, key: str) -> tuple[int, str] | None:
        """(size, `sha256:<hex>`) of the stored object at `key`, read back in full (no
        metadata trusted); None when it is absent."""

        async def attempt() -> tuple[int, str] | None:
            try:
                sha, size = hashlib.sha256(), 0
                result = await obstore.get_async(self.store, key)
                async for chunk in result.stream(min_chunk_size=4 * MIB):
                    sha.update(chunk)
                    size += len(chunk)
                return size, "sha256:" + sha.hexdigest()
            except NOT_FOUND:
                return None

        return await self._retrying(f"read back {key}", attempt)

    # -- one object -------------------------------------------------------------------------

    async def _upload_file(self, key: str, path: Path, product: str) -> UploadReport:
        digest = await self._digest(path)
        meta = await self._retrying(f"head {key}", lambda: self._head(key))
        report = UploadReport(
            key,
            self.url_of(key),
            digest.size,
            f"sha256:{digest.sha256}",
            0.0,
            bytes_hashed=digest.size,
        )
        same = await self._retrying(
            f"check {key}", lambda: self._matches(key, meta, digest, deep=False)
        )
        if same:
            report.objects_skipped = 1
            UPLOAD_OBJECTS.labels("skipped").inc()
        else:
            await self._put(key, path, digest, product)
            report.objects_uploaded, report.bytes_sent = 1, digest.size
        return report

    async def _digest(self, path: Path) -> FileDigest:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, digest_file, path, self.part_size, self.verify == "etag"
        )

    async def _head(self, key: str) -> dict | None:
        try:
            return await obstore.head_async(self.store, key)
        except NOT_FOUND:
            return None

    async def _matches(self, key: str, meta: dict | None, digest: FileDigest, deep: bool) -> bool:
        """Whether the stored object `meta` holds exactly the bytes `digest` describes.

        `deep` (after a PUT) never trusts metadata we wrote ourselves: ETag or read-back.
        """
        if meta is None or meta["size"] != digest.size:
            return False
        if self.verify == "etag":
            return (meta.get("e_tag") or "").strip('"') == digest.etag
        try:
            if not deep and self.attributes:
                result = await obstore.get_async(self.store, key, options={"head": True})
                if result.attributes.get(SHA_ATTR) == digest.sha256:
                    return True
            return await self._remote_sha256(key) == digest.sha256
        except NOT_FOUND:
            return False

    async def _remote_sha256(self, key: str) -> str:
        sha = hashlib.sha256()
        result = await obstore.get_async(self.store, key)
        async for chunk in result.stream(min_chunk_size=4 * MIB):
            sha.update(chunk)
        return sha.hexdigest()

    async def _put(self, key: str, source: Path | bytes, digest: FileDigest, product: str) -> None:
        """PUT (multipart above the part size) and verify, retried; bounded concurrency."""

        async def attempt() -> None:
            await obstore.put_async(
                self.store,
                key,
                source,
                attributes={SHA_ATTR: digest.sha256} if self.attributes else None,
                use_multipart=digest.size > self.part_size,
                chunk_size=self.part_size,
                max_concurrency=self.settings.part_concurrency,
            )
            meta = await self._head(key)
            if not await self._matches(key, meta, digest, deep=True):
                stored = "missing" if meta is None else f"{meta['size']} B, etag {meta['e_tag']}"
                raise VerificationError(
                    f"{key}: stored object ({stored}) does not match the local file "
                    f"({digest.size} B, sha256 {digest.sha256[:16]}..., etag {digest.etag})"
                )

        if self._sem is None:
            self._sem = asyncio.Semaphore(self.settings.concurrency)
        async with self._sem:
            await self._retrying(f"upload {key}", attempt)
        UPLOAD_BYTES.labels(product or "other").inc(digest.size)
        UPLOAD_OBJECTS.labels("uploaded").inc()

    async def _delete(self, key: str) -> None:
        async def attempt() -> None:
            with contextlib.suppress(*NOT_FOUND):
                await obstore.delete_async(self.store, key)

        await self._retrying(f"delete {key}", attempt)
        UPLOAD_OBJECTS.labels("deleted").inc()

    async def _retrying(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run `op`, retrying transient failures with exponential backoff and jitter."""
        delay = self.settings.backoff_initial_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return await op()
            except REFUSED as exc:
                UPLOAD_FAILURES.labels("auth").inc()
                raise StorageAccessError(
                    f"{what}: {self.settings.url} refused access ({first_line(exc, 500)}); "
                    "check the credentials (environment or credentials_file) and permissions"
                ) from None
            except MISCONFIGURED as exc:
                UPLOAD_FAILURES.labels("config").inc()
                raise StorageConfigError(f"{what}: {first_line(exc)}") from None
            except Exception as exc:
                reason = (
                    "verify"
                    if isinstance(exc, VerificationError)
                    else "not_found"
                    if isinstance(exc, NOT_FOUND)
                    else "transient"
                )
                UPLOAD_FAILURES.labels(reason).inc()
                if attempt > self.settings.retries:
                    raise
                wait = min(delay, self.settings.backoff_max_s) * random.uniform(0.5, 1.0)
                delay *= 2
                self.log.warning(
                    "storage_retry",
                    what=what,
                    attempt=attempt,
                    error=first_line(exc, 300),
                    retry_in_s=round(wait, 3),
                )
                await asyncio.sleep(wait)

    # -- a directory ------------------------------------------------------------------------

    async def _read_marker(self, key: str) -> Listing | None:
        try:
            result = await obstore.get_async(self.store, f"{key}/{MARKER}")
            data = bytes(await result.bytes_async())
        except NOT_FOUND:
            return None
        try:
            return Listing.from_json(data)
        except (ValueError, KeyError, TypeError) as exc:
            self.log.warning("marker_unreadable", key=key, error=str(exc))
            return None

    async def _list_under(self, key: str) -> dict[str, dict]:
        prefix = f"{key}/"
        found: dict[str, dict] = {}
        async for chunk in obstore.list(self.store, key, chunk_size=1000):
            for meta in chunk:
                if meta["path"].startswith(prefix):
                    found[meta["path"][len(prefix) :]] = meta
        return found

    def _listed_ok(self, meta: dict | None, digest: FileDigest) -> bool:
        if meta is None or meta["size"] != digest.size:
            return False
        return self.verify != "etag" or (meta.get("e_tag") or "").strip('"') == digest.etag

    async def _upload_dir(self, key: str, root: Path, product: str) -> UploadReport:
        loop = asyncio.get_running_loop()
        rels = await loop.run_in_executor(self._pool, scan_tree, root)
        digests = await asyncio.gather(*(self._digest(root / rel) for rel in rels))
        listing = Listing(dict(zip(rels, digests, strict=True)))
        report = UploadReport(
            key,
            self.url_of(key),
            listing.bytes,
            listing.checksum,
            0.0,
            bytes_hashed=listing.bytes,
        )
        marker_key = f"{key}/{MARKER}"
        old = await self._retrying(f"read {marker_key}", lambda: self._read_marker(key))
        remote = await self._retrying(f"list {key}/", lambda: self._list_under(key))
        complete = all(self._listed_ok(remote.get(p), d) for p, d in listing.files.items())
        if old is not None and old.checksum == listing.checksum and complete:
            report.objects_skipped = len(listing.files)
            UPLOAD_OBJECTS.labels("skipped").inc(len(listing.files))
            return report
        if old is not None or MARKER in remote:
            await self._delete(marker_key)  # the artifact is incomplete from here on

        async def needs_upload(rel: str) -> bool:
            digest, meta = listing.files[rel], remote.get(rel)
            if not self._listed_ok(meta, digest):
                return True
            if self.verify == "etag":
                return False
            return not await self._retrying(
                f"check {key}/{rel}",
                lambda: self._matches(f"{key}/{rel}", meta, digest, deep=False),
            )

        flags = await asyncio.gather(*(needs_upload(rel) for rel in rels))
        pending = [rel for rel, flag in zip(rels, flags, strict=True) if flag]
        report.objects_skipped = len(rels) - len(pending)
        UPLOAD_OBJECTS.labels("skipped").inc(report.objects_skipped)
        await self._put_all(key, root, pending, listing, product, report)
        # objects the previous version listed and this one does not (others are left alone)
        stale = [rel for rel in (old.files if old else {}) if rel not in listing.files]
        async with asyncio.TaskGroup() as group:
            for rel in stale:
                group.create_task(self._delete(f"{key}/{rel}"))
        # every listed object present and verified (a server may have lost some meanwhile)
        for _ in range(self.settings.retries + 1):
            remote = await self._retrying(f"list {key}/", lambda: self._list_under(key))
            missing = [r for r, d in listing.files.items() if not self._listed_ok(remote.get(r), d)]
            if not missing:
                break
            self.log.warning("objects_missing_after_upload", key=key, count=len(missing))
            await self._put_all(key, root, missing, listing, product, report)
        else:
            raise VerificationError(f"{key}: {len(missing)} objects still missing after upload")
        body = listing.to_json(written_at=datetime.now(UTC).isoformat())
        marker = digest_bytes(body, self.part_size, self.verify == "etag")
        await self._put(marker_key, body, marker, product)
        return report

    async def _put_all(
        self,
        key: str,
        root: Path,
        rels: list[str],
        listing: Listing,
        product: str,
        report: UploadReport,
    ) -> None:
        for phase in upload_phases(rels):
            async with asyncio.TaskGroup() as group:
                for rel in phase:
                    put = self._put(f"{key}/{rel}", root / rel, listing.files[rel], product)
                    group.create_task(put)
            report.objects_uploaded += len(phase)
            report.bytes_sent += sum(listing.files[rel].size for rel in phase)
