"""`python -m wan_model`: every user error is one line naming the argument, exit 2 (1 for an unreadable
checkpoint), no traceback, found before any work starts; the commands still run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from wan_model.io import checkpoint as ckpt
from wan_model import cli, cost
from wan_model.io.checkpoint import parse_size
from wan_model.cli import main
from wan_model.testing import random_model
from wan_model.core.config import WanConfig
from wan_model.model import WanModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_RUN = ["--steps", "1", "--frames", "1", "--height", "16", "--width", "16"]


def _no_work(*args, **kw):
    raise AssertionError("work started before the arguments were checked")


@pytest.fixture
def no_work(monkeypatch):
    """Loading, saving, sampling and costing fail the test if reached."""
    for name in ("load_model", "convert_checkpoint", "sample", "random_model"):
        monkeypatch.setattr(cli, name, _no_work)
    for name in ("model_cost", "format_targets"):
        monkeypatch.setattr(cost, name, _no_work)


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "t2v"
    random_model(WanConfig.from_preset("tiny-t2v"), seed=0).save_pretrained(path, format="diffusers")
    return path


def _one_line_error(capsys, code: int, exc: SystemExit | int, prefix: str) -> str:
    """The command exited with `code` and wrote exactly one line to stderr, starting with `prefix`."""
    got = exc.code if isinstance(exc, SystemExit) else exc
    err = capsys.readouterr().err
    assert got == code, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0]


def _usage_error(capsys, argv: list[str], argument: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    cmd = argv[0]
    return _one_line_error(capsys, 2, e.value, f"python -m wan_model {cmd}: error: argument {argument}: ")


# ---------------------------------------------------------------------------------------------
# Usage errors: one line naming the argument, exit 2, checked before any work

RUN_ERRORS = [
    (["--steps", "0"], "--steps", "positive integer"),
    (["--steps", "-1"], "--steps", "positive integer"),
    (["--steps", "two"], "--steps", "integer"),
    (["--frames", "80"], "--frames", "4k + 1"),
    (["--frames", "0"], "--frames", "positive"),
    (["--height", "481"], "--height", "multiple of 16"),
    (["--width", "100"], "--width", "multiple of 16"),
    (["--batch", "0"], "--batch", "positive integer"),
    (["--guidance", "nan"], "--guidance", "finite"),
    (["--guidance", "inf"], "--guidance", "finite"),
    (["--shift", "0"], "--shift", "positive"),
    (["--shift", "-2"], "--shift", "positive"),
    (["--seed", "-1"], "--seed", "2**64"),
    (["--seed", str(2**64)], "--seed", "2**64"),
    (["--dtype", "int8"], "--dtype", "invalid choice"),
    (["--impl", "fast"], "--impl", "invalid choice"),
    (["--impl", "cuda", "--device", "cpu"], "--impl", "runs CUDA tensors"),
    (["--device", "tpu"], "--device", "'cpu', 'cuda'"),
    (["--device", "cuda:99"], "--device", "cuda:99"),
    (["--embeds", "{missing}"], "--embeds", "no such file"),
    (["--embeds", "{tmp}"], "--embeds", "not a regular file"),
    (["--output", "{missing}/latents.safetensors"], "--output", "does not exist"),
    (["--output", "{tmp}"], "--output", "is a directory"),
    # issue 27: a bad LoRA scale names the scale ("F:abc" was "no such file"); nan/inf/out of fp32 refused
    (["--lora", "{lora}:abc"], "--lora", "the scale after ':' is not a number, got 'abc'"),
    (["--lora", "{lora}:nan"], "--lora", "must be finite in fp32"),
    (["--lora", "{lora}:inf"], "--lora", "must be finite in fp32"),
    (["--lora", "{lora}:-1e39"], "--lora", "must be finite in fp32"),
    (["--lora", "{missing}:0.5"], "--lora", "no such file"),
    (["--ulysses", "2", "--dist-timeout", "0"], "--dist-timeout", "positive"),
]


@pytest.mark.parametrize("extra, argument, why", RUN_ERRORS, ids=[" ".join(c[0]) for c in RUN_ERRORS])
def test_run_usage_errors(extra, argument, why, tmp_path, capsys, no_work):
    (tmp_path / "lora.safetensors").write_bytes(b"")
    extra = [a.format(missing=tmp_path / "missing", tmp=tmp_path, lora=tmp_path / "lora.safetensors") for a in extra]
    line = _usage_error(capsys, ["run", "--checkpoint", str(tmp_path)] + extra, argument)
    assert why in line, line


def test_run_missing_checkpoint(tmp_path, capsys, no_work):
    line = _usage_error(capsys, ["run", "--checkpoint", str(tmp_path / "nope")], "--checkpoint")
    assert "no such file or directory" in line and "nope" in line


def test_run_impl_triton_on_cpu_names_the_device(tmp_path, capsys, no_work, monkeypatch):
    """Was "wan::qkv_rope with impl='triton' on meta" from inside the loader."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    line = _usage_error(capsys, ["run", "--checkpoint", str(tmp_path), "--impl", "triton", "--device", "cpu"],
                        "--impl")
    assert "on cpu" in line and "meta" not in line, line


