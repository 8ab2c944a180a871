"""The auto-scaling policy: how many replicas one version should run, as a pure function.

``desired_replicas(signals, current, policy, now, memory)`` returns a ``Decision``
(the count, the rule that fired, the evidence) and the ``Memory`` to pass to the
next call. Nothing here reads a clock or a socket: the loop (``loop``) measures
the signals and applies decisions; tests drive this with a fake ``now``.

The rules, in order (the design's table, with the anchors' safeguards):

1. **bounds**: below ``min_replicas`` or above ``max_replicas`` (the policy just
   changed) goes there at once: that is the operator's intent, not a signal.
2. **pending**: while a replica of the version is starting or draining, no new
   action (Dynamo's pending-desired guard, llm-d's cascade guard: pods take
   minutes to start and counting them as capacity, or not, both over-scale).
3. **cold start**: no replica and requests held for one: 1 at once (Knative's
   lesson: held requests inflate concurrency, so more than one replica is
   started only once the first serves and the load still asks for it).
4. **panic**: more than ``max_queue`` requests waiting (the router's queue plus
   the engines' own): up at once, without waiting out ``up_delay_s``.
5. **up**: a signal *hot* for ``up_delay_s``: the proportional demand
   ``ceil(demand / target_in_flight_per_replica)`` above the current count,
   utilisation above ``utilisation_high``, or a latency percentile above the SLO.
   A dip shorter than a quarter of ``up_delay_s`` does not restart the wait
   (a Poisson load is never above its mean for minutes on end).
   The step is at least one and at most a doubling.
6. **down**: every signal *cold* for ``down_delay_s`` (utilisation below
   ``utilisation_low``, nothing queued, latency under ``slo_low_ratio`` of the
   SLO) *and* the load simulated on N-1 replicas still under every target (the
   2 <-> 1 flap Dynamo hit without it). One replica at a time, and not within
   ``cooldown_s`` of the last change; while it stays cold the next step comes
   a cooldown later (the window is not waited out again per replica: a load
   that fell from 8 replicas' worth to 1 is not paid for 70 more minutes).
7. **to zero** (``min_replicas`` 0): nothing in flight or waiting for
   ``idle_delay_s``.

Priority classes: ``batch`` demand never makes a signal hot on its own. The
in-flight count excludes batch requests, and utilisation and the engines'
queues are scaled by the interactive share of what is in flight, so batch
work fills spare capacity and is shed (429) rather than bought replicas for.
Latency comes from the critical class when it has enough samples, else from
standard (``signals``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

MAX_REPLICAS_LIMIT = 64  # no single version asks for more; a typo (1000) is refused, not attempted
HOT_GRACE = 0.25  # of up_delay_s: how long a hot signal may dip without its wait starting again


class Mode(str, enum.Enum):
    ON = "on"  # decide and act
    ADVISORY = "advisory"  # decide, record and log; never act
    OFF = "off"  # the version keeps the replicas it was given


@dataclass(frozen=True)
class Slo:
    """Latency objectives, milliseconds at p99 (None: not an objective)."""

    ttft_ms: float | None = 500.0
    itl_ms: float | None = None
    p99_ms: float | None = None  # whole-request latency (the predict APIs: their only latency)

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "itl_ms", "p99_ms"):
            value = getattr(self, name)
            if value is not None and not (0 < value <= 3_600_000):
                raise PolicyError(f"slo.{name}", f"must be above 0 and at most an hour, got {value}")


class PolicyError(ValueError):
    """A policy whose numbers do not fit; ``field`` names the offending one."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"autoscaling.{field_name}: {message}")
        self.field = f"autoscaling.{field_name}"


