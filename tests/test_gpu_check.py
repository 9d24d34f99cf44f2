"""`python -m tools.gpu_check`: the one GPU command, exercised here without a GPU (dry run: every section
lists its cases; --device cpu: the CPU-meaningful sections really run), so it cannot rot between GPU loans."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import triton

from tools import gpu_check
import wan_kernels
from wan_kernels import routing

from _inputs import attention_inputs


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
    # it ran nothing, and says so where a pass would be read
    assert summary.splitlines()[2].startswith("verdict: DRY RUN (exit 0): nothing ran")
    assert "gpu_check: DRY RUN: nothing ran" in capsys.readouterr().out


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_a_summary_case_runs_past_the_time_box(tmp_path, capsys):
    check = gpu_check.Check(tmp_path, "cpu", dry_run=False)
    cases = [gpu_check.Case("slow", lambda: {}, "", needs_cuda=False),
             gpu_check.Case("verdict", lambda: {"n": len(check.rows)}, "", needs_cuda=False, always=True)]
    check.run_section(gpu_check.Section("boxed", -1.0, lambda c: cases))
    assert [(r["case"], r["status"]) for r in _rows(tmp_path)] == [("slow", "timeout"), ("verdict", "ok")]


def test_the_run_deadline_stops_every_section(tmp_path, capsys):
    """--deadline-s: past the run's deadline no case starts in any section (its own time box left or not),
    except the summary rows."""
    check = gpu_check.Check(tmp_path, "cpu", dry_run=False, deadline=time.time() - 1)
    cases = [gpu_check.Case("a", lambda: {}, "", needs_cuda=False),
             gpu_check.Case("verdict", lambda: {}, "", needs_cuda=False, always=True)]
    check.run_section(gpu_check.Section("roomy", 600.0, lambda c: cases))
    rows = _rows(tmp_path)
    assert [(r["case"], r["status"]) for r in rows] == [("a", "timeout"), ("verdict", "ok")]
    assert "deadline" in rows[0]["reason"]
    # a run whose every case timed out is no pass (it was exit 0, "0 failed or errored"): INCOMPLETE, exit 3
    assert gpu_check.main([str(tmp_path), "--device", "cpu", "--sections", "ops", "--deadline-s", "1e-9",
                           "--overwrite"]) == 3
    assert {r["status"] for r in _rows(tmp_path) if r["section"] == "ops"} == {"timeout"}


def test_the_run_after_the_build_keeps_the_deadline(tmp_path, monkeypatch, capsys):
    """On a GPU, main() builds _C and re-executes itself: the new process gets the same absolute deadline, so
    the build's minutes count against --deadline-s."""
    execs = []
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "build", lambda outdir, timeout: {"status": "ok"})
    monkeypatch.setattr(gpu_check.os, "execv", lambda exe, argv: execs.append(argv) or (_ for _ in ()).throw(
        SystemExit(0)))
    with pytest.raises(SystemExit):
        gpu_check.main([str(tmp_path), "--sections", "ops", "--deadline-s", "300"])
    (argv,) = execs
    at = float(argv[argv.index("--deadline-at") + 1])
    assert 0 < at - time.time() <= 300 and "--skip-build" in argv and "--resume" in argv


def _row(status, section="ops", case="c"):
    return {"section": section, "case": case, "status": status}


def test_verdict_rule():
    """The verdict of the module docstring: a pass needs at least one case run, none failed and none left unrun
    for want of time; skips with a reason are allowed; a failed build fails, a timed-out one leaves it incomplete;
    a dry run or an unfinished run is never a pass."""
    v = gpu_check.verdict
    assert v([_row("ok"), _row("skip")])[:2] == ("PASS", 0)
    assert v([_row("ok"), _row("timeout")])[:2] == ("INCOMPLETE", 3)
    assert v([_row("timeout")] * 108)[:2] == ("INCOMPLETE", 3) and "108 selected case(s) did not run" in \
        v([_row("timeout")] * 108)[2]
    assert v([_row("skip")] * 5)[:2] == ("NOTHING RAN", 3)
    assert v([])[:2] == ("NOTHING RAN", 3)
    assert v([_row("ok"), _row("fail"), _row("timeout")])[:2] == ("FAIL", 1)
    assert v([_row("ok"), _row("error", "ops", "(setup)")])[:2] == ("FAIL", 1)
    assert v([_row("timeout", "build", "_C"), _row("ok")])[:2] == ("INCOMPLETE", 3)
    assert v([_row("error", "build", "_C"), _row("ok")])[:2] == ("FAIL", 1)
    assert v([_row("ok", "build", "_C"), _row("skip")])[:2] == ("NOTHING RAN", 3)  # a build alone checks nothing
    assert v([_row("dry-run")] * 3, dry_run=True)[:2] == ("DRY RUN", 0)
    assert v([_row("dry-run"), _row("error", "ops", "(setup)")], dry_run=True)[:2] == ("FAIL", 1)
    assert v([_row("ok")], finished=False)[:2] == ("INCOMPLETE", 3)


