"""What a platform team applies to run llmserve on Kubernetes: the router, its RBAC, Redis, monitoring.

``manifests.objects`` builds them as plain dicts from ``Values`` and the settings; ``llmserve k8s
manifests`` prints them as YAML, and ``llmserve k8s chart`` writes the Helm chart in deploy/helm/llmserve
from the same builder. The engines' Deployments are not here: the router creates them at run time
(``llmserve.replicas.kubernetes``).
"""
