"""Ray cluster set-up shared by the Ray stages (preprocessing, batch captioning); no torch import."""

from __future__ import annotations

import os
from typing import Any


def init_ray(address: str | None, workers: int | None, object_store_mb: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` or start a local one with ``workers`` CPUs (default: all
    cores); returns whether this call started it (and so should shut it down). A no-op when Ray is up."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        if object_store_mb:
            kwargs["object_store_memory"] = object_store_mb << 20
        ray.init(address="local", num_cpus=workers or os.cpu_count(), **kwargs)
    return True
