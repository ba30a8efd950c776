"""Upload throughput to a local S3-compatible server: tilepipe's storage layer versus boto3.

One `moto_server` (in-memory, loopback, started by this script) receives every variant in
turn, on the same data, in one run:

* ``tilepipe``: `services.io.storage.Storage.upload` as the upload stage calls it (obstore,
  `concurrency` objects at once, multipart above `part_size_mb` with `part_concurrency` parts
  at once, SHA-256 + S3 ETag computed locally, every object verified by HEAD, a directory
  finished by its completeness marker).
* ``tilepipe replay``: the same upload again: everything verified present, nothing sent.
* ``boto3``: `s3.upload_file` with its default `TransferConfig` (multipart above 8 MiB, 10
  threads per file), files one after another, as a plain script would do. No checksum beyond
  what botocore sends, no verification.

Data: one large file, and a Zarr-like directory of many chunk files plus metadata documents.
Each variant writes to a fresh key prefix; objects are deleted between variants so the
in-memory server does not grow. MB/s = local bytes / wall seconds (1 MB = 10^6 bytes).

    python bench/upload_bench.py --file-mb 256 --chunks 128 --chunk-mb 2 --repeat 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.core.logs import configure_logging
from services.io.storage import Storage, StorageSettings
from services.local.natsserver import free_port

BUCKET = "bench"


def start_moto(port: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.05)


def make_data(root: Path, file_mb: int, chunks: int, chunk_mb: float) -> dict[str, Path]:
    """A large file and a Zarr-like directory (random bytes: incompressible, like the data)."""
    big = root / "big.bin"
    with open(big, "wb") as out:
        for _ in range(file_mb):
            out.write(os.urandom(1 << 20))
    store = root / "tile.zarr"
    (store / "db" / "c").mkdir(parents=True)
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    (store / "db" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "array"}')
    for i in range(chunks):
        (store / "db" / "c" / str(i)).write_bytes(os.urandom(int(chunk_mb * (1 << 20))))
    return {f"1 file x {file_mb} MiB": big, f"dir {chunks} x {chunk_mb:g} MiB + 2": store}


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def boto3_upload(client, path: Path, prefix: str) -> None:
    if path.is_file():
        client.upload_file(str(path), BUCKET, prefix)
        return
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        client.upload_file(str(p), BUCKET, f"{prefix}/{p.relative_to(path).as_posix()}")


def clear(client) -> None:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    keys = [{"Key": o["Key"]} for page in pages for o in page.get("Contents", [])]
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys[i : i + 1000]})


async def run(args) -> list[tuple[str, str, int, float]]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    proc = start_moto(port)
    results: list[tuple[str, str, int, float]] = []
    try:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            config=BotoConfig(max_pool_connections=32),
        )
        client.create_bucket(Bucket=BUCKET)
        settings = StorageSettings(
            url=f"s3://{BUCKET}",
            endpoint=endpoint,
            region="us-east-1",
            concurrency=args.concurrency,
            part_size_mb=args.part_mb,
            part_concurrency=args.part_concurrency,
        )
        storage = Storage(settings)
        with tempfile.TemporaryDirectory(prefix="tp-upload-bench-") as tmp:
            data = make_data(Path(tmp), args.file_mb, args.chunks, args.chunk_mb)
            for case, path in data.items():
                nbytes = size_of(path)
                best: dict[str, float] = {}
                for rep in range(args.repeat):
                    # alternate which goes first: the server's state drifts between runs
                    order = ("tilepipe", "boto3") if rep % 2 == 0 else ("boto3", "tilepipe")
                    for variant in order:
                        if variant == "boto3":
                            started = time.perf_counter()
                            key = f"b3-{rep}-{path.name}"
                            await asyncio.to_thread(boto3_upload, client, path, key)
                            took = time.perf_counter() - started
                            best["boto3"] = min(best.get("boto3", 1e9), took)
                        else:
                            prefix = f"tp-{rep}-{path.name}"
                            started = time.perf_counter()
                            await storage.upload(prefix, path)
                            took = time.perf_counter() - started
                            best["tilepipe"] = min(best.get("tilepipe", 1e9), took)
                            started = time.perf_counter()
                            report = await storage.upload(prefix, path)
                            assert report.skipped, "replay uploaded something"
                            took = time.perf_counter() - started
                            best["tilepipe replay"] = min(best.get("tilepipe replay", 1e9), took)
                        clear(client)
                for variant in ("tilepipe", "tilepipe replay", "boto3"):
                    results.append((case, variant, nbytes, best[variant]))
        storage.close()
    finally:
        proc.terminate()
        proc.wait(10)
    return results


def table(results: list[tuple[str, str, int, float]]) -> str:
    lines = ["| data | variant | MB | seconds | MB/s |", "| --- | --- | ---: | ---: | ---: |"]
    for case, variant, nbytes, seconds in results:
        mb = nbytes / 1e6
        lines.append(f"| {case} | {variant} | {mb:,.0f} | {seconds:.2f} | {mb / seconds:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file-mb", type=int, default=256, help="size of the large file")
    parser.add_argument("--chunks", type=int, default=128, help="chunk files in the directory")
    parser.add_argument("--chunk-mb", type=float, default=2.0, help="size of one chunk file")
    parser.add_argument("--concurrency", type=int, default=8, help="tilepipe: objects at once")
    parser.add_argument("--part-mb", type=float, default=8.0, help="tilepipe: part size")
    parser.add_argument("--part-concurrency", type=int, default=4, help="tilepipe: parts at once")
    parser.add_argument("--repeat", type=int, default=2, help="runs per variant (best kept)")
    args = parser.parse_args(argv)
    configure_logging("warning", json_format=False)
    results = asyncio.run(run(args))
    print(table(results))
    print()
    print(
        f"{datetime.now(UTC):%Y-%m-%d}; {platform.node()}: {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}; Python {platform.python_version()}; "
        f"tilepipe concurrency {args.concurrency}, part {args.part_mb:g} MiB x "
        f"{args.part_concurrency}; boto3 default TransferConfig"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