def test_run_output_exists_needs_overwrite(tmp_path, capsys, no_work):
    out = tmp_path / "latents.safetensors"
    out.write_bytes(b"mine")
    line = _usage_error(capsys, ["run", "--checkpoint", str(tmp_path), "--output", str(out)], "--output")
    assert "--overwrite" in line
    assert out.read_bytes() == b"mine"


@pytest.mark.parametrize("tensors, why", [
    ({"prompt_embeds": torch.zeros(1, 4, 8)}, "no tensor 'negative_prompt_embeds'"),
    ({"prompt_embeds": torch.zeros(1, 4, 8, dtype=torch.int32),
      "negative_prompt_embeds": torch.zeros(1, 4, 8)}, "floating point"),
    (None, "cannot read"),
])
def test_run_bad_embeds_file(tensors, why, tmp_path, capsys, no_work):
    path = tmp_path / "embeds.safetensors"
    if tensors is None:
        path.write_bytes(b"not a safetensors file")
    else:
        save_file(tensors, path)
    line = _usage_error(capsys, ["run", "--checkpoint", str(tmp_path), "--embeds", str(path)], "--embeds")
    assert why in line, line


CONVERT_ERRORS = [
    (["{missing}", "{tmp}/out"], "src", "no such file"),
    (["{tmp}", "{missing}/out"], "dst", "does not exist"),
    (["{tmp}", "{tmp}"], "dst", "is the source checkpoint"),
    (["{tmp}", "{tmp}/out", "--max-shard-size", "0"], "--max-shard-size", "at least 1 byte"),
    (["{tmp}", "{tmp}/out", "--max-shard-size", "-5"], "--max-shard-size", "must be positive, got '-5'"),
    # issue 27: "-5GB" was taken for an option ("expected one argument")
    (["{tmp}", "{tmp}/out", "--max-shard-size", "-5GB"], "--max-shard-size", "must be positive, got '-5GB'"),
    (["{tmp}", "{tmp}/out", "--max-shard-size=-5GB"], "--max-shard-size", "must be positive, got '-5GB'"),
    (["{tmp}", "{tmp}/out", "--max-shard-size", "-.5MB"], "--max-shard-size", "must be positive, got '-.5MB'"),
    (["{tmp}", "{tmp}/out", "--max-shard-size", "lots"], "--max-shard-size", "cannot parse"),
    (["{tmp}", "{tmp}/out", "--format", "pickle"], "--format", "invalid choice"),
    (["{tmp}", "{tmp}/out", "--dtype", "fp8"], "--dtype", "invalid choice"),
    (["{tmp}", "{tmp}/out", "--quantize", "int4"], "--quantize", "invalid choice"),
    (["{tmp}", "{tmp}/out", "--keep", "blocks.*"], "--keep", "needs --quantize nvfp4"),
]


@pytest.mark.parametrize("argv, argument, why", CONVERT_ERRORS,
                         ids=[" ".join(c[0][2:]) or c[1] for c in CONVERT_ERRORS])
def test_convert_usage_errors(argv, argument, why, tmp_path, capsys, no_work):
    argv = [a.format(missing=tmp_path / "missing", tmp=tmp_path) for a in argv]
    if "--format" not in argv:
        argv += ["--format", "diffusers"]
    line = _usage_error(capsys, ["convert"] + argv, argument)
    assert why in line, line


