"""Start the replicas and the ingress on a Ray cluster (a local one unless an address is given)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Tuple

from horae import _core
from horae.checks import is_int
from horae.models import resolve_model

if TYPE_CHECKING:
    from horae.serve.app import ServerConfig

RAY_HINT = 'replicas run on Ray Serve, which is not installed: pip install "horae[ray]"'
APP = "horae"


def require_ray():
    """Ray Serve, or an ImportError that says how to install it."""
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        raise ImportError(RAY_HINT) from None
    return ray


def check_args(replicas: Any, router: str, retry_shed: str = "always") -> Tuple[str, str]:
    """Refuse bad arguments before Ray starts; the router's and retry rule's names as the core
    names them (it parses them, aliases and case included, and its error lists the choices)."""
    if not is_int(replicas) or replicas < 1:
        raise ValueError(f"replicas must be a whole number >= 1, got {replicas!r}")
    for what, value in (("router", router), ("retry rule", retry_shed)):
        if not isinstance(value, str):
            raise ValueError(f"the {what} is a name, got {value!r}")
    return _core.canonical_name("router", router), _core.canonical_name("retry rule", retry_shed)


def _check_engine_args(engine_args: dict) -> None:
    """Refuse a keyword the replicas' engines do not take here, before Ray starts (a replica's
    constructor would fail in its worker, and Serve would retry it)."""
    import inspect

    from horae.engine import Engine

    known = set(inspect.signature(Engine.__init__).parameters) - {"self", "model"}
    unknown = sorted(set(engine_args) - known)
    if unknown:
        raise TypeError(f"serve_replicas: unknown engine argument(s) {', '.join(map(repr, unknown))}; the engine takes "
                        f"{', '.join(sorted(known))} (the HTTP server's settings go in server=ServerConfig(...))")


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast, with the address in the message, where `ray.init` would wait a long time."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"a Ray address is host:port, ray://host:port or 'auto', got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach the Ray cluster at {address} ({e}); start one with `ray start --head` "
                              "there, or leave out the address to start a local one") from None


@dataclass
class Cluster:
    url: str
    replicas: int
    router: str
    #: Whether `serve_replicas` connected to Ray (else the caller had): then `shutdown` disconnects.
    owns_ray: bool = True

    def shutdown(self) -> None:
        """Stop Serve (the replicas and the ingress), and disconnect from Ray if `serve_replicas`
        connected (a local instance it started stops with it)."""
        ray = require_ray()
        from ray import serve

        serve.shutdown()
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()


def serve_replicas(model: Optional[str] = None, *, replicas: int = 2, router: str = "forecast",
                   retry_shed: str = "always", ray_address: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000,
                   server: Optional[ServerConfig] = None, stats_period: float = 0.5,
                   threads_per_replica: Optional[int] = None, log_level: str = "WARNING", **engine_args: Any) -> Cluster:
    """`replicas` engines of `model` (each an `AsyncLLM` with `engine_args`) behind `router`
    (`_core.ROUTERS`; "forecast" is horae's) and one ingress serving `horae serve`'s routes on
    host:port with the HTTP settings `server` (a `horae.serve.ServerConfig`, as `build_app`
    takes for one engine: the served name, API key, queue and body limits, tool-call and
    reasoning parsers, chat template). A request a replica sheds goes on by `retry_shed`
    (`_core.RETRY_RULES`; "always": to any replica not tried while its first-token bound holds).
    Replicas publish routing stats every `stats_period` seconds. Each replica's kernels use
    `threads_per_replica` threads (default: this machine's cores shared evenly)."""
    router, retry_shed = check_args(replicas, router, retry_shed)
    replicas = int(replicas)  # numpy's integers pass the check; Ray's options want Python's
    from horae.serve.app import ServerConfig

    if server is None:
        server = ServerConfig()
    elif not isinstance(server, ServerConfig):
        raise TypeError(f"server is a horae.serve.ServerConfig, got {type(server).__name__}")
    _check_engine_args(engine_args)
    ray = require_ray()
    from ray import serve
    from ray.serve.config import HTTPOptions, RequestRouterConfig
    from ray.serve.schema import LoggingConfig

    from horae.cluster.ingress import REPLICAS, Ingress
    from horae.cluster.replica import HoraeReplica

    if ray_address is not None:
        _check_reachable(ray_address)
    # Fetched and converted once, here, before any replica starts (a replica on this machine then
    # finds it in the cache). A model given as a local path goes to the replicas as an absolute
    # one (Ray workers do not start in this directory); a default or named model is resolved by
    # each replica, on its own node.
    # The served name labels each replica's metrics, as the ingress's.
    server = replace(server, model_name=server.model_name or resolve_model(model).name)
    if model is not None and Path(model).exists():
        model = str(Path(model).resolve())
    if engine_args.get("history_file"):  # likewise; each replica adds its rank to the name
        engine_args["history_file"] = str(Path(engine_args["history_file"]).resolve())
    threads = threads_per_replica or max(1, (os.cpu_count() or 1) // replicas)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(address=ray_address, include_dashboard=False, logging_level="warning")
    serve.start(http_options=HTTPOptions(host=host, port=port))
    replica = serve.deployment(
        HoraeReplica, name=REPLICAS, num_replicas=replicas, max_ongoing_requests=100_000,
        # CPU accounting is left to the kernels' threads: a replica reserving whole cores would not
        # fit two on a two-core machine beside Serve's own actors. horae's settings (the model
        # cache) go with each replica.
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {
            "RAYON_NUM_THREADS": str(threads), **{k: v for k, v in os.environ.items() if k.startswith("HORAE_")}}}},
        request_router_config=RequestRouterConfig(
            request_router_class="horae.cluster.router.HoraeRequestRouter",
            request_router_kwargs={"router": router, "retry_shed": retry_shed},
            request_routing_stats_period_s=stats_period, request_routing_stats_timeout_s=max(5.0, 10 * stats_period)),
        health_check_period_s=2.0, health_check_timeout_s=30.0,
    ).bind(model, engine_args, server.model_name)
    ingress = serve.deployment(serve.ingress()(Ingress), name="horae-ingress", num_replicas=1,
                               max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0})
    logging = LoggingConfig(log_level=log_level.upper(), enable_access_log=log_level.upper() in ("DEBUG", "INFO"))
    cluster = Cluster(url=f"http://{host}:{port}", replicas=replicas, router=router, owns_ray=owns_ray)
    try:
        serve.run(ingress.bind(replica, server), name=APP, route_prefix="/", blocking=False, logging_config=logging)
    except RuntimeError as e:
        # Serve's error names only the deployment; the replicas' constructor said why (a setting
        # the engine refused). Serve and the Ray it started stop, so that a notebook is not left
        # holding them and the port.
        cause = _replica_failure(serve)
        cluster.shutdown()
        raise RuntimeError(f"the replicas did not start: {cause}" if cause else str(e)) from None
    return cluster


def _replica_failure(serve) -> Optional[str]:
    """The exception the replicas' constructor raised: the last line of their deployment's
    status message (which holds its traceback), if Serve has one."""
    from horae.cluster.ingress import REPLICAS

    try:
        message = serve.status().applications[APP].deployments[REPLICAS].message
    except Exception:  # noqa: BLE001 (no status to read: Serve's own error stands)
        return None
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else None


def run(args) -> int:
    """`horae serve --replicas N`: start, print where, serve until interrupted, then stop."""
    import signal
    import threading

    from horae.serve import engine_args, server_config

    cluster = serve_replicas(args.model, replicas=args.replicas, router=args.router, retry_shed=args.retry_shed,
                             ray_address=args.ray_address, host=args.host, port=args.port, server=server_config(args),
                             log_level=args.log_level, **engine_args(args))
    print(f"serving {args.replicas} replicas (router: {args.router}) on {cluster.url}/v1", flush=True)
    # Ctrl-C or SIGTERM (a service manager's stop) ends it, and Serve and Ray stop with it.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        cluster.shutdown()
    return 0