def test_a_run_that_ran_nothing_is_not_a_pass(tmp_path, capsys):
    """Every case past the deadline (a build that ate the budget on a borrowed GPU): exit 3 and INCOMPLETE at the
    top of summary.md (was exit 0 and "0 failed or errored"); every selected case skipped: NOTHING RAN."""
    out = tmp_path / "late"
    assert gpu_check.main([str(out), "--device", "cpu", "--sections", "ops", "--deadline-s", "0.001"]) == 3
    summary = (out / "summary.md").read_text().splitlines()
    assert summary[2].startswith("verdict: INCOMPLETE (exit 3): ") and "did not run" in summary[2], summary[2]
    assert "gpu_check: INCOMPLETE" in capsys.readouterr().out
    out = tmp_path / "skipped"
    assert gpu_check.main([str(out), "--device", "cpu", "--sections", "big_gemm"]) == 3
    assert {r["status"] for r in _rows(out)} == {"skip"}
    assert (out / "summary.md").read_text().splitlines()[2].startswith("verdict: NOTHING RAN (exit 3)")


def _toy_sections(monkeypatch, status="ok"):
    monkeypatch.setattr(gpu_check, "SECTIONS", [gpu_check.Section(
        "toy", 60.0, lambda c: [gpu_check.Case("one", lambda: {"status": status}, "", needs_cuda=False)])])


@pytest.mark.parametrize("build, code", [("timeout", 3), ("error", 1), ("ok", 0)])
def test_a_build_that_failed_or_timed_out_is_not_a_pass(tmp_path, monkeypatch, capsys, build, code):
    """The build row (written before the re-exec) decides with the rest: a build that timed out leaves the run
    incomplete, one that failed fails it, although every case after it passed (a timeout was exit 0)."""
    _toy_sections(monkeypatch)
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "build", lambda outdir, timeout: {"status": build})
    execs = []
    monkeypatch.setattr(gpu_check.os, "execv", lambda exe, argv: execs.append(argv) or (_ for _ in ()).throw(
        SystemExit(0)))
    with pytest.raises(SystemExit):
        gpu_check.main([str(tmp_path), "--sections", "toy"])
    (argv,) = execs
    assert "--resume" in argv and "--overwrite" not in argv
    # the re-executed run (here on CPU tensors): resumes into the same OUTDIR, no --overwrite needed
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([str(tmp_path), "--device", "cpu", "--skip-build", "--resume", "--sections", "toy"]) == code
    assert [(r["section"], r["status"]) for r in _rows(tmp_path)] == [("build", build), ("toy", "ok")]


def test_cuda_without_the_extension_is_not_a_pass(tmp_path, monkeypatch, capsys):
    """On CUDA, a _C that does not load (build failed, skipped, wrong torch) would turn every CUDA backend into a
    skip: it is an error row instead."""
    import dataclasses

    import wan_kernels

    _toy_sections(monkeypatch)
    monkeypatch.setattr(wan_kernels, "EXTENSION", dataclasses.replace(wan_kernels.EXTENSION, loaded=False,
                                                                      error="undefined symbol"))
    for name, fn in (("is_available", lambda: True), ("synchronize", lambda *a: None),
                     ("empty_cache", lambda: None)):
        monkeypatch.setattr(gpu_check.torch.cuda, name, fn)
    monkeypatch.setattr(gpu_check, "_device_name", lambda device: "fake GPU")
    monkeypatch.setattr(gpu_check, "env_fields", lambda check: {"device": "fake GPU", "extension": "missing"})
    assert gpu_check.main([str(tmp_path), "--skip-build", "--sections", "toy"]) == 1
    rows = _rows(tmp_path)
    assert ("build", "_C import", "error") in {(r["section"], r["case"], r["status"]) for r in rows}
    assert "undefined symbol" in rows[0]["error"]


