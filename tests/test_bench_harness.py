"""The shared benchmark harness: statistics, correctness gate, GPU-provider skipping, output files."""

import json

import pytest
import torch

from bench import harness


def test_quantiles():
    med, p20, p80 = harness.quantiles([float(x) for x in range(1, 12)])
    assert med == 6 and p20 == 3 and p80 == 9


def test_run_checks_times_and_reports(tmp_path):
    a = torch.randn(64, 64)
    case = harness.Case("64x64 matmul", flops=2 * 64**3, bytes=3 * 64 * 64 * 4, providers=[
        harness.Provider("ref-eager", lambda: a @ a),
        harness.Provider("ref-compile", lambda: torch.matmul(a, a)),
        harness.Provider("gpu-kernel", lambda: a @ a, gpu_only=True),
    ])
    rows = harness.run([case])
    by = {r.provider: r for r in rows}
    assert by["ref-eager"].ms > 0 and by["ref-eager"].p20 <= by["ref-eager"].ms <= by["ref-eager"].p80
    assert by["ref-eager"].tflops == pytest.approx(case.flops / by["ref-eager"].ms / 1e9)
    assert by["ref-compile"].speedup == pytest.approx(1.0)
    if not torch.cuda.is_available():
        assert by["gpu-kernel"].ms is None and "needs a GPU" in by["gpu-kernel"].note
    args = harness.arg_parser("t").parse_args(["--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")])
    harness.report(rows, args, "test")
    assert len(json.loads((tmp_path / "r.json").read_text())["rows"]) == 3
    assert (tmp_path / "r.csv").read_text().startswith("shape,provider,ms")


def test_wrong_provider_fails_the_correctness_gate():
    a = torch.randn(8, 8)
    case = harness.Case("bad", 0, 0, [harness.Provider("ref-eager", lambda: a), harness.Provider("x", lambda: a + 1)])
    with pytest.raises(AssertionError):
        harness.run([case])


def test_peak_lookup():
    assert harness.gpu_peak("NVIDIA H100 80GB HBM3")[0] == "H100"
    assert harness.gpu_peak("NVIDIA B200")[1]["fp4"] == 9000.0
    assert harness.gpu_peak("NVIDIA GeForce RTX 5090")[0] == "RTX 5090"
    assert harness.gpu_peak("Some CPU") is None