COST_ERRORS = [
    (["--size", "1280"], "--size", "WIDTHxHEIGHT"),
    (["--size", "0x720"], "--size", "WIDTHxHEIGHT"),
    (["--size", "1281x720"], "--size", "multiple of 16x16"),
    (["--preset", "wan2.2-ti2v-5b", "--size", "1280x720"], "--size", "multiple of 32x32"),
    (["--frames", "80"], "--frames", "4k + 1"),
    (["--steps", "0"], "--steps", "positive integer"),
    (["--batch", "0"], "--batch", "positive integer"),
    (["--preset", "wan3"], "--preset", "invalid choice"),
    (["--weights", "int4"], "--weights", "invalid choice"),
    (["--targets", "--target-presets", "wan3"], "--target-presets", "invalid choice"),
    (["--target-presets", "wan2.1-t2v-14b"], "--target-presets", "needs --targets"),
    (["--plot", "{missing}/cost.png"], "--plot", "does not exist"),
]


@pytest.mark.parametrize("extra, argument, why", COST_ERRORS, ids=[" ".join(c[0]) for c in COST_ERRORS])
def test_cost_usage_errors(extra, argument, why, tmp_path, capsys, no_work):
    extra = [a.format(missing=tmp_path / "missing") for a in extra]
    line = _usage_error(capsys, ["cost"] + extra, argument)
    assert why in line, line


DEMO_ERRORS = [
    (["--steps", "0"], "--steps", "positive integer"),
    (["--batch", "0"], "--batch", "positive integer"),
    (["--frames", "0"], "--frames", "positive integer"),
    (["--height", "15"], "--height", "multiple of the patch size 2"),
    (["--width", "7"], "--width", "multiple of the patch size 2"),
    (["--text-len", "0"], "--text-len", "positive integer"),
    (["--guidance", "nan"], "--guidance", "finite"),
    (["--shift", "inf"], "--shift", "finite"),
    (["--preset", "tiny-i2v"], "--preset", "invalid choice"),
    (["--impl", "cuda"], "--impl", "runs CUDA tensors"),
]


@pytest.mark.parametrize("extra, argument, why", DEMO_ERRORS, ids=[" ".join(c[0]) for c in DEMO_ERRORS])
def test_demo_usage_errors(extra, argument, why, capsys, no_work):
    line = _usage_error(capsys, ["demo"] + extra, argument)
    assert why in line, line


def test_missing_subcommand_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    _one_line_error(capsys, 2, e.value, "python -m wan_model: error: ")


# ---------------------------------------------------------------------------------------------
# Errors found once the checkpoint is read: one line, no traceback, before sampling

def test_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    for argv in (["run", "--checkpoint", str(bad), "--device", "cpu"],
                 ["convert", str(bad), str(tmp_path / "out"), "--format", "diffusers"]):
        line = _one_line_error(capsys, 1, main(argv), f"python -m wan_model {argv[0]}: error: ")
        assert str(bad) in line, line
    assert not (tmp_path / "out").exists()


def test_not_a_checkpoint_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    line = _one_line_error(capsys, 1, main(["run", "--checkpoint", str(tmp_path), "--device", "cpu"]),
                           "python -m wan_model run: error: ")
    assert str(tmp_path) in line, line


def test_run_checks_against_the_checkpoint_before_sampling(tmp_path, capsys, monkeypatch):
    """TI2V needs 32-pixel multiples, embeddings must match batch and width: refused before sampling."""
    monkeypatch.setattr(cli, "sample", _no_work)
    ti2v = tmp_path / "ti2v"
    random_model(WanConfig.from_preset("tiny-ti2v"), seed=0).save_pretrained(ti2v, format="diffusers")
    argv = ["run", "--checkpoint", str(ti2v), "--device", "cpu", "--height", "48", "--width", "64"]
    line = _usage_error(capsys, argv, "--height")
    assert "multiple of 32" in line, line
    text_dim = WanConfig.from_preset("tiny-ti2v").text_dim
    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": torch.zeros(2, 5, text_dim), "negative_prompt_embeds": torch.zeros(2, 5, text_dim)},
              embeds)
    line = _usage_error(capsys, ["run", "--checkpoint", str(ti2v), "--device", "cpu", "--embeds", str(embeds),
                                 "--height", "64", "--width", "64"], "--embeds")
    assert "(2, 5" in line and "batch 1" in line, line


