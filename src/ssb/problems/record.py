"""The problem record every stage passes around."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


class ProblemsError(ValueError):
    """A data source is missing, malformed or empty; the message says which and where."""


@dataclass
class Problem:
    id: str
    question: str
    answer: str
    source: str
    solution: str | None = None
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "source": self.source,
            "solution": self.solution,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Problem:
        missing = [k for k in ("id", "question", "answer", "source") if k not in data]
        if missing:
            raise ProblemsError(f"problem record is missing field {missing[0]!r}")
        return cls(
            id=str(data["id"]),
            question=str(data["question"]),
            answer=str(data["answer"]),
            source=str(data["source"]),
            solution=data.get("solution"),
            metadata=dict(data.get("metadata") or {}),
        )


def format_number(value: Any) -> str:
    """A JSON number as a gold answer string: 27.0 -> "27", 0.5 -> "0.5", -1.0 -> "-1"."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return str(int(value))
        return repr(value)
    return str(value).strip()