@dataclass(frozen=True)
class AutoscalingPolicy:
    mode: Mode = Mode.ON
    min_replicas: int = 1
    max_replicas: int = 4
    target_in_flight_per_replica: float = 8.0
    max_queue: int = 50
    slo: Slo = field(default_factory=Slo)
    up_delay_s: float = 120.0  # the table: > 80% for 2 min
    down_delay_s: float = 600.0  # the table: < 30% for 10 min
    idle_delay_s: float = 300.0  # the table: queue empty for 5 min (to zero)
    cooldown_s: float = 60.0
    utilisation_high: float = 0.8
    utilisation_low: float = 0.3
    slo_low_ratio: float = 0.5  # the table: p99 < 50% of the SLO
    min_samples: int = 20  # latency percentiles need this many requests in the window

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= MAX_REPLICAS_LIMIT:
            raise PolicyError("min_replicas", f"must be 0 to {MAX_REPLICAS_LIMIT}, got {self.min_replicas}")
        if not 1 <= self.max_replicas <= MAX_REPLICAS_LIMIT:
            raise PolicyError("max_replicas", f"must be 1 to {MAX_REPLICAS_LIMIT}, got {self.max_replicas}")
        if self.min_replicas > self.max_replicas:
            raise PolicyError("min_replicas", f"({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if not 0 < self.target_in_flight_per_replica <= 10_000:
            raise PolicyError("target_in_flight_per_replica",
                              f"must be above 0 and at most 10000, got {self.target_in_flight_per_replica}")
        if not 1 <= self.max_queue <= 1_000_000:
            raise PolicyError("max_queue", f"must be 1 to 1000000, got {self.max_queue}")
        for name in ("up_delay_s", "down_delay_s", "idle_delay_s", "cooldown_s"):
            value = getattr(self, name)
            if not 0 <= value <= 86_400:
                raise PolicyError(name, f"must be 0 to 86400 seconds, got {value}")
        if not 0 < self.utilisation_low < self.utilisation_high <= 1:
            raise PolicyError("utilisation_low", "must be above 0 and below utilisation_high, which is at most 1")
        if not 0 < self.slo_low_ratio < 1:
            raise PolicyError("slo_low_ratio", f"must be between 0 and 1, got {self.slo_low_ratio}")
        if not 1 <= self.min_samples <= 100_000:
            raise PolicyError("min_samples", f"must be 1 to 100000, got {self.min_samples}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoscalingPolicy:
        """From the stored (or API) form; raises ``PolicyError`` naming the field."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PolicyError(unknown[0], f"unknown field; known: {', '.join(sorted(known))}")
        values = dict(data)
        if "mode" in values:
            try:
                values["mode"] = Mode(values["mode"])
            except ValueError:
                raise PolicyError("mode", f"must be on, advisory or off, got {values['mode']!r}") from None
        if "slo" in values:
            slo = values["slo"] or {}
            extra = sorted(set(slo) - {"ttft_ms", "itl_ms", "p99_ms"})
            if extra:
                raise PolicyError(f"slo.{extra[0]}", "unknown field; known: ttft_ms, itl_ms, p99_ms")
            values["slo"] = Slo(**slo)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mode"] = self.mode.value
        return data


@dataclass(frozen=True)
class Signals:
    """What the router sees of one version, measured over the loop's window."""

    ready: int = 0  # replicas taking traffic
    starting: int = 0  # launched (or restarting), not ready yet
    draining: int = 0  # finishing their streams before they stop
    in_flight: float = 0.0  # interactive (critical + standard) requests in flight from this router
    batch_in_flight: float = 0.0
    queued: int = 0  # interactive requests waiting in the router (for room, or held for a cold start)
    held: int = 0  # of which held because the version has no replica
    engine_waiting: float = 0.0  # the engines' own queues, summed over ready replicas
    utilisation: float | None = None  # 0..1 over ready replicas: KV-cache use or busy share, the higher
    ttft_p99_ms: float | None = None
    itl_p99_ms: float | None = None
    latency_p99_ms: float | None = None
    samples: int = 0  # requests the percentiles come from

    @property
    def interactive_share(self) -> float:
        """The part of the engines' work that is not batch (1.0 when nothing is in flight)."""
        total = self.in_flight + self.batch_in_flight
        return 1.0 if total <= 0 else self.in_flight / total

    @property
    def waiting(self) -> float:
        """Interactive requests waiting anywhere: the router's queue and the engines' (their share of it)."""
        return self.queued + self.engine_waiting * self.interactive_share

    @property
    def busy(self) -> float | None:
        return None if self.utilisation is None else self.utilisation * self.interactive_share

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Memory:
    """What a decision needs of the past: since when each condition has held, the last change."""

    hot_since: float | None = None
    last_hot_at: float | None = None
    cold_since: float | None = None
    idle_since: float | None = None
    last_change_at: float | None = None
    last_direction: str = ""  # "up" or "down"
    direction_changes: int = 0


@dataclass(frozen=True)
class Decision:
    current: int
    desired: int
    rule: str  # bounds, pending, cold_start, panic, in_flight, utilisation, latency, down, to_zero, steady
    reason: str
    memory: Memory

    @property
    def direction(self) -> str:
        return "up" if self.desired > self.current else "down" if self.desired < self.current else "hold"

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.current, "to": self.desired, "direction": self.direction, "rule": self.rule,
                "reason": self.reason}


def latency_over(signals: Signals, slo: Slo, ratio: float = 1.0, min_samples: int = 1) -> list[str]:
    """The latency objectives whose p99 is above ``ratio`` of the SLO (none with too few samples)."""
    if signals.samples < min_samples:
        return []
    pairs = (("ttft", signals.ttft_p99_ms, slo.ttft_ms), ("itl", signals.itl_p99_ms, slo.itl_ms),
             ("p99", signals.latency_p99_ms, slo.p99_ms))
    return [f"{name} p99 {value:.0f} ms > {ratio * limit:.0f} ms" for name, value, limit in pairs
            if value is not None and limit is not None and value > ratio * limit]


def fits_on(signals: Signals, replicas: int, policy: AutoscalingPolicy) -> str | None:
    """None when the version's load would fit on ``replicas`` under every target; else why not."""
    if replicas <= 0:
        return "no replica left"
    ready = max(signals.ready, 1)
    per_replica = signals.in_flight / replicas
    if per_replica > policy.target_in_flight_per_replica:
        return (f"{signals.in_flight:.1f} in flight would be {per_replica:.1f} a replica, over the target of "
                f"{policy.target_in_flight_per_replica:g}")
    busy = signals.busy
    if busy is not None and busy * ready / replicas >= policy.utilisation_high:
        return f"utilisation {busy:.0%} on {ready} would be {busy * ready / replicas:.0%} on {replicas}"
    return None


def _change(current: int, desired: int, rule: str, reason: str, memory: Memory, now: float) -> Decision:
    direction = "up" if desired > current else "down"
    reversed_ = bool(memory.last_direction) and memory.last_direction != direction
    # A step down keeps the evidence that the load has been low (HPA's stabilization window, not a fresh
    # wait per replica): the next step comes a cooldown later if it is still cold and still fits on one
    # fewer. Anything else starts every window again.
    cold_since = memory.cold_since if direction == "down" and rule == "down" else None
    after = Memory(cold_since=cold_since, last_change_at=now, last_direction=direction,
                   direction_changes=memory.direction_changes + (1 if reversed_ else 0))
    return Decision(current, desired, rule, reason, after)


def _since(started: float | None, condition: bool, now: float) -> float | None:
    if not condition:
        return None
    return now if started is None else started


def desired_replicas(signals: Signals, current: int, policy: AutoscalingPolicy, now: float,
                     memory: Memory | None = None) -> Decision:
    """The replicas the version should run now, and why (the module's rules, in order)."""
    memory = memory or Memory()
    if current < policy.min_replicas or current > policy.max_replicas:
        target = min(max(current, policy.min_replicas), policy.max_replicas)
        return _change(current, target, "bounds",
                       f"{current} replicas is outside min_replicas..max_replicas "
                       f"({policy.min_replicas}..{policy.max_replicas})", memory, now)
    if signals.starting or signals.draining:
        waiting_for = "starting" if signals.starting else "draining"
        return Decision(current, current, "pending", f"{signals.starting or signals.draining} replica(s) "
                        f"still {waiting_for}: no new action until they settle", memory)
    if current == 0:
        if signals.held or signals.in_flight:
            return _change(0, min(1, policy.max_replicas), "cold_start",
                           f"{signals.held} request(s) held with no replica", memory, now)
        return Decision(0, 0, "steady", "scaled to zero; no demand", memory)

    demand = signals.in_flight + signals.waiting
    proportional = math.ceil(demand / policy.target_in_flight_per_replica - 1e-9)
    busy = signals.busy
    hot: list[tuple[str, str]] = []
    if proportional > current:
        hot.append(("in_flight", f"demand {demand:.1f} needs {proportional} replicas at "
                                 f"{policy.target_in_flight_per_replica:g} each"))
    if busy is not None and busy > policy.utilisation_high:
        hot.append(("utilisation", f"utilisation {busy:.0%} > {policy.utilisation_high:.0%}"))
    slow = latency_over(signals, policy.slo, 1.0, policy.min_samples)
    if slow:
        hot.append(("latency", "; ".join(slow)))
    ceiling = min(policy.max_replicas, max(current * 2, current + 1))
    up_to = min(ceiling, max(proportional, current + 1))

    if signals.waiting > policy.max_queue and current < policy.max_replicas:
        return _change(current, up_to, "panic", f"{signals.waiting:.0f} waiting > max_queue {policy.max_queue}",
                       memory, now)
    hot_since = _since(memory.hot_since, bool(hot), now)
    last_hot_at = now if hot else memory.last_hot_at
    if not hot and memory.hot_since is not None and last_hot_at is not None \
            and now - last_hot_at <= HOT_GRACE * policy.up_delay_s:
        hot_since = memory.hot_since  # a dip of a noisy load (Poisson arrivals) does not restart the wait
    memory = replace(memory, last_hot_at=last_hot_at)
    if hot and current < policy.max_replicas:
        assert hot_since is not None
        if now - hot_since >= policy.up_delay_s:
            rule, reason = hot[0]
            return _change(current, up_to, rule, f"{'; '.join(r for _, r in hot)} for {now - hot_since:.0f}s",
                           memory, now)
        return Decision(current, current, "steady",
                        f"{hot[0][1]}, hot for {now - hot_since:.0f}s of up_delay_s {policy.up_delay_s:g}",
                        replace(memory, hot_since=hot_since, cold_since=None, idle_since=None))

    idle = signals.in_flight + signals.batch_in_flight + signals.waiting <= 0
    idle_since = _since(memory.idle_since, idle, now)
    cold = not hot and signals.waiting <= 0 and (busy is None or busy < policy.utilisation_low) \
        and not latency_over(signals, policy.slo, policy.slo_low_ratio, policy.min_samples)
    cold_since = _since(memory.cold_since, cold, now)
    memory = replace(memory, hot_since=hot_since, cold_since=cold_since, idle_since=idle_since)
    cooling = memory.last_change_at is not None and now - memory.last_change_at < policy.cooldown_s
    if current == 1 and policy.min_replicas == 0:
        if idle_since is not None and now - idle_since >= policy.idle_delay_s and not cooling:
            return _change(1, 0, "to_zero", f"nothing in flight or waiting for {now - idle_since:.0f}s", memory, now)
        return Decision(1, 1, "steady", "idle" if idle else "serving", memory)
    if current > policy.min_replicas and cold_since is not None:
        held = now - cold_since
        if held < policy.down_delay_s:
            return Decision(current, current, "steady",
                            f"cold for {held:.0f}s of down_delay_s {policy.down_delay_s:g}", memory)
        if cooling:
            return Decision(current, current, "steady", f"cooldown: changed {now - memory.last_change_at:.0f}s ago"
                            if memory.last_change_at is not None else "cooldown", memory)
        misfit = fits_on(signals, current - 1, policy)
        if misfit is not None:
            return Decision(current, current, "steady", f"a scale-down would not fit: {misfit}", memory)
        return _change(current, current - 1, "down", f"cold for {held:.0f}s and the load fits on {current - 1}",
                       memory, now)
    return Decision(current, current, "steady", "within targets", memory)


def within_budget(decision: Decision, budget: int, used_elsewhere: int) -> Decision:
    """``decision`` capped so that its extra replicas (beyond the first, which a predict version always runs)
    and ``used_elsewhere`` (the other versions' extras) stay within ``budget``; never below the current count."""
    room = budget - used_elsewhere
    if decision.desired <= max(room, decision.current):
        return decision
    capped = max(room, decision.current)
    return replace(decision, desired=capped, reason=f"{decision.reason}; capped at {capped} by the CPU budget of "
                   f"{budget} threads ({used_elsewhere} more used by other versions)")