# ---------------------------------------------------------------------------------------------
# The commands run, with the flags that failed before

def test_run_named_impl_and_output(t2v_dir, tmp_path, capsys):
    """--impl cpu loads (was "impl='cpu' on meta"); --output is written once, replaced with --overwrite."""
    out = tmp_path / "latents.safetensors"
    argv = ["run", "--checkpoint", str(t2v_dir), "--device", "cpu", "--dtype", "float32", "--impl", "cpu",
            "--output", str(out)] + SMALL_RUN
    assert main(argv) == 0
    first = load_file(out)["latents"]
    assert first.shape == (1, 16, 1, 2, 2) and torch.isfinite(first).all()
    capsys.readouterr()
    _usage_error(capsys, argv, "--output")
    assert torch.equal(load_file(out)["latents"], first)
    assert main(argv + ["--overwrite", "--impl", "ref"]) == 0
    torch.testing.assert_close(load_file(out)["latents"], first, rtol=1e-4, atol=1e-4)


def test_run_with_embeds(t2v_dir, tmp_path):
    text_dim = WanConfig.from_preset("tiny-t2v").text_dim
    g = torch.Generator().manual_seed(0)
    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": torch.randn(1, 7, text_dim, generator=g),
               "negative_prompt_embeds": torch.randn(1, 7, text_dim, generator=g)}, embeds)
    assert main(["run", "--checkpoint", str(t2v_dir), "--device", "cpu", "--embeds", str(embeds)] + SMALL_RUN) == 0


