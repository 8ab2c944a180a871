"""The load-test harness: schedules, metrics on hand-made traces, bad input, and real runs against the sim."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest import cli
from loadtest.metrics import summarize
from loadtest.runner import Record
from loadtest.schedule import Shape, intended_send_times
from loadtest.slo import parse_slo
from loadtest.workload import Workload, load_prompt_file, parse_length
from tests.conftest import free_port


def test_poisson_arrivals_average_the_rate_and_are_reproducible() -> None:
    times = intended_send_times(Shape("constant", 50), 20, "poisson", seed=3)
    assert 900 <= len(times) <= 1100
    assert times == intended_send_times(Shape("constant", 50), 20, "poisson", seed=3)
    assert all(0 <= a < b < 20 for a, b in zip(times, times[1:], strict=False))


def test_gamma_burstiness_changes_the_spread_not_the_rate() -> None:
    def gaps(burstiness: float) -> list[float]:
        times = intended_send_times(Shape("constant", 100), 30, "gamma", burstiness, seed=1)
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    bursty, smooth = gaps(0.25), gaps(4.0)
    assert abs(len(bursty) - len(smooth)) < 0.1 * len(smooth)
    spread = lambda g: (sum((x - sum(g) / len(g)) ** 2 for x in g) / len(g)) ** 0.5  # noqa: E731
    assert spread(bursty) > 3 * spread(smooth)


def test_spike_and_ramp_shapes() -> None:
    spike = intended_send_times(Shape("spike", 10, spike_factor=5, spike_start_s=10, spike_duration_s=5), 30,
                                "constant")
    in_spike = sum(1 for t in spike if 10 <= t < 15)
    before = sum(1 for t in spike if 0 <= t < 5)
    assert in_spike > 4 * before
    ramp = intended_send_times(Shape("ramp", 2, end_rate=20), 20, "constant")
    assert sum(1 for t in ramp if t >= 15) > 4 * sum(1 for t in ramp if t < 5)
    assert len(intended_send_times(Shape("constant", 100), 10, max_requests=7)) == 7
    with pytest.raises(ValueError):
        intended_send_times(Shape("constant", 0), 10)


def record(index: int, intended: float, sent: float, first: float | None, end: float | None, tokens: int,
           itl: list[float] | None = None, ok: bool = True, status: int = 200, version: str = "v1") -> Record:
    return Record(index=index, target="t", intended_s=intended, sent_s=sent, ok=ok, status=status,
                  first_token_s=first, end_s=end, itl_s=itl or [], output_tokens=tokens, version=version)


def test_metrics_on_a_hand_made_trace() -> None:
    trace = [
        # sent on time: TTFT 100 ms, 5 tokens over 0.5 s -> TPOT (600-100)/4 = 125 ms
        record(0, 0.0, 0.0, 0.1, 0.6, 5, [0.1, 0.1, 0.2, 0.1]),
        # waited 0.4 s for a slot (coordinated omission): TTFT from send 200 ms, from intended 600 ms
        record(1, 1.0, 1.4, 1.6, 1.8, 3, [0.1, 0.1], version="v2"),
        record(2, 2.0, 2.0, None, None, 0, ok=False, status=503),
        record(3, 0.0, 0.0, 0.05, 0.05, 1, ok=True, version="v1"),
    ]
    trace[3].warmup = True
    summary = summarize(trace, duration_s=2.0, slo=parse_slo(["ttft:150"]))
    assert summary["completed"] == 2 and summary["failed"] == 1 and summary["errors"] == {"503": 1}
    assert summary["median_ttft_ms"] == pytest.approx(150.0)
    assert summary["max_ttft_ms"] == pytest.approx(200.0)
    assert summary["max_ttft_from_intended_ms"] == pytest.approx(600.0)
    assert summary["mean_tpot_ms"] == pytest.approx((125.0 + 100.0) / 2)
    assert summary["max_itl_ms"] == pytest.approx(200.0)
    assert summary["total_output_tokens"] == 8 and summary["output_throughput"] == 4.0
    assert summary["request_goodput"] == 0.5  # only the first meets TTFT <= 150 ms
    assert summary["slo_attainment"] == pytest.approx(1 / 3)
    assert summary["versions"] == {"v1": 1, "v2": 1}
    assert summary["max_cap_wait_ms"] == pytest.approx(400.0)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("fixed", "fixed:N"), ("uniform:9:1", "uniform:LO:HI"), ("normal:x:1", "bad length"), ("hist:", "bad")],
)
def test_bad_length_distributions(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_length(spec)


def test_prompt_files_and_workloads(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_prompt_file(bad)
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hello", "max_tokens": 7, "user": "u1"}\n')
    spec = Workload(prompt_file=good).next()
    assert (spec.prompt, spec.max_tokens, spec.user) == ("hello", 7, "u1")
    synthetic = Workload(source="synthetic", input_length=parse_length("fixed:12"),
                         output_length=parse_length("uniform:4:8"), users=5, priorities=["batch"], seed=1).next()
    assert len(synthetic.messages[0]["content"].split()) == 12
    assert 4 <= synthetic.max_tokens <= 8 and synthetic.user.startswith("user-") and synthetic.priority == "batch"
    assert Workload().next().messages  # the bundled real prompts


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "loadtest.sim", "--port", str(port), "--model", "sim:v1",
                                "sim", "--ttft-ms", "20", "--itl-ms", "2", "--max-running", "4",
                                "--load-slowdown", "2"])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield url
    process.terminate()
    process.wait()


def test_a_short_run_writes_every_output(sim_url: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = cli.main(["run", "--target", f"sim={sim_url}/v1", "--model", "sim", "--rate", "30", "--duration", "2",
                     "--output-len", "fixed:8", "--users", "20", "--slo", "ttft:500", "tpot:100",
                     "--output-dir", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"result.json", "requests.csv", "report.html", "latency_cdf.png",
                                               "ttft_over_time.png"}
    result = json.loads((out / "result.json").read_text())
    summary = result["targets"]["sim"]
    assert summary["completed"] >= 40 and summary["failed"] == 0
    assert summary["versions"] == {"-": summary["completed"]}  # the sim sends no version header
    assert summary["p50_ttft_ms"] >= 20 and summary["total_output_tokens"] == 8 * summary["completed"]
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert len(rows) == summary["num_prompts"] and rows[0]["user"].startswith("user-")
    assert "<img" in (out / "report.html").read_text()


def test_a_spike_shows_in_the_report(sim_url: str, tmp_path: Path) -> None:
    out = tmp_path / "spike"
    code = cli.main(["run", "--target", f"sim={sim_url}/v1", "--model", "sim", "--rate", "10", "--duration", "4",
                     "--shape", "spike", "--spike-factor", "8", "--spike-start", "2", "--spike-duration", "1",
                     "--output-len", "fixed:16", "--arrival", "constant", "--output-dir", str(out)])
    assert code == 0
    rows = list(csv.DictReader((out / "requests.csv").open()))
    in_spike = [r for r in rows if 2 <= float(r["intended_s"]) < 3]
    before = [r for r in rows if 0 <= float(r["intended_s"]) < 1]
    assert len(in_spike) > 5 * len(before)
    ttft = lambda rs: sorted(float(r["ttft_ms"]) for r in rs)[len(rs) // 2]  # noqa: E731
    assert ttft(in_spike) > ttft(before)  # 80 req/s on 4 slots queues: the spike is visible in TTFT


def test_a_sweep_finds_the_highest_rate_holding_the_slo(sim_url: str, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    code = cli.main(["sweep", "--target", f"sim={sim_url}/v1", "--model", "sim", "--rates", "5,40,200",
                     "--duration", "1.5", "--output-len", "fixed:20", "--slo", "ttft:150",
                     "--output-dir", str(out)])
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["sweep"]["highest_rate_holding_slo"] in (5.0, 40.0)
    assert len(result["runs"]) == 3 and (out / "sweep.png").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--target", "x=ftp://nowhere", "--model", "m", "--rate", "1"],
        ["run", "--target", "x=http://127.0.0.1:9/v1", "--model", "m", "--rate", "1"],
        ["run", "--target", "x=http://127.0.0.1:9/v1", "--model", "m", "--rate", "1", "--slo", "ttft"],
        ["run", "--target", "x=http://127.0.0.1:9/v1", "--model", "m"],
        ["sweep", "--target", "x=http://127.0.0.1:9/v1", "--model", "m", "--rates", "4,2"],
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(argv: list[str], tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) if argv[2].startswith("x=ftp") else _no_exit():
        assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and err.count("\n") == 0
    assert not (tmp_path / "loadtest-results").exists()  # nothing half-written


class _no_exit:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_metrics_agree_with_vllm_bench_serve(sim_url: str, tmp_path: Path) -> None:
    """The same recorded trace through vLLM's own calculate_metrics and ours: within 1%."""
    import asyncio

    from vllm.benchmarks.datasets.datasets import SampleRequest
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    from loadtest.runner import RunPlan, Target, execute

    plan = RunPlan(targets=[Target("sim", f"{sim_url}/v1")], model="sim",
                   intended=intended_send_times(Shape("constant", 40), 2.0, "poisson", seed=5))
    workload = Workload(source="synthetic", output_length=parse_length("uniform:2:24"), seed=5)
    records, duration = asyncio.run(execute(plan, workload))
    ours = summarize(records, duration, parse_slo(["ttft:60", "tpot:8"]))
    outputs = [RequestFuncOutput(success=r.ok, latency=(r.end_s - r.sent_s), output_tokens=r.output_tokens,
                                 ttft=(r.first_token_s - r.sent_s), itl=list(r.itl_s), prompt_len=r.input_tokens,
                                 start_time=r.sent_s) for r in records if r.ok]
    inputs = [SampleRequest(prompt="x", prompt_len=r.input_tokens, expected_output_len=r.output_tokens)
              for r in records if r.ok]
    theirs, _ = calculate_metrics(inputs, outputs, duration, None, [50.0, 99.0], {"ttft": 60.0, "tpot": 8.0})
    pairs = {
        "mean_ttft_ms": theirs.mean_ttft_ms, "median_ttft_ms": theirs.median_ttft_ms,
        "p99_ttft_ms": dict(theirs.percentiles_ttft_ms)[99.0],
        "mean_tpot_ms": theirs.mean_tpot_ms, "median_tpot_ms": theirs.median_tpot_ms,
        "p99_tpot_ms": dict(theirs.percentiles_tpot_ms)[99.0],
        "mean_itl_ms": theirs.mean_itl_ms, "mean_e2el_ms": theirs.mean_e2el_ms,
        "request_goodput": theirs.request_goodput, "output_throughput": theirs.output_throughput,
    }
    assert ours["completed"] == theirs.completed > 50
    for key, value in pairs.items():
        assert ours[key] == pytest.approx(value, rel=0.01), key


