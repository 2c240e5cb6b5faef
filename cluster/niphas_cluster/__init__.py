"""A real single-node Kubernetes on this machine, for `make cluster` and the tests.

containerd (with runc and a CNI bridge), etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kubelet, built from Debian's `kubernetes` source package
(`scripts/setup-kube.sh`), started on loopback and torn down without leaving mounts, cgroups,
network devices, namespaces, iptables rules or changed sysctls behind.
"""
