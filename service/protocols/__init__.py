"""RLHF protocol adapters (OpenRLHF, vLLM, ...) on top of service.pipeline.

`service.app.create_app` includes every router listed here.
"""

from __future__ import annotations

PROTOCOL_ROUTERS: list = []
