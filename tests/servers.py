"""Real servers on 127.0.0.1 for tests and benchmarks: redis-server, a Redis Cluster, moto.

Each ``start_*`` function launches its processes in a directory the caller owns, waits
until they answer, and returns a handle whose ``stop()`` kills every process it started
(also when start-up failed half-way). A binary that is missing or a server that does not
come up raises :class:`ServerUnavailable`; the pytest fixtures turn that into a skip
locally and a failure under CI.

Nothing here imports the package under test, so ``bench/`` scripts can use it too.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

__all__ = [
    "MotoServer",
    "RedisCluster",
    "RedisServer",
    "ServerUnavailable",
    "free_port",
    "unique_prefix",
    "start_moto",
    "start_or_skip",
    "start_redis",
    "start_redis_cluster",
]

_S = TypeVar("_S")

#: Under CI a missing server or binary fails the run instead of skipping.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: How long a server may take to answer before it counts as failed to start.
START_TIMEOUT = 20.0


class ServerUnavailable(RuntimeError):
    """A server binary is missing or the server did not come up."""


_unique = itertools.count()


def unique_prefix() -> str:
    """A key / object-name prefix no other adapter in this process uses (so it starts empty)."""
    return f"t{os.getpid()}-{next(_unique)}/"


def start_or_skip(what: str, start: Callable[[], _S]) -> _S:
    """Start a server in a test; a failure skips locally and fails under ``CI=true``."""
    import pytest  # only tests call this; bench scripts use the start_* functions

    try:
        return start()
    except ServerUnavailable as exc:
        if IN_CI:
            pytest.fail(f"{what} is required under CI=true: {exc}", pytrace=False)
        pytest.skip(f"{what} unavailable: {exc}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServerUnavailable(f"{name!r} is not installed (apt-get install redis-server)")
    return path


#: Every process started here, killed at interpreter exit if nobody stopped it (a test
#: run interrupted between start and teardown must not leave servers behind).
_started: list[subprocess.Popen[bytes]] = []


def _spawn(args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    _started.append(proc)
    return proc  # type: ignore[no-any-return]


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@atexit.register
def _kill_all() -> None:
    for proc in _started:
        _kill(proc)


def _redis_ping(port: int | None, unix_socket: str | None, timeout: float = 0.5) -> bytes:
    """Send one inline command to a Redis server; return the raw first reply line."""
    if unix_socket is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = unix_socket
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = ("127.0.0.1", port or 0)
    with sock:
        sock.settimeout(timeout)
        sock.connect(target)
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


def _log_tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


@dataclass
class RedisServer:
    """One redis-server listening on 127.0.0.1:``port`` and on ``unix_socket``.

    :meth:`kill` (SIGKILL) and :meth:`restart` (same port and socket, empty data) exist
    for fault tests.
    """

    directory: Path
    port: int
    unix_socket: str | None
    extra_args: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.directory / f"redis-{self.port}.log"

    def start(self) -> None:
        """Start the process and wait until it answers PING."""
        args = [
            _binary("redis-server"),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log_path),
            "--protected-mode",
            "no",
        ]
        if self.unix_socket:
            args += ["--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        args += list(self.extra_args)
        self.proc = _spawn(args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise ServerUnavailable(
                    f"redis-server on port {self.port} exited with {self.proc.returncode}: "
                    f"{_log_tail(self.log_path)}"
                )
            try:
                if _redis_ping(self.port, None).startswith(b"+PONG"):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerUnavailable(
                    f"redis-server on port {self.port} did not answer in {START_TIMEOUT} s"
                )
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no save): what a crash looks like to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        """Start again on the same port and socket (the data is gone: persistence is off)."""
        self.kill()
        if self.unix_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_socket)
        self.start()

    def stop(self) -> None:
        """Kill the process. Idempotent."""
        _kill(self.proc)


def start_redis(
    directory: Path, *, unix_socket: bool = True, extra_args: Sequence[str] = ()
) -> RedisServer:
    """Start a standalone redis-server (TCP on a free port, plus a unix socket)."""
    directory.mkdir(parents=True, exist_ok=True)
    last: ServerUnavailable | None = None
    for _ in range(3):  # a free port can be taken between free_port() and bind
        port = free_port()
        sock = None
        if unix_socket:
            sock = str(directory / f"redis-{port}.sock")
            if len(sock) > 100:  # sun_path holds 108 bytes; deep temp dirs overflow it
                sock = os.path.join(tempfile.mkdtemp(prefix="fkv-"), f"r{port}.sock")
        server = RedisServer(directory, port, sock, extra_args)
        try:
            server.start()
            return server
        except ServerUnavailable as exc:
            server.stop()
            last = exc
    assert last is not None
    raise last


@dataclass
class RedisCluster:
    """A Redis Cluster of primaries without replicas, all on 127.0.0.1."""

    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def startup_nodes(self) -> list[str]:
        """``host:port`` of every node."""
        return [f"127.0.0.1:{n.port}" for n in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://h1:p1,h2:p2,...``."""
        return "redis+cluster://" + ",".join(self.startup_nodes)

    def stop(self) -> None:
        """Kill every node. Idempotent."""
        for node in self.nodes:
            node.stop()


