"""`python -m wan_kernels.gpu_check`: the one GPU command, exercised here without a GPU (dry run: every section
lists its cases; --device cpu: the CPU-meaningful sections really run), so it cannot rot between GPU loans."""

from __future__ import annotations

import json

import pytest
import torch

from wan_kernels import gpu_check, routing


def _rows(outdir):
    return [json.loads(line) for line in (outdir / "results.jsonl").read_text().splitlines()]


def test_dry_run_lists_every_section_and_op(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path), "--dry-run"]) == 0
    rows = _rows(tmp_path)
    assert {r["status"] for r in rows} == {"dry-run"}
    assert {r["section"] for r in rows} == {s.name for s in gpu_check.SECTIONS}
    ops = {r["case"].split()[0] for r in rows if r["section"] == "ops"}
    assert ops == set(routing.public_ops())
    assert len([r for r in rows if r["section"] == "ops"]) == len(routing.public_ops()) * 3 * 3  # impls x dtypes
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["env.json", "results.jsonl", "summary.md"] and len(files) <= 8
    summary = (tmp_path / "summary.md").read_text()
    assert "## bench_attention" in summary and "self-attn 14B 720p sdpa-cudnn" in summary
    assert json.loads((tmp_path / "env.json").read_text())["routes"]


def test_cpu_run_checks_ops_and_model(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path), "--device", "cpu", "--sections", "ops,model"]) == 0
    rows = _rows(tmp_path)
    ops = [r for r in rows if r["section"] == "ops"]
    assert all(r["status"] in ("ok", "skip") for r in rows), [r for r in rows if r["status"] not in ("ok", "skip")]
    ran = [r for r in ops if r["status"] == "ok"]
    # every op runs through auto on CPU in all three dtypes, with its measured error recorded
    assert {(r["case"].split()[0], r["case"].split()[2]) for r in ran if " auto " in r["case"]} == \
        {(op, d) for op in routing.public_ops() for d in gpu_check.DTYPES}
    assert all("max_err" in r for r in ran)
    model = {r["case"]: r for r in rows if r["section"] == "model"}
    assert model["tiny-i2v bf16 auto vs ref"]["status"] == "ok"
    assert model["tiny-i2v CUDA graph replay"]["status"] == "skip"


def test_a_wrong_backend_is_reported_and_fails_the_run(tmp_path, monkeypatch, capsys):
    real = gpu_check.routing.resolve

    def broken(op, impl, device):
        fn = real(op, impl, device)
        if op == "gated_residual" and impl == "auto":
            return lambda *a: fn(*a) + 1.0
        return fn

    monkeypatch.setattr(gpu_check.routing, "resolve", broken)
    assert gpu_check.main([str(tmp_path), "--device", "cpu", "--sections", "ops"]) == 1
    bad = {r["case"] for r in _rows(tmp_path) if r["status"] == "fail"}
    assert bad == {f"gated_residual auto {d}" for d in gpu_check.DTYPES}
    assert "gated_residual auto fp32 | fail" in (tmp_path / "summary.md").read_text()


def test_spent_time_box_records_timeouts_and_moves_on(tmp_path, capsys):
    check = gpu_check.Check(tmp_path, "cpu", dry_run=False)
    calls = []
    cases = [gpu_check.Case(f"c{i}", lambda i=i: calls.append(i) or {"v": i}, "", needs_cuda=False) for i in range(3)]
    check.run_section(gpu_check.Section("boxed", -1.0, lambda c: cases))  # budget already spent
    check.run_section(gpu_check.Section("next", 60.0, lambda c: cases[:1]))
    assert calls == [0]
    assert [(r["section"], r["status"]) for r in _rows(tmp_path)] == [("boxed", "timeout")] * 3 + [("next", "ok")]


def test_a_raising_case_is_an_error_row_not_a_crash(tmp_path, capsys):
    check = gpu_check.Check(tmp_path, "cpu", dry_run=False)

    def boom():
        raise RuntimeError("illegal memory access")

    check.run_section(gpu_check.Section("s", 60.0, lambda c: [gpu_check.Case("boom", boom, "", needs_cuda=False)]))
    (row,) = _rows(tmp_path)
    assert row["status"] == "error" and "illegal memory access" in row["error"]


@pytest.mark.parametrize("argv, message", [
    (["--sections", "ops,nope"], "unknown section"),
    (["--device", "cuda"], "no CUDA device"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SystemExit) as e:
        gpu_check.main([str(tmp_path), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
