"""horae replicas on Ray Serve (`pip install "horae[ray]"`): N engines behind horae's router and
one OpenAI-compatible ingress.

>>> from horae.cluster import serve_replicas
>>> cluster = serve_replicas(replicas=2)          # a local Ray instance, the default model
>>> cluster.url                                   # the same routes as `horae serve`
'http://127.0.0.1:8000'
>>> cluster.shutdown()

`horae serve --replicas N [--router forecast] [--ray-address ADDR]` does the same from the shell.
Ray is imported only here, and only when replicas are asked for."""

from __future__ import annotations

from horae.cluster.deploy import Cluster, require_ray, serve_replicas

__all__ = ["Cluster", "require_ray", "serve_replicas"]