def test_outdir_errors_are_one_line_usage_errors(tmp_path, capsys):
    """OUTDIR a file, under a file, or unwritable: argparse-style one-line errors naming OUTDIR (were tracebacks)."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    # unwritable: a read-only directory (root ignores modes: a sysfs directory refuses it new files)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    unwritable = Path("/sys/kernel") if os.geteuid() == 0 else locked
    try:
        for outdir, message in ((a_file, "exists and is not a directory"), (a_file / "sub", "cannot create"),
                                (unwritable, "cannot write")):
            with pytest.raises(SystemExit) as e:
                gpu_check.main([str(outdir), "--dry-run"])
            err = capsys.readouterr().err
            assert e.value.code == 2 and "error: argument OUTDIR: " in err and message in err, err
            assert str(outdir) in err and "Traceback" not in err and len(err.strip().splitlines()[-1]) < 300
    finally:
        locked.chmod(0o755)


def test_a_previous_run_is_not_overwritten_silently(tmp_path, capsys):
    """A directory with a previous run's results.jsonl is refused (exit 2) unless --overwrite, which replaces all
    of the previous run's files."""
    assert gpu_check.main([str(tmp_path), "--dry-run", "--sections", "model_step"]) == 0
    before = (tmp_path / "results.jsonl").read_text()
    (tmp_path / "build.log").write_text("an old build")
    with pytest.raises(SystemExit) as e:
        gpu_check.main([str(tmp_path), "--dry-run", "--sections", "big_gemm"])
    assert e.value.code == 2 and "holds a previous run's results.jsonl" in capsys.readouterr().err
    assert (tmp_path / "results.jsonl").read_text() == before
    assert gpu_check.main([str(tmp_path), "--dry-run", "--sections", "big_gemm", "--overwrite"]) == 0
    assert {r["section"] for r in _rows(tmp_path)} == {"big_gemm"}
    assert not (tmp_path / "build.log").exists()


def test_ops_plan_covers_nvfp4_linear_triton_bf16(tmp_path, capsys):
    """The bf16 compiled W4A16 GEMM (which the CPU interpreter can only emulate with fp32 dots) is a case of the
    GPU check's ops section."""
    gpu_check.main([str(tmp_path), "--dry-run", "--sections", "ops"])
    rows = {r["case"]: r for r in _rows(tmp_path)}
    assert rows["nvfp4_linear triton bf16"]["plan"] == "wan::nvfp4_linear impl=triton bf16 vs ref"
    assert {f"nvfp4_linear {i} bf16" for i in ("auto", "cuda", "triton")} <= set(rows)


def _bench_rows(ms: dict[str, float], status="ok", accuracy="ok"):
    """Rows as bench_attention_cases records them: case name -> ms (tflops of the 14B self-attention cases),
    after two attention_accuracy rows of wan-ws with status `accuracy`."""
    rows = [{"section": "attention_accuracy", "case": f"wan-ws B1 q300 {d}", "status": accuracy}
            for d in ("bf16", "fp16")]
    for case, t in ms.items():
        row = {"section": "bench_attention", "case": case, "status": status, "ms": t}
        if case.startswith("self-attn 14B"):
            S = gpu_check.ATTENTION_SHAPES[case.split()[2]]
            row["tflops"] = gpu_check._attention_flops(1, S, S, 40, 128) / t / 1e9
        rows.append(row)
    return rows


def _timings(wan: float, ws: float) -> dict[str, float]:
    """wan / wan-ws ms at every 14B self-attention length (scaled by length^2), the other shapes, two sweep tiles."""
    ms = {}
    for res, S in gpu_check.ATTENTION_SHAPES.items():
        f = (S / 75600) ** 2
        ms[f"self-attn 14B {res} wan"], ms[f"self-attn 14B {res} wan-ws"] = wan * f, ws * f
    for shape in ("self-attn 1.3B 480p", "T2V cross-attn 14B 720p"):
        ms[f"{shape} wan"], ms[f"{shape} wan-ws"] = 10.0, 9.0
    ms |= {"I2V cross-attn 14B 480p wan": 2.0, "I2V cross-attn 14B 480p wan-ws": 1.6,
           "I2V cross-attn 14B 480p two calls": 3.2,
           "self-attn 14B 720p wan-ws 128x64w4s2wsc1": ws * 0.9, "self-attn 14B 720p wan-ws 64x128w4s2wsc1": ws * 1.25}
    return ms


