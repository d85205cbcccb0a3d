"""What several stages share: the loaded base model (once per process) and seeding."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from ssb.config import Config, to_dict
from ssb.prompts import ReplyFormat, reply_format

log = logging.getLogger("ssb")


@dataclass
class BaseModel:
    model: Any
    tokenizer: Any
    reply: ReplyFormat


_LOADED: dict[str, BaseModel] = {}


def load_base(cfg: Config) -> BaseModel:
    """Load the frozen base model and tokenizer once per process (stages of `ssb run` share it)."""
    from ssb.models import load_model_and_tokenizer

    key = json.dumps(to_dict(cfg.model), sort_keys=True) + json.dumps(to_dict(cfg.prompt))
    if key not in _LOADED:
        model, tokenizer = load_model_and_tokenizer(cfg.model)
        model.eval()
        _LOADED.clear()  # keep one model in memory at a time
        _LOADED[key] = BaseModel(model, tokenizer, reply_format(tokenizer, cfg.prompt))
    return _LOADED[key]


def stable_seed(*parts: Any) -> int:
    """A seed derived from values (run seed, problem id, ...), stable across processes and runs
    (Python's hash() is salted per process)."""
    blob = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & 0x7FFFFFFF


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
