"""Chat message bodies accepted by the protocol routes (OpenAI-style role + content)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class MessageIn(BaseModel):
    # Extra keys (name, tool_calls, ...) are allowed and ignored: trainers forward whole message dicts.
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1, max_length=64)
    content: str | list[dict[str, Any]] | None = Field(
        default=None, description="a string or OpenAI-style text parts [{'type': 'text', 'text': ...}]"
    )

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content}


def as_dicts(messages: list[MessageIn]) -> list[dict[str, Any]]:
    return [m.as_dict() for m in messages]