def test_ws_verdict_routes_only_when_never_slower():
    """The route decision of issue 17 from the bench rows: attention_ws must be at least as fast as today's kernel
    at every shape, none missing; the TFLOP/s target is the arch's; sweep tiles are reported against the table's."""
    # 720p self-attention: 4 * 75600^2 * 40 * 128 = 1.17e14 FLOP; 180 ms = 650 TFLOP/s, 250 ms = 468
    fast = gpu_check.ws_verdict(_bench_rows(_timings(wan=250.0, ws=180.0)), (9, 0))
    assert fast["route"] and fast["missing"] == [] and fast["target_tflops"] == 620.0
    assert set(fast["speedup_vs_wan"]) == {f"self-attn 14B {r}" for r in gpu_check.ATTENTION_SHAPES} | {
        "self-attn 1.3B 480p", "T2V cross-attn 14B 720p", "I2V cross-attn 14B 480p"}
    assert fast["speedup_vs_wan"]["self-attn 14B 720p"] == pytest.approx(250 / 180, abs=1e-3)
    assert fast["i2v_one_launch_vs_two_calls"] == 2.0 and fast["meets_target"]
    assert fast["sweep_vs_table"] == {"128x64w4s2wsc1": pytest.approx(1 / 0.9, abs=1e-3), "64x128w4s2wsc1": 0.8}
    assert gpu_check.ws_verdict(_bench_rows(_timings(250.0, 180.0)), (10, 0))["target_tflops"] == 1500.0
    assert not gpu_check.ws_verdict(_bench_rows(_timings(250.0, 180.0)), (10, 0))["meets_target"]
    # fast but one accuracy case failed (or none ran): not routed
    for rows in (_bench_rows(_timings(250.0, 180.0), accuracy="fail"),
                 [r for r in _bench_rows(_timings(250.0, 180.0)) if r["section"] == "bench_attention"]):
        wrong = gpu_check.ws_verdict(rows, (9, 0))
        assert not wrong["accurate"] and not wrong["route"]
    # slower at one shape (the short T2V key set, where a persistent grid's overhead shows): not routed
    ms = _timings(250.0, 180.0)
    ms["T2V cross-attn 14B 720p wan-ws"] = 10.5
    slow = gpu_check.ws_verdict(_bench_rows(ms), (9, 0))
    assert not slow["route"] and slow["speedup_vs_wan"]["T2V cross-attn 14B 720p"] < 1
    # a shape whose wan-ws row failed or timed out: not routed, and named
    rows = _bench_rows(_timings(250.0, 180.0))
    next(r for r in rows if r["case"] == "self-attn 14B 720p wan-ws")["status"] = "timeout"
    partial = gpu_check.ws_verdict(rows, (9, 0))
    assert not partial["route"] and partial["missing"] == ["self-attn 14B 720p"]
    # no wan-ws row at all (an A100): a skip, not a verdict
    assert gpu_check.ws_verdict(_bench_rows({"self-attn 14B 720p wan": 250.0}), (8, 0))["status"] == "skip"


def test_bench_attention_cases_pair_every_wan_shape_with_wan_ws(tmp_path):
    """Every shape timed with today's kernel is timed with attention_ws too (else the verdict could not be
    true), the sweep covers attention_ws.SWEEP, and the verdict runs last, past the time box."""
    from wan_kernels.triton import attention_ws

    check = gpu_check.Check(tmp_path, "cpu", dry_run=True)
    cases = gpu_check.bench_attention_cases(check)
    names = [c.name for c in cases]
    wan = [n.removesuffix(" wan") for n in names if n.endswith(" wan")]
    assert len(wan) == len(gpu_check.ATTENTION_SHAPES) + 3 and all(f"{sh} wan-ws" in names for sh in wan)
    assert {n.split(" wan-ws ")[1] for n in names if " wan-ws " in n} == \
        {str(c) for cs in attention_ws.SWEEP.values() for c in cs}
    assert names[-1] == "attention_ws route verdict" and cases[-1].always


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
    (["--sections", "", "--device", "cpu"], "argument --sections: no section selected"),  # ran nothing, exit 0
    (["--sections", ",", "--dry-run"], "argument --sections: no section selected"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SystemExit) as e:
        gpu_check.main([str(tmp_path), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7),
                    reason="Triton 3.6's interpreter cannot run the attention kernels (README, Supported versions); "
                           "the main venv runs this")
