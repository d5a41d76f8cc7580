"""`vlmdeploy serve DIR --ray --replicas N`: the same FastAPI app as N Ray Serve replicas.

Each replica builds its own app (`create_app`, so its own model, scheduler and KV cache) when Ray
starts it; Ray Serve's HTTP proxy spreads requests over the replicas. Needs `ray[serve]`
(`pip install 'vlmdeploy[ray]'`).
"""

from __future__ import annotations

from .app import ServeConfig, create_app


def ray_application(config: ServeConfig, replicas: int, cpus_per_replica: float = 1.0):
    """A bound Ray Serve application (for `serve.run`) of `replicas` copies of the server."""
    from ray import serve

    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"--replicas must be an int >= 1, got {replicas!r}")

    def build():  # runs on each replica: the app (model, scheduler threads) is never pickled
        return create_app(config)

    deployment = serve.deployment(serve.ingress(build)(), name="vlmdeploy", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": cpus_per_replica})
    return deployment.bind()


def run_on_ray(config: ServeConfig, replicas: int, host: str, port: int, cpus_per_replica: float = 1.0) -> None:
    """Start a local Ray instance, serve the app on host:port until interrupted."""
    import time

    import ray
    from ray import serve

    ray.init(include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(ray_application(config, replicas, cpus_per_replica), name="vlmdeploy", route_prefix="/")
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()