@pytest.mark.slow
def test_demo_runs(capsys):
    assert main(["demo", "--steps", "2", "--frames", "2", "--height", "8", "--width", "12",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "routing" in out and "qkv_rope" in out and "ms/step" in out
    diff = float(out.split("max |ours - diffusers| over the final latents: ")[1].split()[0])
    assert diff <= 1e-4


@pytest.mark.slow
def test_demo_named_impl(capsys):
    """--impl cpu (was "impl='cpu' on meta"): same result as diffusers."""
    assert main(["demo", "--impl", "cpu", "--steps", "1", "--frames", "1", "--height", "4", "--width", "4",
                 "--text-len", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert float(out.split("max |ours - diffusers| over the final latents: ")[1].split()[0]) <= 1e-4


def test_parse_size():
    assert parse_size("1000000") == 1000000 and parse_size(" 1000000 ") == 1000000
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200mb") == 200 * 10**6 and parse_size("0.5KB") == 500
    assert parse_size(12345) == 12345
    for bad in ("0", "0KB", "0.0001KB", 0, -1, "-5", "", "lots", "5 GiB", True, 1.5, None):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


def test_convert_plain_byte_shard_size(t2v_dir, tmp_path, capsys):
    out = tmp_path / "sharded"
    assert main(["convert", str(t2v_dir), str(out), "--format", "diffusers", "--max-shard-size", "1000000"]) == 0
    shards = sorted(out.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 2 and (out / ckpt.INDEX_NAME).exists()
    for s in shards:  # at most 1000000 bytes, or one tensor larger than that
        tensors = load_file(s)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 1000000, s
    ref = WanModel.from_pretrained(t2v_dir, dtype=torch.float32).state_dict()
    got = WanModel.from_pretrained(out, dtype=torch.float32).state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.items())


def test_convert_passes_overwrite(tmp_path, monkeypatch, capsys):
    seen = []

    def fake(src, dst, format, **kw):
        seen.append(kw["overwrite"])
        return WanConfig.from_preset("tiny-t2v")

    monkeypatch.setattr(cli, "convert_checkpoint", fake)
    argv = ["convert", str(tmp_path), str(tmp_path / "out"), "--format", "diffusers"]
    assert main(argv) == 0 and main(argv + ["--overwrite"]) == 0
    assert seen == [False, True]


def test_convert_into_a_user_directory_needs_overwrite(t2v_dir, tmp_path, capsys):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    argv = ["convert", str(t2v_dir), str(dst), "--format", "diffusers"]
    _one_line_error(capsys, 1, main(argv), "python -m wan_model convert: error: ")
    assert sorted(os.listdir(dst)) == ["notes.txt"]
    assert main(argv + ["--overwrite"]) == 0
    assert (dst / "notes.txt").read_text() == "keep me" and (dst / ckpt.WEIGHTS_NAME).exists()


# ---------------------------------------------------------------------------------------------
# End to end: no traceback from `python -m wan_model`

@pytest.mark.subprocess
@pytest.mark.parametrize("argv, code, argument", [
    (["run", "--checkpoint", "{tmp}/missing", "--steps", "0"], 2, "argument --checkpoint"),
    (["convert", "{tmp}/bad.safetensors", "{tmp}/out", "--format", "diffusers"], 1, "bad.safetensors"),
])
def test_module_entry_point_no_traceback(argv, code, argument, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    argv = [a.format(tmp=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, "-m", "wan_model"] + argv, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == code, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and argument in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""


# ---------------------------------------------------------------------------------------------
# Issue 27: --keep, --output, a launcher without degrees

def test_convert_keep_typo_is_an_error_naming_the_pattern(t2v_dir, tmp_path, capsys):
    """A --keep pattern matching no layer was accepted (and replaced the default keep list)."""
    out = tmp_path / "q"
    line = _usage_error(capsys, ["convert", str(t2v_dir), str(out), "--format", "diffusers", "--quantize", "fp8",
                                 "--keep", "blocks.0.fnn.*"], "--keep")
    assert "'blocks.0.fnn.*' matches no layer" in line, line
    assert not out.exists()


def test_convert_keep_adds_to_the_default_keep_list(t2v_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["convert", str(t2v_dir), str(out), "--format", "diffusers", "--quantize", "fp8",
                 "--keep", "blocks.0.ffn.*", "--no-progress"]) == 0
    sd = load_file(out / ckpt.WEIGHTS_NAME)
    fp8 = {k.removesuffix(".weight") for k, v in sd.items() if v.dtype == torch.float8_e4m3fn}
    assert "blocks.1.ffn.net.0.proj" in fp8 and "blocks.0.attn1.to_q" in fp8
    kept = ["blocks.0.ffn.net.0.proj", "blocks.0.ffn.net.2", "proj_out", "condition_embedder.text_embedder.linear_1",
            "condition_embedder.text_embedder.linear_2"]
    assert not fp8 & set(kept), sorted(fp8 & set(kept))


def test_run_output_is_written_atomically(t2v_dir, tmp_path, capsys, monkeypatch):
    """--output --overwrite: a write that dies midway (as under a kill) leaves the old file whole, no debris."""
    import safetensors.torch

    out = tmp_path / "latents.safetensors"
    out.write_bytes(b"old latents")

    def dies(tensors, path, *a, **kw):
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    with pytest.raises(RuntimeError, match="killed while writing"):
        main(["run", "--checkpoint", str(t2v_dir), "--device", "cpu", "--output", str(out), "--overwrite"] + SMALL_RUN)
    assert out.read_bytes() == b"old latents"
    assert sorted(os.listdir(tmp_path)) == ["latents.safetensors"]


def test_run_under_a_launcher_without_degrees_is_refused(t2v_dir, tmp_path, capsys, monkeypatch, no_work):
    """torchrun --nproc-per-node 2 without --ulysses/--ring: every rank ran the whole job and wrote --output."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    line = _usage_error(capsys, ["run", "--checkpoint", str(t2v_dir), "--output", str(tmp_path / "x.safetensors")],
                        "--ulysses/--ring")
    assert "WORLD_SIZE=2" in line and "= 1" in line, line


def test_run_refuses_frames_the_checkpoint_patch_would_crop(tmp_path, capsys, monkeypatch):
    """A checkpoint whose temporal patch is 2: 5 video frames = 2 latent frames pass, 9 (3 latent) are refused
    before sampling (the patch embedding would drop the third)."""
    monkeypatch.setattr(cli, "sample", _no_work)
    path = tmp_path / "pt2"
    random_model(WanConfig.from_preset("tiny-t2v").replace(patch_size=(2, 2, 2)), seed=0).save_pretrained(path)
    line = _usage_error(capsys, ["run", "--checkpoint", str(path), "--device", "cpu", "--frames", "9", "--height",
                                 "16", "--width", "16"], "--frames")
    assert "3 latent frames" in line and "patch 2" in line, line