def test_two_targets_are_interleaved_and_compared(sim_url: str, tmp_path: Path) -> None:
    out = tmp_path / "pair"
    code = cli.main(["run", "--target", f"a={sim_url}/v1", "--target", f"b@completions={sim_url}/v1",
                     "--model", "sim", "--rate", "20", "--duration", "1.5", "--output-len", "fixed:4",
                     "--output-dir", str(out)])
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    a, b = result["targets"]["a"], result["targets"]["b"]
    assert abs(a["num_prompts"] - b["num_prompts"]) <= 1  # round robin over one schedule
    ratios = result["comparison"]["b_vs_a"]
    assert set(ratios) >= {"added_ttft_p50_ms", "output_throughput_ratio", "goodput_ratio"}
    assert 0.5 < ratios["output_throughput_ratio"] < 2


def test_bench_is_a_subcommand_that_interleaves_the_targets(sim_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--target", f"a={sim_url}/v1", "--target", f"b={sim_url}/v1", "--model", "sim",
                     "-n", "6", "-c", "2", "--max-tokens", "4", "--rounds", "3", "--output", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["targets"]["a"]["completed"] == report["targets"]["b"]["completed"] == 6
    assert set(report["comparison"]["b_vs_a"]) == {"added_ttft_p50_ms", "added_ttft_p99_ms", "added_itl_p50_ms",
                                                   "output_throughput_ratio"}
    assert cli.main(["bench", "--target", f"a={sim_url}/v1", "--model", "sim", "--rounds", "0"]) == 2


def test_an_interleaved_plan_loads_one_target_at_a_time(sim_url: str) -> None:
    import asyncio

    from loadtest.runner import RunPlan, Target, busy_s, execute

    plan = RunPlan(targets=[Target("a", f"{sim_url}/v1"), Target("b", f"{sim_url}/v1")], model="sim", intended=[],
                   users=2, max_requests=6, rounds=3)
    records, duration = asyncio.run(execute(plan, cli.PromptList(cli.BENCH_PROMPTS, 4, seed=0)))
    assert len(records) == 12 and all(r.ok for r in records)
    for round_index in range(3):
        first, second = ("a", "b") if round_index % 2 == 0 else ("b", "a")  # A B, B A, A B
        batch = [r for r in records if r.round_index == round_index]
        assert sum(r.target == first for r in batch) == sum(r.target == second for r in batch) == 2
        assert max(r.done_s for r in batch if r.target == first) <= min(r.sent_s for r in batch if r.target == second)
    a, b = (busy_s([r for r in records if r.target == name]) for name in "ab")
    assert 0 < a and 0 < b and a + b <= duration
