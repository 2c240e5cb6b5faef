"""Shared fixtures: a real nats-server per test, or a 3-server JetStream cluster
(`nats_cluster`, `cluster_bus`; tests.nats_harness), and the real Nix with tiny offline flakes
(tests.nix_harness)."""

pytest_plugins = [
    "tests.nats_harness",
    "tests.nix_harness",
    "tests.kube_harness",
    "tests.node_harness",
]
