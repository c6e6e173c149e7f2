"""Servers the storage tests start on 127.0.0.1: an S3-compatible store (moto) with real IAM
credential checks, a plain HTTP file server, and a fault-injecting proxy in front of either."""
from __future__ import annotations

import http.client
import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial

from conftest import free_port

BUCKET = "mmtrain-test"


def _serve(server: http.server.ThreadingHTTPServer) -> http.server.ThreadingHTTPServer:
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class S3Server:
    """moto's S3 with authentication on: only ``key_id`` / ``secret`` (an IAM user allowed everything) get in."""

    endpoint: str
    key_id: str
    secret: str
    stop: object

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        return {"S3_ENDPOINT_URL": endpoint or self.endpoint, "AWS_ACCESS_KEY_ID": self.key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.key_id, aws_secret_access_key=self.secret)


def start_s3(own_process: bool = False) -> S3Server:
    """moto on a free port: in this process (threads; what the tests use) or, with ``own_process``,
    as a server process of its own (what the benchmark uses: it then does not share this process's GIL)."""
    import boto3
    import requests

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    if own_process:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                requests.get(endpoint, timeout=1)
                break
            except requests.ConnectionError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)
        stop = proc.terminate
    else:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        stop = server.stop
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="mmtrain")
    iam.put_user_policy(UserName="mmtrain", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="mmtrain")["AccessKey"]
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10)  # from now on every request is checked
    s3 = S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], stop)
    s3.client().create_bucket(Bucket=BUCKET)
    return s3


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def start_http(root: str) -> tuple[str, http.server.ThreadingHTTPServer]:
    """A static file server for ``root``; returns its base URL."""
    server = _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietFiles, directory=root)))
    return f"http://127.0.0.1:{server.server_address[1]}", server


@dataclass
class Faults:
    """Every ``every``-th request (counted over all requests) fails as ``kind``: ``503`` (an error answer),
    ``drop`` (the connection closes with no answer) or ``truncate`` (half the body, then the connection
    closes). ``every`` 0 = no faults (the proxy then only records what passes through, in ``seen``)."""

    every: int = 0
    kind: str = "503"
    requests: int = 0
    injected: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: list[tuple[str, str]] = field(default_factory=list)  # (method, path with query) of every request, in order

    def next_is_fault(self, applies: bool = True) -> bool:
        """Count a request; True when it is to fail (only requests the fault ``applies`` to are counted)."""
        if not applies:
            return False
        with self.lock:
            self.requests += 1
            hit = self.every > 0 and self.requests % self.every == 0
            self.injected += hit
            return hit


def start_fault_proxy(upstream: str, faults: Faults) -> tuple[str, http.server.ThreadingHTTPServer]:
    """A forwarding proxy to ``upstream`` (``http://host:port``) that injects ``faults``; returns its base URL.

    Headers travel unchanged (the Host header too), so S3 signatures stay valid through it."""
    host, port = upstream.removeprefix("http://").split(":")

    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with faults.lock:
                faults.seen.append((self.command, self.path))
            fault = faults.next_is_fault(applies=faults.kind != "truncate" or self.command != "HEAD")  # no body to cut
            if fault and faults.kind == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault and faults.kind == "503":
                payload = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
                           b"<Message>injected</Message></Error>")
                self.send_response(503)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Content-Type", "application/xml")
                self.end_headers()
                self.wfile.write(payload)
                return
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
            response = conn.getresponse()
            data = response.read()
            self.send_response(response.status)
            for k, v in response.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            # a HEAD answer has no body but the length of the one a GET would get
            self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD"
                             else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                if fault and faults.kind == "truncate" and len(data) > 1:
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    server = _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy))
    return f"http://127.0.0.1:{server.server_address[1]}", server


def set_env(values: dict[str, str]) -> dict[str, str | None]:
    """Set environment variables; returns the previous values for :func:`restore_env`."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    return old


def restore_env(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