def _cluster_ok(port: int) -> bool:
    out = subprocess.run(
        [_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(port), "cluster", "info"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return b"cluster_state:ok" in out.stdout


def start_redis_cluster(directory: Path, n_nodes: int = 3) -> RedisCluster:
    """Start ``n_nodes`` cluster-enabled servers, create the cluster, wait for state ok."""
    cluster = RedisCluster()
    try:
        for i in range(n_nodes):
            node_dir = directory / f"node{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            cluster.nodes.append(
                start_redis(
                    node_dir,
                    unix_socket=False,
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node_dir / "nodes.conf"),
                        "--cluster-node-timeout",
                        "2000",
                        # The bus port defaults to port + 10000, past 65535 for the upper
                        # quarter of the ephemeral range: the node would not start.
                        "--cluster-port",
                        str(free_port()),
                    ],
                )
            )
        create = subprocess.run(
            [
                _binary("redis-cli"),
                "--cluster",
                "create",
                *cluster.startup_nodes,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if create.returncode != 0:
            raise ServerUnavailable(
                f"redis-cli --cluster create failed ({create.returncode}): "
                f"{create.stdout.decode(errors='replace')[-1500:]}"
                f"{create.stderr.decode(errors='replace')[-500:]}"
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not all(_cluster_ok(node.port) for node in cluster.nodes):
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"cluster_state not ok after {START_TIMEOUT} s")
            time.sleep(0.1)
        return cluster
    except BaseException:
        cluster.stop()
        raise


@dataclass
class MotoServer:
    """``moto_server`` (an in-memory S3) on 127.0.0.1:``port``."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Kill the process. Idempotent."""
        _kill(self.proc)


def moto_binary() -> Path:
    """The ``moto_server`` script installed next to this interpreter."""
    return Path(sys.executable).parent / "moto_server"


def start_moto(directory: Path) -> MotoServer:
    """Start ``moto_server -H 127.0.0.1 -p PORT`` and wait until it answers HTTP."""
    binary = moto_binary()
    if not binary.exists():
        raise ServerUnavailable(f"{binary} not found (pip install 'moto[server]')")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = directory / f"moto-{port}.log"
    with open(log_path, "wb") as log:
        proc = _spawn(
            [str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
    server = MotoServer(port, proc, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise ServerUnavailable(
                f"moto_server exited with {proc.returncode}: {_log_tail(log_path)}"
            )
        try:
            # Any HTTP answer (moto's dashboard or an S3 error) means it is serving.
            with urllib.request.urlopen(f"{server.endpoint_url}/moto-api/", timeout=1):
                return server
        except urllib.error.HTTPError:
            return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise ServerUnavailable(f"moto_server did not answer in {START_TIMEOUT} s")
        time.sleep(0.05)
