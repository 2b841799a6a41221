"""The name transformers gives the KV cache: `cache=` from 5.24, `past_key_values=` before (5.17-5.23).

Every forward this library runs itself, and every place it reads generate's model kwargs or a model output, goes
through `CACHE_KEY`, so the same code runs on both.
"""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version

CACHE_KEY = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{CACHE_KEY: cache}`, to pass to a model's forward."""
    return {CACHE_KEY: cache}


def output_cache(out: Any) -> Any:
    """The cache a model output (or generate's model kwargs) carries, or None."""
    if hasattr(out, "get"):
        return out.get(CACHE_KEY)
    return getattr(out, CACHE_KEY, None)