def test_attention_accuracy_section_on_cpu_tensors(tmp_path, monkeypatch, capsys):
    """The accuracy rule of the GPU check, run here: on CPU tensors under the interpreter both kernels pass at a
    small shape with tails and the image set, and a kernel that drops the last key tile fails it."""
    from wan_kernels.testing import fp32_rounding_floor
    from wan_kernels.triton import attention as fa2

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(gpu_check, "ACCURACY_SHAPES", [(1, 37, 45, 19, 2, 32, False), (1, 20, 20, 0, 1, 32, True)])
    check = gpu_check.Check(tmp_path, "cpu", dry_run=False)
    for case in gpu_check.attention_accuracy_cases(check):
        row = case.run()
        assert row["status"] == "ok", (case.name, row)
        if "packed" not in case.name and " wan-ws " in case.name:
            assert row["ok_lse"] and row["ok_lse_img"], row
    # the floor's spread from the extremes of v equals max_j,d |v_jd - out_d| over the [Sq, Sk, D] broadcast
    inputs = attention_inputs(1, 37, 45, 19, 2, 32, torch.float16, seed=1)
    q, k, v, ki, vi = inputs
    broadcast = 0.0
    for kk, vv in ((k, v), (ki, vi)):
        x = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk.double()) / 32 ** 0.5
        vh = vv.double().transpose(1, 2)
        out = torch.softmax(x, -1) @ vh
        spread = (vh[:, :, None] - out[:, :, :, None]).abs().amax((-1, -2))
        broadcast = broadcast + 2.0**-24 * (x.abs().amax(-1) * spread + vh.abs().amax((-1, -2))[..., None])
    assert fp32_rounding_floor(*inputs) == pytest.approx(float(broadcast.max()), rel=1e-12)
    # negative control: the key tail dropped (Sk 45 -> 32) is far outside the rule
    real = fa2.attention_with_lse
    monkeypatch.setattr(fa2, "attention_with_lse", lambda q, k, v, ki=None, vi=None: real(q, k[:, :32], v[:, :32],
                                                                                        ki, vi))
    bad = next(c for c in gpu_check.attention_accuracy_cases(check) if c.name.startswith("wan B1 q37"))
    assert bad.run()["status"] == "fail"
    # and an attention_ws LSE off by what a lost key tile costs (out untouched) fails its own rule
    from wan_kernels.triton import attention_ws
    real_ws = attention_ws.attention_with_lse
    monkeypatch.setattr(attention_ws, "attention_with_lse",
                        lambda *a: (lambda o, lse, li: (o, lse + 3e-2, li))(*real_ws(*a)))
    monkeypatch.setattr(fa2, "attention_with_lse", real)
    row = next(c for c in gpu_check.attention_accuracy_cases(check) if c.name.startswith("wan-ws B1 q37")).run()
    assert row["ok_out"] and not row["ok_lse"] and row["ok_lse_img"] and row["status"] == "fail"


