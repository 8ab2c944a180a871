"""A real Kubernetes control plane for the Kubernetes backend's tests, inside a network namespace.

``control_plane`` runs etcd, kube-apiserver, kube-controller-manager and kube-scheduler (built by
``scripts/k8s_build.sh``); ``kubelet`` plays the node agent, running each pod's command as a local
process. ``scripts/k8s_tests.sh`` enters the namespace and runs the tests marked ``kubernetes``.
"""
