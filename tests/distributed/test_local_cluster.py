"""Port choice of the local test cluster: every port handed to a node is distinct, cluster-wide.
(A worker node once failed to start because two of its components were given the same port:
ports were picked one at a time, each released before the next was chosen.)"""

from __future__ import annotations

import socket

import pytest

from cbir_engine.distributed.local_cluster import ClusterStartError, LocalRayCluster, _free_ports


def test_free_ports_are_distinct_free_and_not_taken():
    taken = {1, 2, 3}
    first = _free_ports("127.0.0.2", 40, taken)
    second = _free_ports("127.0.0.2", 40, taken)
    assert len(set(first) | set(second)) == 80
    assert not ({1, 2, 3} & set(first + second))
    assert set(first + second) <= taken  # recorded, so later calls skip them
    for port in first[:5]:  # released: free to bind again
        with socket.socket() as s:
            s.bind(("127.0.0.2", port))


def test_node_arguments_never_share_a_port():
    cluster = LocalRayCluster(nodes=3)
    try:
        ports = []
        for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            args = cluster._node_args(ip)
            ports += [int(args[i + 1]) for i, a in enumerate(args) if a.endswith("-port")]
        assert len(ports) == 18 and len(set(ports)) == 18
    finally:
        cluster.stop()


def test_a_node_that_fails_to_start_leaves_the_driver_disconnected(monkeypatch):
    # The failure seen once: the worker node's `ray start` refuses two components on one port.
    # connect() must say so and leave this process disconnected; a driver still connected to the
    # stopped head is ended by Ray a minute later, and the test run with it.
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster = LocalRayCluster(nodes=2, start_timeout=60)
    real_args = cluster._node_args

    def clashing_args(ip: str) -> list[str]:
        args = real_args(ip)
        if ip != cluster.head_ip:
            args[args.index("--metrics-export-port") + 1] = args[args.index("--runtime-env-agent-port") + 1]
        return args

    monkeypatch.setattr(cluster, "_node_args", clashing_args)
    try:
        cluster.start()
        with pytest.raises(ClusterStartError, match="node exited"):
            cluster.connect()
        assert not ray.is_initialized()
    finally:
        cluster.stop()
