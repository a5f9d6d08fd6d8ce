"""Starting Ray and deploying the four apps behind Serve's gRPC proxy."""

from __future__ import annotations

import os
import time

APP_NAMES = ("generator", "filter", "trainer", "evaluator")


AGENT_PORT = 52365  # Ray's dashboard agent; a killed local cluster's agent holds it for about a minute


def _port_busy(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def wait_for_previous_cluster(timeout_s: float = 150.0) -> None:
    """After a local run was killed (SIGKILL), its Ray agents outlive it by about a minute and hold
    their ports; a new local cluster started meanwhile has no job agent (training could not start)."""
    deadline = time.time() + timeout_s
    warned = False
    while _port_busy(AGENT_PORT) and time.time() < deadline:
        if not warned:
            print("waiting for a previous local Ray cluster's processes to exit ...", flush=True)
            warned = True
        time.sleep(1.0)


def limit_proxy_messages() -> None:
    """Serve's gRPC proxy reads messages up to RAY_SERVE_GRPC_MAX_MESSAGE_SIZE (2 GiB by default) before
    any replica can refuse them; a local cluster's processes inherit this process's environment, so
    the proxy refuses anything 1 MiB above the replicas' own limit without reading it."""
    from .common.grpc_handler import MAX_REQUEST_BYTES

    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(MAX_REQUEST_BYTES + 1024 * 1024))


def connect_ray(local_num_cpus: int | None = None) -> bool:
    """Joins RAY_ADDRESS (or the job's cluster) if set, else starts a local Ray. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(log_to_driver=False)
        return False
    wait_for_previous_cluster()
    if _port_busy(AGENT_PORT):
        raise RuntimeError(
            "another Ray cluster is running on this machine (its dashboard agent holds port "
            f"{AGENT_PORT}); run on it with RAY_ADDRESS=auto, or stop it with `ray stop`"
        )
    limit_proxy_messages()
    # The dashboard hosts Ray's job API, which the trainer submits training runs to. address="local":
    # never join whatever cluster ray_current_cluster names; RAY_ADDRESS says so when that is wanted.
    ray.init(
        address="local",
        num_cpus=local_num_cpus or max(os.cpu_count() or 1, 4),
        include_dashboard=True,
        log_to_driver=False,
    )
    return True


def deploy_apps(config, *, wait_s: float = 600.0) -> None:
    """Starts Serve (gRPC on config.serve.grpc_port, reflection on) and deploys the four apps.

    Redeploying an unchanged app is a no-op, so a resumed driver can call this again.
    """
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from .api import SERVICER_FUNCTIONS
    from .common.config import config_from_app_args
    from .evaluator.deployment import build_app as build_evaluator
    from .filter.deployment import build_app as build_filter
    from .generator.deployment import build_app as build_generator
    from .trainer.deployment import build_app as build_trainer

    _refuse_open_without_token(config.serve.host)
    serve.start(
        http_options=HTTPOptions(host=config.serve.host, port=config.serve.http_port),
        grpc_options=gRPCOptions(
            port=config.serve.grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS, enable_reflection=True
        ),
    )
    args = {"settings": config.model_dump()}
    config_from_app_args(args)  # fail here, not inside a replica, if the config is wrong
    builders = {
        "generator": build_generator,
        "filter": build_filter,
        "trainer": build_trainer,
        "evaluator": build_evaluator,
    }
    from ray.serve.api import RunTarget

    serve.run_many(
        [RunTarget(builders[name](args), name=name, route_prefix=f"/{name}") for name in APP_NAMES],
        wait_for_applications_running=False,
    )
    wait_until_running(wait_s)


def _refuse_open_without_token(host: str) -> None:
    """Serving beyond this machine needs REINSTRUCT_API_TOKEN (the Helm chart sets one)."""
    from .common.grpc_handler import API_TOKEN_ENV, is_loopback

    if not is_loopback(host) and not os.environ.get(API_TOKEN_ENV):
        raise RuntimeError(
            f"serve.host is {host}, reachable from other machines, and {API_TOKEN_ENV} is not set: "
            f"set a token (clients send 'authorization: Bearer <token>') or serve on 127.0.0.1"
        )


def wait_until_running(wait_s: float) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.time() + wait_s
    while True:
        statuses = {name: serve.status().applications.get(name) for name in APP_NAMES}
        states = {n: (s.status if s else "MISSING") for n, s in statuses.items()}
        if all(state == ApplicationStatus.RUNNING for state in states.values()):
            return
        failed = {n: statuses[n].message for n, st in states.items() if st == ApplicationStatus.DEPLOY_FAILED}
        if failed:
            raise RuntimeError(f"Serve apps failed to deploy: {failed}")
        if time.time() > deadline:
            raise TimeoutError(f"Serve apps not running after {wait_s}s: {states}")
        time.sleep(0.5)
