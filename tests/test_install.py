"""Installing into a user's env: version ranges (checked at import, not pinned), diffusers as an optional extra
(`python -m wan_model demo` runs without it), CLI help that states units and defaults."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from wan_model.cli import _parser, main
from wan_model.testing import random_model
from wan_model.core.config import WanConfig
from wan_kernels import _versions as versions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.subprocess
def test_diffusers_older_than_supported_is_a_clear_import_error():
    """diffusers 0.33 (no WanAttention processors) fails at import with the range, not deep in a forward."""
    r = _python("import sys, types\n"
                "fake = types.ModuleType('diffusers'); fake.__version__ = '0.33.1'; sys.modules['diffusers'] = fake\n"
                "import wan_model.compat.diffusers")
    assert r.returncode != 0
    assert ("ImportError: wan-kernels needs diffusers >= 0.35 (tested up to 0.42.1); found diffusers 0.33.1"
            in r.stderr), r.stderr


@pytest.mark.parametrize("package, version", [("torch", "2.10.2+cu128"), ("triton", "3.5.1"),
                                              ("diffusers", "0.34.0")])
def test_older_than_supported_is_refused(package, version):
    lo, hi = versions.SUPPORTED[package]
    with pytest.raises(ImportError, match=rf"needs {package} >= {lo} \(tested up to {hi}\); found {package} "
                                          rf"{version.replace('+', '[+]')}"):
        versions.check(package, version)


def test_supported_range_and_newer_warns_once(monkeypatch, recwarn):
    monkeypatch.setattr(versions, "_warned", set())
    for v in ("2.11.0+cu130", "2.14.1", "2.14.1+cu130"):  # the GPU machines' and the pinned torch
        versions.check("torch", v)
    versions.check("triton", "3.6.0")
    assert not recwarn.list
    with pytest.warns(UserWarning, match=r"tested with torch 2.11 to 2.14.1; found 2.15.0 \(newer, untested\)"):
        versions.check("torch", "2.15.0")
    versions.check("torch", "2.15.0")
    assert not recwarn.list  # once per package


def test_pyproject_has_ranges_not_pins():
    """`pip install wan-kernels` keeps a supported torch: [project] dependencies are minimums, which the GPU
    machines' torch 2.11 / triton 3.6 and the pinned 2.14.1 / 3.8.0 satisfy; diffusers is the extra."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    deps = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    extra = {r.name: r.specifier for r in map(Requirement, project["optional-dependencies"]["diffusers"])}
    assert "diffusers" not in deps
    below = {"torch": "2.10.0", "triton": "3.5.0", "diffusers": "0.34.0"}
    for name, (lo, hi) in versions.SUPPORTED.items():
        spec = deps[name] if name in deps else extra[name]
        assert not any(s.operator == "==" for s in spec), (name, spec)
        assert spec.contains(lo) and spec.contains(hi) and not spec.contains(below[name]), (name, spec)


@pytest.mark.subprocess
def test_demo_runs_without_diffusers():
    r = _python("import sys; sys.modules['diffusers'] = None\n"
                "from wan_model.cli import main\n"
                "sys.exit(main(['demo', '--steps', '1', '--no-progress', '--frames', '1', '--height', '4', "
                "'--width', '4', '--text-len', '8']))")
    assert r.returncode == 0, r.stderr
    assert "mean" in r.stdout  # our model sampled
    assert "skipped: the comparison with diffusers' WanTransformer3DModel" in r.stdout
    assert "pip install 'wan-kernels[diffusers]'" in r.stdout


def _help(cmd: str) -> str:
    sub = next(a for a in _parser()._actions if a.dest == "cmd").choices[cmd]
    return " ".join(sub.format_help().split())


def test_cli_help_states_units_and_defaults():
    demo, run = _help("demo"), _help("run")
    assert "LATENT units" in demo
    assert "--height HEIGHT latent height, a multiple of the patch (2) (default: 16)" in demo
    assert "--frames FRAMES latent frames (default: 3)" in demo
    assert "VIDEO units (pixels, frames)" in run
    assert "--height HEIGHT video height in pixels, a multiple of 16 (default: 480)" in run
    assert "--frames FRAMES video frames, 4k + 1 (default: 81)" in run
    assert "without it they are random" in run
    assert "(default: None)" not in demo + run


def test_run_says_it_uses_random_embeddings(tmp_path, capsys):
    path = tmp_path / "t2v"
    random_model(WanConfig.from_preset("tiny-t2v"), seed=0).save_pretrained(path, format="diffusers")
    assert main(["run", "--checkpoint", str(path), "--device", "cpu", "--steps", "1", "--frames", "1",
                 "--height", "16", "--width", "16"]) == 0
    assert "no --embeds: using RANDOM prompt embeddings [1, 512, 64]" in capsys.readouterr().out