@pytest.mark.slow
def test_attention_int8_section_on_cpu_and_its_rules(tmp_path, monkeypatch):
    """The 8-bit attention section, run here (CPU: the op's backend is its reference emulation, so the accuracy rows
    compare it with itself and pass): every CPU-runnable row ok and the verdict not to route without timings. A
    kernel that adds noise (as SageAttention's fp8 P.V did past 160k tokens) fails the accuracy rows (the ring
    block's included) and the long rows;
    the verdict routes int8 only when accurate and >= 2x bf16 at every timed shape."""
    monkeypatch.setattr(gpu_check, "INT8_ACCURACY", gpu_check.INT8_ACCURACY[1:2])
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the fused-q rows run the kernels interpreted (64 tokens)
    check = gpu_check.Check(tmp_path, "cpu", dry_run=False)
    cases = gpu_check.attention_int8_cases(check)
    assert [c.name for c in cases if c.needs_cuda] == [
        "e4m3 cast",
        *(name for r in ("480p", "720p") for name in (*(f"self-attn 14B {r} {p}" for p in ("bf16", "int8-fp16",
                                                                                          "int8-fp8")),
                                                      f"quantizer 14B {r}")),
        "14B CFG step 480p int8 vs bf16"]
    check.run_section(gpu_check.Section("attention_int8", 600, gpu_check.attention_int8_cases))
    rows = {r["case"]: r for r in check.rows}
    assert all(rows[c.name]["status"] == "ok" for c in cases if not c.needs_cuda), rows
    assert rows["int8 route verdict"]["route_int8_default"] is False
    assert rows["q fused in qk_norm_rope 14B 480p"]["identical"] is True

    real_fused = wan_kernels.qk_norm_rope_int8

    def off_by_one(*args, impl="auto"):  # a fused kernel whose codes differ from the quantizer's fails its row
        q8, qs, k, v = real_fused(*args, impl=impl)
        return q8 + (q8 < 127).to(q8.dtype), qs, k, v

    monkeypatch.setattr(wan_kernels, "qk_norm_rope_int8", off_by_one)
    fused_case = next(c for c in gpu_check.attention_int8_cases(check) if c.name.startswith("q fused"))
    assert fused_case.run()["status"] == "fail"
    monkeypatch.setattr(wan_kernels, "qk_norm_rope_int8", real_fused)

    real = wan_kernels.attention_int8

    def noisy(*args, impl="auto", **kw):
        out = real(*args, impl=impl, **kw)
        return out if impl == "ref" else out + out.float().std() * torch.randn_like(out.float()).to(out.dtype)

    real_ring = wan_kernels.attention_int8_quantized_lse

    def noisy_ring(*args, impl="auto", **kw):
        out, lse = real_ring(*args, impl=impl, **kw)
        return (out, lse) if impl == "ref" else (out + out.float().std() * torch.randn_like(out.float()).to(out.dtype),
                                                 lse)

    monkeypatch.setattr(wan_kernels, "attention_int8", noisy)
    monkeypatch.setattr(wan_kernels, "attention_int8_quantized_lse", noisy_ring)
    bad = {c.name: c.run() for c in gpu_check.attention_int8_cases(check)
           if not c.needs_cuda and not c.always and not c.name.startswith("q fused")}
    assert all(r["status"] == "fail" for r in bad.values()), bad

    ok = {"section": "attention_int8", "status": "ok"}
    fake = [{**ok, "case": "accuracy x pv=fp8"}, {**ok, "case": "long 163840 tokens pv=fp8"},
            {**ok, "case": "self-attn 14B 720p bf16", "ms": 10.0}, {**ok, "case": "self-attn 14B 720p int8-fp8", "ms": 4.0}]
    check.rows = fake
    verdict_case = next(c for c in gpu_check.attention_int8_cases(check) if c.always)
    assert verdict_case.run()["route_int8_default"] is True
    check.rows = fake[:3] + [{**fake[3], "ms": 6.0}]   # 1.67x: not enough
    assert verdict_case.run()["route_int8_default"] is False
    check.rows = [{**fake[0], "status": "fail"}] + fake[1:]
    assert verdict_case.run()["route_int8_default"] is False


def test_offload_section_asks_the_plan_for_the_blocks_it_runs():
    """The offload section puts its prediction beside each run: the budget it hands the cost model must give the
    plan exactly the blocks the run keeps on the device (all of them: nothing streamed)."""
    from wan_model import cost
    from wan_model.core.config import WanConfig

    cfg = WanConfig.from_preset("wan2.1-t2v-14b").replace(num_layers=gpu_check.OFFLOAD_LAYERS)
    c = cost.model_cost(cfg, 832, 480, 81, batch=2)
    for n in range(1, gpu_check.OFFLOAD_LAYERS + 1):
        plan = cost.offload_plan(c, "H100", gpu_check.offload_budget(c, n), prefetch=1, pcie_gbps=50.0)
        assert plan["blocks_on_device"] == n and plan["streamed"] == (0 if n == gpu_check.OFFLOAD_LAYERS
                                                                          else gpu_check.OFFLOAD_LAYERS - n + 1)
