"""Micro-benchmark of the routing decision: model -> version (split, per user) -> replica.

    python -m loadtest.routing_bench [--requests 200000]

Times ``Catalog.resolve`` plus the least-outstanding replica pick, one call
at a time, for splits of one, two and three versions, and prints per-call
percentiles in microseconds as JSON. The goal from the design is under 50 µs
at p99.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from llmserve.replicas.backend import Endpoint, EndpointState
from llmserve.stats import percentile
from router.traffic.balancer import LeastOutstanding
from router.traffic.catalog import Catalog, ServedVersion


def build_catalog(split: dict[str, int], replicas_per_version: int = 2) -> Catalog:
    catalog = Catalog()
    for version in split:
        served = ServedVersion("chat", version, 2048)
        for index in range(replicas_per_version):
            replica = Endpoint(f"chat:{version}/{index}", "chat", version, url=f"http://127.0.0.1:{8100 + index}",
                               state=EndpointState.READY)
            served.replicas.append(replica)
        catalog.add_version(served)
    catalog.set_split("chat", split)
    return catalog


def measure(split: dict[str, int], requests: int) -> dict[str, float]:
    catalog = build_catalog(split)
    balancer = LeastOutstanding()
    users = [f"user-{i}" for i in range(10_000)]
    samples: list[float] = []
    clock = time.perf_counter_ns
    for i in range(requests):
        user = users[i % len(users)]
        start = clock()
        served = catalog.resolve("chat", None, user, retry_after_s=1)
        balancer.pick(served.replicas)
        samples.append((clock() - start) / 1000)
    return {
        "requests": requests,
        "mean_us": sum(samples) / len(samples),
        "p50_us": percentile(samples, 50),
        "p99_us": percentile(samples, 99),
        "p999_us": percentile(samples, 99.9),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.routing_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args(argv)
    splits = {"1 version": {"v1": 100}, "2 versions (90/10)": {"v1": 90, "v2": 10},
              "3 versions (50/30/20)": {"v1": 50, "v2": 30, "v3": 20}}
    result = {name: measure(split, args.requests) for name, split in splits.items()}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
