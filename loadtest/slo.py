"""Service-level objectives given on the command line, such as ``ttft:500 tpot:100``."""

from __future__ import annotations

from dataclasses import dataclass

METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass(frozen=True)
class SLO:
    limits_ms: dict[str, float]

    def met_by(self, values_ms: dict[str, float | None]) -> bool:
        for metric, limit in self.limits_ms.items():
            value = values_ms.get(metric)
            if value is None or value > limit:
                return False
        return True


def parse_slo(items: list[str] | None) -> SLO:
    """``["ttft:500", "tpot:100"]`` -> SLO; ValueError naming the bad item otherwise."""
    limits: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in METRICS:
            raise ValueError(f"bad SLO {item!r}: expected METRIC:MILLISECONDS with METRIC in {', '.join(METRICS)}")
        try:
            limit = float(value)
        except ValueError:
            raise ValueError(f"bad SLO {item!r}: {value!r} is not a number of milliseconds") from None
        if limit <= 0:
            raise ValueError(f"bad SLO {item!r}: the limit must be positive")
        limits[name] = limit
    return SLO(limits)
