"""The S3-compatible test server (moto_server on a loopback port) and helpers for tests that
upload to it; its fixtures (`moto`, `aws_env`) are in conftest.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig

from services.local.natsserver import free_port

BUCKET = "tp-bucket"
PART = 256 * 1024


class MotoServer:
    """`moto_server` as a subprocess on a loopback port (in-memory: a restart loses all)."""

    def __init__(self, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "S3_UPLOAD_PART_MIN_SIZE": "65536", **env}
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        exe = Path(sys.executable).with_name("moto_server")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        self.proc = subprocess.Popen(
            [*cmd, "-H", "127.0.0.1", "-p", str(self.port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def client(self, key: str = "testing"):
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=key,
            aws_secret_access_key=key,
            config=BotoConfig(retries={"max_attempts": 1}),
        )


def s3_options(endpoint: str, **extra) -> dict:
    return {
        "url": f"s3://{BUCKET}/run1",
        "endpoint": endpoint,
        "region": "us-east-1",
        "part_size_mb": PART / 1024 / 1024,
        "part_concurrency": 3,
        "concurrency": 4,
        "backoff_initial_s": 0.1,
        "backoff_max_s": 1.0,
        "request_timeout_s": 10,
        **extra,
    }


def s3_tree(client, prefix: str) -> dict[str, dict]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1 :]: o for page in pages for o in page.get("Contents", [])}
