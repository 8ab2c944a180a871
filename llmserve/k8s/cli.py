"""``llmserve k8s manifests`` and ``llmserve k8s chart``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from llmserve.k8s.values import Values, ValuesError


def add_parser(sub: Any) -> None:
    k8s = sub.add_parser("k8s", help="Kubernetes: print the router's manifests, write the Helm chart")
    verbs = k8s.add_subparsers(dest="k8s_command", required=True)
    show = verbs.add_parser("manifests", help="the router, RBAC, Redis and monitoring as plain YAML")
    show.add_argument("--values", type=Path, metavar="FILE.yaml", help="values (the chart's values.yaml fields)")
    show.set_defaults(func=lambda args, settings: manifests(args))
    chart = verbs.add_parser("chart", help="write the Helm chart (deploy/helm/llmserve) from the same builder")
    chart.add_argument("--out", type=Path, default=Path("deploy/helm/llmserve"))
    chart.set_defaults(func=lambda args, settings: write_chart(args))


def manifests(args: argparse.Namespace) -> int:
    from llmserve.k8s.manifests import objects

    try:
        values = Values.load(args.values)
    except ValuesError as exc:
        print(f"llmserve k8s manifests: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump_all(objects(values), sort_keys=False, width=1000))
    return 0


def write_chart(args: argparse.Namespace) -> int:
    from llmserve.k8s.chart import write

    for path in write(args.out):
        print(path)
    return 0
