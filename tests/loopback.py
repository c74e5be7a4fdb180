"""Real storage servers on 127.0.0.1 for the remote-shards tests, started and stopped by the tests.

- `MotoS3`: moto's S3-compatible server (`moto.server.ThreadedMotoServer`, from `moto[server]`) in a
  child process on a free port, so that `kill()` drops every connection at once (a server that is
  gone, not one that only stops accepting). Clients find it through the standard environment:
  `AWS_ENDPOINT_URL` (botocore, hence s3fs and boto3, read it) and dummy `AWS_*` credentials.
- `HttpFolder`: Python's `http.server` serving a folder, in a thread.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_MOTO = """
import signal, sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
signal.pause()
"""

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "loopback-test", "AWS_SECRET_ACCESS_KEY": "loopback-test",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no server on 127.0.0.1:{port} after {timeout} s")


class MotoS3:
    """moto's S3 server in a child process; `env` is what a client needs to reach it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}
        self.process = subprocess.Popen([sys.executable, "-c", _MOTO, str(self.port)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        _wait_for_port(self.port, self.process)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Every file under `folder` to s3://bucket/prefix/<relative path>; returns that URL."""
        client = self.client()
        if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
            client.create_bucket(Bucket=bucket)
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


class HttpFolder:
    """`http.server` serving `folder` on 127.0.0.1 (a thread of the test process)."""

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass
