"""``adaptkit serve --ray``: the OpenAI-compatible server with its engines as Ray Serve replicas.

    adaptkit serve BASE --adapters a=...,b=... --ray --replicas 2          # a local Ray instance
    adaptkit serve BASE --adapters a=...,b=... --ray auto --replicas 8     # the cluster `ray start` made

This process connects to Ray (or starts a local instance bound to 127.0.0.1), deploys the Serve
application ``adaptkit`` (an :class:`~adaptkit.serving.replica.AdapterRegistry` and N
:class:`~adaptkit.serving.replica.AdapterReplica`), and serves the front door
(``gateway.py``) with uvicorn under the same guards as the single-process server. Stopping it
deletes the application (and the local instance it started).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from adaptkit.errors import AdaptkitError, InvalidArgumentError, MissingDependencyError
from adaptkit.serving.api import ADAPTER_NAME
from adaptkit.serving.guards import Limits

log = logging.getLogger("adaptkit.serve")
APP_NAME = "adaptkit"
LOCAL = "local"  # --ray without an address
# Ray advertises (and binds its servers to) the machine's outward address unless told it runs on one
# machine only; a local instance is one machine, reachable from it only.
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class DeploymentError(AdaptkitError):
    """The Ray Serve application could not be deployed (a replica failed to start, no resources)."""


class RayServer:
    """N engine replicas on Ray Serve behind one front door; usable wherever a ``Server`` is
    (``start``, ``stop``, ``app``, ``limits``: ``BackgroundServer(RayServer(...))`` in tests).

    Args:
        base: the base model's folder or Hub id, as every replica will load it (a folder must exist on
            every node: a shared file system, or the same path everywhere).
        adapters: ``{name: path}`` served from the start (loaded by a replica when first routed to it).
        address: a Ray cluster's address (``auto``, ``HOST:6379``, ``ray://HOST:10001``), or ``local``
            for a new instance on this machine, bound to 127.0.0.1.
        replicas: engine replicas; cpus_per_replica / gpus_per_replica: Ray resources each one reserves
            (``device='cuda'`` reserves one GPU unless told otherwise).
        retry_for: seconds during which a request whose replica died is sent to another one.
        base_name, adapter_dir, allow_runtime_loading, register_all, max_batch, max_queue, max_resident,
        request_timeout, default_max_tokens, limits, api_key: as ``Server``'s, for every replica and the front door.
    """

    def __init__(self, base, adapters: dict[str, str | os.PathLike] | None = None, address: str = LOCAL,
                 replicas: int = 1, cpus_per_replica: float = 1.0, gpus_per_replica: float | None = None,
                 quantize: str | None = None, dtype: str = "float32", device: str = "cpu",
                 base_name: str | None = None, adapter_dir=None, allow_runtime_loading: bool = False,
                 register_all: bool = False, max_batch: int = 8, max_queue: int = 64, max_resident: int | None = None,
                 request_timeout: float | None = None, default_max_tokens: int = 16, limits: Limits | None = None,
                 api_key: str | None = None, retry_for: float = 60.0):
        _import_ray(address == LOCAL)  # first: a missing extra fails here, and the local setting precedes the import
        from adaptkit.base import check_device, read_config
        from adaptkit.formats.detect import detect_kind
        from adaptkit.serving.gateway import Gateway
        from adaptkit.serving.server import adapter_folders

        if replicas < 1:
            raise InvalidArgumentError(f"--replicas must be >= 1, got {replicas}")
        read_config(base)  # a wrong base fails here, with the single-process server's message, before any deploy
        check_device(device)
        if allow_runtime_loading and adapter_dir is None:
            raise InvalidArgumentError("runtime loading needs --adapter-dir (the only folder it may read from)")
        if adapter_dir is not None and not Path(adapter_dir).is_dir():
            raise InvalidArgumentError(f"--adapter-dir {adapter_dir}: not a folder")
        self.base, self.address, self.replicas = str(base), address, replicas
        self.base_name = base_name or Path(base).name
        self.limits = limits or Limits()
        self.api_key = api_key or None
        self.adapter_dir = None if adapter_dir is None else Path(adapter_dir).resolve()
        table = {}
        for name, path in (adapters or {}).items():
            if not ADAPTER_NAME.match(name) or name == self.base_name:
                raise InvalidArgumentError(f"adapter name {name!r} must be 1-64 letters, digits, '_' or '-' and not "
                                           f"the base model's name {self.base_name!r}")
            table[name] = {"path": str(Path(path).resolve()), "root": None, "kind": detect_kind(path)}
        if register_all:
            if self.adapter_dir is None:
                raise InvalidArgumentError("registering every adapter of a folder needs --adapter-dir")
            for name, (path, kind) in adapter_folders(self.adapter_dir, self.base_name, set(table)).items():
                table[name] = {"path": str(path), "root": str(self.adapter_dir), "kind": kind}
        self.table = table
        gpus = gpus_per_replica if gpus_per_replica is not None else (1.0 if device.startswith("cuda") else 0.0)
        self.resources = {"num_cpus": cpus_per_replica, "num_gpus": gpus}
        self.engine_options = {"dtype": dtype, "quantize": quantize, "device": device}
        self.server_options = {"base_name": self.base_name, "max_batch": max_batch, "max_queue": max_queue,
                               "max_resident": max_resident, "request_timeout": request_timeout,
                               "default_max_tokens": default_max_tokens, "limits": self.limits}
        self.gateway = Gateway(None, None, self.base_name, self.base, self.adapter_dir, allow_runtime_loading,
                               retry_for)  # its handles are set by start()
        self._started_ray = False

    def start(self) -> RayServer:
        """Connect to (or start) Ray and deploy the application; returns when every replica is up."""
        ray, serve = _import_ray(self.address == LOCAL)
        from adaptkit.serving.replica import AdapterRegistry, AdapterReplica

        if not ray.is_initialized():
            if self.address == LOCAL:
                needed = math.ceil(self.replicas * self.resources["num_cpus"])
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False,
                         log_to_driver=False)
                self._started_ray = True
                if ray.util.get_node_ip_address() not in ("127.0.0.1", "::1"):
                    log.warning("ray was imported before adaptkit could keep this local instance on 127.0.0.1 (it "
                                "listens on %s); set %s=0 before anything imports ray",
                                ray.util.get_node_ip_address(), LOOPBACK_ONLY_ENV)
                log.warning("local Ray instance on 127.0.0.1; Ray Serve's replicas also open an inter-deployment "
                            "gRPC port on every interface (not configurable in Ray Serve >= 2.54), which refuses "
                            "callers without this instance's token unless RAY_AUTH_MODE=disabled")
            else:
                ray.init(address=self.address, log_to_driver=False)
        gpus = self.replicas * self.resources["num_gpus"]
        if self._started_ray and gpus > ray.cluster_resources().get("GPU", 0):
            self.stop()
            raise DeploymentError(f"{self.replicas} replica(s) with --device {self.engine_options['device']} need "
                                  f"{gpus:g} GPUs; this machine has {ray.cluster_resources().get('GPU', 0):g}")
        serve.start(proxy_location="Disabled")  # HTTP is this process's front door, with adaptkit's guards
        registry = AdapterRegistry.bind(self.table)
        replicas = AdapterReplica.options(
            num_replicas=self.replicas, ray_actor_options=self.resources,
            max_ongoing_requests=self.server_options["max_batch"] + self.server_options["max_queue"],
            max_queued_requests=self.server_options["max_queue"],  # past it: 429, as from one process
        ).bind(registry, self.base, self.table, self.engine_options, self.server_options,
               max(1, int(self.resources["num_cpus"])))
        log.info("deploying %d replica(s) of %s on Ray Serve", self.replicas, self.base)
        try:
            handle = serve.run(replicas, name=APP_NAME, route_prefix=None)
        except RuntimeError as exc:  # a replica's constructor failed: its error is the last line that says so
            self.stop()
            raise DeploymentError(f"deploying {self.base} on Ray Serve failed: {_last_error(exc)}") from exc
        self.gateway.replicas = handle
        self.gateway.registry = serve.get_deployment_handle("AdapterRegistry", APP_NAME)
        return self

    def stop(self) -> None:
        """Delete the application (and shut down the Ray instance this object started)."""
        import ray
        from ray import serve

        if ray.is_initialized():
            try:
                serve.delete(APP_NAME)
            finally:
                if self._started_ray:
                    serve.shutdown()
                    ray.shutdown()
                    self._started_ray = False

    def app(self):
        from adaptkit.serving.gateway import create_gateway_app
        from adaptkit.serving.guards import guard

        return guard(create_gateway_app(self.gateway), self.limits, self.api_key)


def _import_ray(local: bool):
    if local:
        os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")  # read when ray is imported
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise MissingDependencyError(f"--ray needs Ray Serve ({exc}); pip install 'adaptkit[ray]'") from exc
    return ray, serve


def _last_error(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0]]
    return (errors or lines or [type(exc).__name__])[-1]


def serve_ray(base, adapters=None, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """``adaptkit serve --ray``: deploy, then serve the front door until interrupted (``options``: :class:`RayServer`)."""
    import uvicorn

    from adaptkit.serving.guards import uvicorn_options
    from adaptkit.serving.server import warn_if_unprotected

    warn_if_unprotected(host, options.get("api_key"))
    server = RayServer(base, adapters, **options).start()
    try:
        uvicorn.run(server.app(), host=host, port=port, log_level="info", **uvicorn_options(server.limits))
    finally:
        server.stop()
