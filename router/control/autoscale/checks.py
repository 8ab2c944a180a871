"""Whether a policy may be given to a deployment: what the policy itself cannot know.

The policy's own numbers are checked when it is made (``AutoscalingPolicy``);
here, against the deployment and the machine: a version being rolled back
or drained is not scaled, a deploy's starting replicas lie within the
bounds, and ``max_replicas`` is no more than the backend can run (the local
backend knows its cores and memory; the error says what fits). A predict
version's replicas are its batcher's threads: at most the router's cores.
"""

from __future__ import annotations

import os

from router.control.autoscale.policy import AutoscalingPolicy, Mode
from router.control.leases import RETIRE
from router.control.versions import LocalVersions
from router.errors import InvalidRequest
from router.store import DeploymentRecord, DeploymentStatus


def cpu_budget() -> int:
    """The batcher threads all predict versions of this router may run together: its cores."""
    return len(os.sched_getaffinity(0))


def check_policy(policy: AutoscalingPolicy, record: DeploymentRecord, predict: bool, versions: LocalVersions,
                 replicas: int | None = None) -> None:
    """Raise ``InvalidRequest`` (400, naming the field) when ``policy`` cannot apply to ``record``."""
    name = f"{record.model_name}:{record.version}"
    if record.status is DeploymentStatus.DRAINING or record.operation == RETIRE:
        raise InvalidRequest(f"{name} is being rolled back or drained; it will stop, so it is not scaled",
                             param="autoscaling")
    if replicas is not None and not policy.min_replicas <= replicas <= policy.max_replicas and replicas > 0:
        raise InvalidRequest(f"resources.replicas ({replicas}) must lie within autoscaling.min_replicas.."
                             f"max_replicas ({policy.min_replicas}..{policy.max_replicas})",
                             param="resources.replicas")
    if policy.mode is Mode.OFF:
        return
    if predict:  # its replicas are its batcher's threads, on this router's cores
        if policy.min_replicas < 1:
            raise InvalidRequest(f"{name} is loaded in the router and runs at least one batcher thread: "
                                 "autoscaling.min_replicas must be at least 1", param="autoscaling.min_replicas")
        budget = cpu_budget()
        if policy.max_replicas > budget:
            raise InvalidRequest(f"autoscaling.max_replicas ({policy.max_replicas}) is more batcher threads than "
                                 f"the CPU budget of {name}'s router: {budget} cores; set it to at most {budget}",
                                 param="autoscaling.max_replicas")
        return
    try:
        spec = versions.spec_for(record)
    except (ValueError, OSError):
        return  # settings that do not fit: the rollout fails with the reason, not this check
    fits = versions.backend.capacity(spec)
    if policy.max_replicas > fits.replicas:
        raise InvalidRequest(f"autoscaling.max_replicas ({policy.max_replicas}) is more than this backend can run "
                             f"of {name}: {fits.replicas} ({fits.reason}); set it to at most {fits.replicas}",
                             param="autoscaling.max_replicas")
