"""Ray cluster set-up shared by the Ray stages (preprocessing, batch captioning); no torch import."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
        with _loopback_node():
            ray.init(address="local", num_cpus=workers or os.cpu_count(), _node_ip_address=LOOPBACK, **kwargs)
    return True


def shutdown_ray(owned: bool) -> None:
    """Stop the local cluster this process started (``init_ray`` returned True); leave a joined one.

    ``ray.shutdown`` stops the node's processes one by one, each with up to 1 s to exit after SIGTERM.
    The autoscaler monitor always takes that second (measured: 1.0 of the 1.35 s a shutdown takes
    here) and then gets SIGKILL anyway; a local one-job cluster has nothing for it to scale, so it is
    killed first, without the wait. Everything else stops as Ray stops it."""
    import ray

    if not owned or not ray.is_initialized():
        return
    try:
        from ray._private import ray_constants, worker

        for info in worker._global_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
            info.process.kill()
            info.process.wait(timeout=5)
    except Exception:  # noqa: BLE001 - Ray's internals moved: its own shutdown still stops everything
        pass
    ray.shutdown()


LOOPBACK = "127.0.0.1"


@contextmanager
def _loopback_node() -> Iterator[None]:
    """Make a local cluster's node address the loopback one, so its GCS, raylet, object manager,
    agents and workers listen on 127.0.0.1 only (Ray binds its servers to the node address; with auth
    disabled, anything that can reach the port can run code).

    Ray replaces a loopback ``_node_ip_address`` by the machine's external address unless its
    single-machine switch is off (the switch Ray itself turns off on macOS and Windows); it is read
    only while the node starts, so it is turned off for ``ray.init`` alone. Joining a cluster
    (``--ray-address``) does not go through here.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextmanager
def quiet_actor_restart_warning() -> Iterator[None]:
    """Drop one misleading line from this process's stderr while Ray Data actor pools run.

    Ray Data always passes an actor pool's context and UDF through the object store and lets its
    actors restart; Ray's core worker then logs ``E ... core_worker.cc ... has constructor arguments
    in the object store and max_restarts > 0`` for every actor, which reads like a failure. The
    arguments live as long as the pool, so a restart works; turning restarts off to avoid the line
    would lose that fault tolerance. Every other line reaches stderr unchanged.
    """
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    saved = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as src:
            for line in iter(src.readline, b""):
                if _ACTOR_RESTART_WARNING not in line:
                    os.write(saved, line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the pump sees EOF and ends
        thread.join(timeout=2)
        os.close(saved)


_ACTOR_RESTART_WARNING = b"has constructor arguments in the object store and max_restarts > 0"
