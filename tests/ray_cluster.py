"""A local Ray cluster of one or more nodes (ray.cluster_utils.Cluster, as Ray's own multi-node tests
use) on ports of its own, so that other local clusters on the machine (other test sessions) neither
take its job agent's port nor answer its state and job API calls."""

import socket
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def local_cluster(head_cpus: int, worker_resources: list[dict] = ()):
    """A head with head_cpus CPUs and one worker node per entry of worker_resources, with 4 CPUs and
    those custom resources; this process is connected to it. Yields (cluster, worker nodes)."""
    import ray
    from ray import serve
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray.cluster_utils import Cluster

    from services.serving import limit_proxy_messages

    ensure_token_if_auth_enabled(None, create_token_if_missing=True)  # what ray.init does for a local cluster
    limit_proxy_messages()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "include_dashboard": True,  # Ray's job API, which the trainer submits training runs to
            "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port(),  # the job API's agent: 52365 may be another's
            # a lost node is declared dead after ~3 s instead of ~30 s
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    workers = [cluster.add_node(num_cpus=4, resources=resources) for resources in worker_resources]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, workers
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def this_cluster() -> str:
    """The connected cluster's address: without one, Ray's state and job APIs take the newest cluster
    started on this machine, which is another one wherever several run side by side."""
    import ray

    return ray.get_runtime_context().gcs_address
