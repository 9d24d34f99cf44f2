"""Saving never destroys a user's files (wan_model.io._atomic): refusals, overwrite=True keeping other files,
re-saves of our own checkpoints, modes under the umask, stale staging dirs, failed saves, SIGKILLed saves."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import time

import pytest
import torch

from wan_model.io import _atomic
from wan_model.io import checkpoint as ckpt
from wan_model.io import formats
from wan_model.io.checkpoint import WanExperts, load_model, native_to_diffusers
from wan_model.io.convert import convert_checkpoint
from wan_model.cli import main as cli_main
from wan_model.testing import random_model
from wan_model.core.config import WanConfig

CFG = WanConfig.from_preset("tiny-t2v")  # 2.1M params, 8.4 MB in fp32
MANY, FEW = "700KB", "2MB"  # shard sizes: 15 and 5 shards
USER_FILES = {"notes.txt": b"my notes\n", "README.md": b"# mine\n", ".git/HEAD": b"ref: refs/heads/main\n",
              "sub/data.bin": bytes(range(256))}


@pytest.fixture(scope="module")
def models():
    return {seed: random_model(CFG, seed=seed) for seed in (1, 2)}


@pytest.fixture(scope="module")
def ref(models, tmp_path_factory):
    """ref(seed, max_shard_size) -> snapshot of that model saved to a fresh directory."""
    root, cache = tmp_path_factory.mktemp("ref"), {}

    def get(seed: int, shard: str = "5GB") -> dict:
        if (seed, shard) not in cache:
            models[seed].save_pretrained(root / f"{seed}-{shard}", max_shard_size=shard)
            cache[seed, shard] = _snapshot(root / f"{seed}-{shard}")
        return cache[seed, shard]

    return get


def _snapshot(root) -> dict:
    """{relative path: bytes (file), None (directory) or "-> target" (symlink)} of everything under
    `root`, hidden entries too."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p, rel = os.path.join(d, n), os.path.relpath(os.path.join(d, n), root)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            elif n in dirs:
                out[rel] = None
            else:
                with open(p, "rb") as f:
                    out[rel] = f.read()
    return out


def _temps(*dirs) -> list[str]:
    return [os.path.join(d, n) for d in dirs if os.path.isdir(d) for n in os.listdir(d) if ".tmp-" in n]


def _user_files(root) -> None:
    for rel, data in USER_FILES.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)


def _ours(snapshot: dict) -> dict:
    """The checkpoint part of a snapshot: without USER_FILES and their directories."""
    user = set(USER_FILES) | {os.path.dirname(k) for k in USER_FILES}
    return {k: v for k, v in snapshot.items() if k not in user}


def _same_weights(path, model) -> None:
    loaded = load_model(path, dtype=torch.float32, impl="ref")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def _staging(path, text: bytes = _atomic.MARKER_TEXT):
    """A staging directory as a killed save leaves it: MARKER, and a partial shard."""
    os.makedirs(os.path.join(path, "new"))
    with open(os.path.join(path, _atomic.MARKER), "wb") as f:
        f.write(text)
    with open(os.path.join(path, "new", ckpt.WEIGHTS_NAME), "wb") as f:
        f.write(b"\0" * 100)
    return path


# ---------------------------------------------------------------------------------------------
# policy

def test_dir_with_user_files_refused_and_untouched(models, tmp_path):
    dst = tmp_path / "ckpt"
    _user_files(dst)
    models[1].save_pretrained(tmp_path / "src")
    models[1].save_pretrained(tmp_path / "mine")
    (tmp_path / "mine" / "notes.txt").write_bytes(b"mine")
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "config.json").write_text("{}")
    before = _snapshot(tmp_path)
    pattern = (r"ckpt already holds files that are not a checkpoint written here "
               r"\(\.git, README\.md, notes\.txt, sub\).*overwrite=True")
    with pytest.raises(FileExistsError, match=pattern):
        models[1].save_pretrained(dst)
    with pytest.raises(FileExistsError, match=pattern):
        ckpt.save_model(WanExperts(models[1], models[2], 0.875), dst)
    for quantize in (None, "nvfp4"):  # refused before the source is read
        with pytest.raises(FileExistsError, match=pattern):
            convert_checkpoint(tmp_path / "src", dst, "diffusers", quantize=quantize, progress=False)
    # a checkpoint of ours plus one user file, or a lone config.json, is not "only ours" either
    with pytest.raises(FileExistsError, match=r"mine already holds .*\(notes\.txt\)"):
        models[2].save_pretrained(tmp_path / "mine")
    with pytest.raises(FileExistsError, match=r"lone already holds .*\(config\.json\)"):
        models[2].save_pretrained(tmp_path / "lone")
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_only_our_files(models, ref, tmp_path):
    dst = tmp_path / "ckpt"
    models[1].save_pretrained(dst, max_shard_size=MANY)
    _user_files(dst)
    models[2].save_pretrained(dst, overwrite=True)  # 15 shards + index -> one file: none of the old is left
    snap = _snapshot(dst)
    assert {k: snap[k] for k in USER_FILES} == USER_FILES
    assert _ours(snap) == ref(2)
    assert _temps(tmp_path, dst) == []
    _same_weights(dst, models[2])
    # two experts: transformer/ + transformer_2/ + model_index.json join the user's files
    pair = tmp_path / "pair"
    _user_files(pair)
    ckpt.save_model(WanExperts(models[1], models[2], 0.875), pair, overwrite=True)
    assert {k: v for k, v in _snapshot(pair).items() if k in USER_FILES} == USER_FILES
    assert isinstance(load_model(pair, dtype=torch.float32, impl="ref"), WanExperts)
    assert _snapshot(pair / "transformer") == ref(1) and _snapshot(pair / "transformer_2") == ref(2)


def test_resave_own_checkpoint_allowed_no_stale_shards(models, ref, tmp_path):
    """Policy: a directory that holds nothing but a checkpoint of ours (or nothing) is replaced without
    overwrite=True, and replaced whole: shards of another shard count do not survive."""
    dst = tmp_path / "ckpt"
    dst.mkdir()  # an empty directory is allowed
    for seed, shard in ((1, MANY), (2, FEW), (1, "5GB"), (2, MANY)):
        models[seed].save_pretrained(dst, max_shard_size=shard)
        assert _snapshot(dst) == ref(seed, shard), (seed, shard)
        assert _temps(tmp_path, dst) == []
    _same_weights(dst, models[2])
    pair, experts = tmp_path / "pair", WanExperts(models[1], models[2], 0.875)
    ckpt.save_model(experts, pair, max_shard_size=MANY)
    ckpt.save_model(WanExperts(models[2], models[1], 0.9), pair)
    assert _snapshot(pair / "transformer") == ref(2) and _snapshot(pair / "transformer_2") == ref(1)
    # a pipeline dir is not a single-model checkpoint and the other way round
    with pytest.raises(FileExistsError, match=r"model_index\.json, transformer, transformer_2"):
        models[1].save_pretrained(pair)
    with pytest.raises(FileExistsError, match=r"config\.json, diffusion_pytorch_model-00001-of-00015"):
        ckpt.save_model(experts, dst)


def test_wrong_kind_of_destination_refused(models, tmp_path):
    file = tmp_path / "file.safetensors"
    file.write_bytes(b"not a directory")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x").write_bytes(b"x")
    before = _snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(NotADirectoryError, match=r"file\.safetensors exists and is not a directory"):
            models[1].save_pretrained(file, overwrite=overwrite)
        for fmt in ("original", "comfyui"):
            with pytest.raises(IsADirectoryError, match=r"dir is a directory; this format saves one file"):
                models[1].save_pretrained(tmp_path / "dir", format=fmt, overwrite=overwrite)
    with pytest.raises(FileExistsError, match=r"file\.safetensors already exists; refusing to replace.*overwrite=True"):
        models[1].save_pretrained(file, format="original")
    assert _snapshot(tmp_path) == before
    models[2].save_pretrained(file, format="original", overwrite=True)
    _same_weights(file, models[2])
    assert sorted(os.listdir(tmp_path)) == ["dir", "file.safetensors"]


def test_convert_into_cwd_refused(models, tmp_path, monkeypatch):
    models[1].save_pretrained(tmp_path / "src")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_bytes(b"mine")
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"work already holds files .*\(notes\.txt\)"):
        convert_checkpoint(tmp_path / "src", ".", "diffusers")
    try:  # the CLI reports it (an exception or a non-zero exit), never wipes "."
        rc = cli_main(["convert", str(tmp_path / "src"), ".", "--format", "diffusers"])
    except FileExistsError:
        rc = None
    assert rc != 0 and _snapshot(tmp_path) == before
    convert_checkpoint(tmp_path / "src", ".", "diffusers", overwrite=True)
    assert (work / "notes.txt").read_bytes() == b"mine" and _snapshot(work).keys() == {"notes.txt", "config.json",
                                                                                       ckpt.WEIGHTS_NAME}
    _same_weights(work, models[1])


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_modes_follow_umask(models, tmp_path, umask):
    mixed = tmp_path / "mixed"
    mixed.mkdir(mode=0o700)
    (mixed / "notes.txt").write_bytes(b"mine")
    old = os.umask(umask)
    try:
        models[1].save_pretrained(tmp_path / "dir", max_shard_size=FEW)
        models[1].save_pretrained(tmp_path / "dir", max_shard_size=MANY)  # replaced
        models[1].save_pretrained(tmp_path / "one.safetensors", format="original")
        models[1].save_pretrained(tmp_path / "one.safetensors", format="original", overwrite=True)
        ckpt.save_model(WanExperts(models[1], models[2], 0.875), tmp_path / "pair")
        models[1].save_pretrained(mixed, overwrite=True)
        convert_checkpoint(tmp_path / "dir", tmp_path / "q", "diffusers", quantize="nvfp4", progress=False)
    finally:
        os.umask(old)
    dirs = [tmp_path / d for d in ("dir", "pair", "pair/transformer", "pair/transformer_2", "q")]
    files = [p for d in dirs for p in d.iterdir() if p.is_file()]
    files += [tmp_path / "one.safetensors", mixed / "config.json", mixed / ckpt.WEIGHTS_NAME]
    assert len(files) == 17 + 5 + 2 + 1 + 2, files  # dir (15 shards), pair, q, one, mixed
    assert {p: os.stat(p).st_mode & 0o7777 for p in dirs} == {p: 0o777 & ~umask for p in dirs}
    assert {p: os.stat(p).st_mode & 0o7777 for p in files} == {p: 0o666 & ~umask for p in files}
    assert os.stat(mixed).st_mode & 0o7777 == 0o700  # the user's directory keeps its mode


# ---------------------------------------------------------------------------------------------
# stale staging dirs, failed saves

def test_stale_staging_removed_lookalikes_kept(models, ref, tmp_path):
    dst = tmp_path / "ckpt"
    models[1].save_pretrained(dst)
    stale = _staging(tmp_path / ".ckpt.tmp-k1ll3d00")
    (tmp_path / ".ckpt.tmp-k1ll3d01").mkdir()  # killed right after mkdtemp
    (tmp_path / ".ckpt.tmp-k1ll3d02").mkdir()  # killed while writing the marker
    (tmp_path / ".ckpt.tmp-k1ll3d02" / _atomic.MARKER).write_bytes(_atomic.MARKER_TEXT[:9])
    live = _staging(tmp_path / ".ckpt.tmp-running0")
    lock = os.open(live / _atomic.MARKER, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a save running in another process holds this
    _staging(tmp_path / ".ckpt.tmp-bad", b"something else\n")
    _staging(tmp_path / ".other.tmp-k1ll3d00")  # another destination's
    (tmp_path / ".ckpt.tmp-foo").mkdir()
    (tmp_path / ".ckpt.tmp-foo" / "data").write_bytes(b"user data")
    (tmp_path / ".ckpt.tmp-file").write_bytes(b"a file")
    (tmp_path / ".ckpt.tmp-link").symlink_to(stale)
    keep = {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith((".ckpt.tmp-k1ll3d", "ckpt"))}
    try:
        models[2].save_pretrained(dst)
    finally:
        os.close(lock)
    assert not any(".ckpt.tmp-k1ll3d" in n for n in os.listdir(tmp_path))
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("ckpt")} == keep
    assert _snapshot(dst) == ref(2)
    # inside a directory with user files (where an overwrite=True save stages)
    mixed = tmp_path / "mixed"
    _user_files(mixed)
    _staging(mixed / ".mixed.tmp-k1ll3d00")
    (mixed / ".mixed.tmp-foo").mkdir()
    (mixed / ".mixed.tmp-foo" / "x").write_bytes(b"x")
    models[1].save_pretrained(mixed, overwrite=True)
    assert sorted(n for n in os.listdir(mixed) if ".tmp-" in n) == [".mixed.tmp-foo"]


@pytest.fixture
def save_file(monkeypatch):
    """save_file(fail_at, on_call): patch the one writer's write_safetensors (wan_model.io.formats) to raise
    OSError on its `fail_at`-th call (earlier calls write normally) and to run `on_call()` on each call."""
    real = formats.write_safetensors

    def patch(fail_at: int, on_call=None):
        calls = []

        def run(path, plan, tensors, metadata):
            calls.append(path)
            if on_call is not None:
                on_call()
            if len(calls) == fail_at:
                raise OSError("disk full")
            return real(path, plan, tensors, metadata)

        monkeypatch.setattr(formats, "write_safetensors", run)

    return patch


@pytest.mark.parametrize("dest", ["absent", "ours", "user files", "file"])
def test_exception_mid_save_leaves_destination_as_it_was(models, tmp_path, save_file, dest):
    dst = tmp_path / ("ckpt.safetensors" if dest == "file" else "ckpt")
    fmt = "original" if dest == "file" else "diffusers"
    if dest != "absent":
        models[1].save_pretrained(dst, format=fmt, max_shard_size=FEW)
    if dest == "user files":
        _user_files(dst)
    before = _snapshot(tmp_path)
    save_file(1 if dest == "file" else 2)  # diffusers: the 2nd shard fails after the 1st was written
    with pytest.raises(OSError, match="disk full"):
        models[2].save_pretrained(dst, format=fmt, max_shard_size=MANY, overwrite=dest != "ours")
    assert _snapshot(tmp_path) == before


def test_failure_while_renaming_into_place_is_rolled_back(models, tmp_path, monkeypatch):
    dst = tmp_path / "ckpt"
    models[1].save_pretrained(dst, max_shard_size=FEW)
    _user_files(dst)
    before = _snapshot(tmp_path)
    n_old = len(os.listdir(dst)) - 4  # config.json, index, 5 shards; not the 4 user entries
    real, calls = _atomic._rename_noreplace, []

    def rename(src, target):  # the old entries move aside, the 1st new one moves in, the 2nd fails
        calls.append(target)
        if len(calls) == n_old + 2:
            raise OSError("I/O error")
        real(src, target)

    monkeypatch.setattr(_atomic, "_rename_noreplace", rename)
    with pytest.raises(OSError, match="I/O error"):
        models[2].save_pretrained(dst, max_shard_size=MANY, overwrite=True)
    assert n_old == 7 and os.path.dirname(calls[-1]) == str(dst) and _snapshot(tmp_path) == before


def test_files_added_during_the_save_are_kept(models, ref, tmp_path, save_file, monkeypatch):
    dst = tmp_path / "ckpt"
    models[1].save_pretrained(dst)
    late = dst / "late.txt"
    save_file(0, lambda: late.write_bytes(b"written while saving"))
    before = {**_snapshot(tmp_path), "ckpt/late.txt": b"written while saving"}
    with pytest.raises(FileExistsError, match=r"ckpt already holds files .*\(late\.txt\)"):
        models[2].save_pretrained(dst)
    assert _snapshot(tmp_path) == before
    late.unlink()
    models[2].save_pretrained(dst, overwrite=True)  # now merged: late.txt stays
    assert _snapshot(dst) == {**ref(2), "late.txt": b"written while saving"}
    # a file created between the last check and the directory swap is found in the detached old
    # directory, which is swapped back
    late.unlink()
    monkeypatch.undo()
    real = _atomic._rename2

    def rename2(src, target, flags):
        if flags == _atomic._RENAME_EXCHANGE and not (dst / "race.txt").exists():
            (dst / "race.txt").write_bytes(b"race")
        return real(src, target, flags)

    monkeypatch.setattr(_atomic, "_rename2", rename2)
    with pytest.raises(FileExistsError, match=r"race\.txt appeared during the save; nothing was changed"):
        models[1].save_pretrained(dst)
    assert _snapshot(dst) == {**ref(2), "race.txt": b"race"}
    assert _temps(tmp_path, dst) == []


def test_without_renameat2(models, ref, tmp_path, monkeypatch):
    """Where the libc or filesystem lacks renameat2 a re-save merges (case 3 of wan_model.io._atomic)."""
    monkeypatch.setattr(_atomic, "_renameat2", lambda: None)
    dst = tmp_path / "ckpt"
    models[1].save_pretrained(dst, max_shard_size=MANY)
    models[2].save_pretrained(dst, max_shard_size=FEW)
    assert _snapshot(dst) == ref(2, FEW) and _temps(tmp_path, dst) == []
    one = tmp_path / "one.safetensors"
    models[1].save_pretrained(one, format="original")
    with pytest.raises(FileExistsError, match="one.safetensors already exists"):
        models[2].save_pretrained(one, format="original")
    models[2].save_pretrained(one, format="original", overwrite=True)
    _same_weights(one, models[2])
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "one.safetensors"]


# ---------------------------------------------------------------------------------------------
# SIGKILL at random points

def _killed_save(sd, dst, shard: str, overwrite: bool, delay: float | None) -> bool:
    """Save `sd` at `dst` in a forked child, SIGKILLed after `delay` s (None: let it finish).
    True if the kill came before the save finished. (fork, not a new interpreter: importing torch takes
    seconds here; the child runs no torch kernels, only safetensors and file system calls.)"""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ckpt.save_state_dict(sd, CFG, dst, max_shard_size=shard, overwrite=overwrite)
            code = 0
        finally:
            os._exit(code)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0
    return os.WIFSIGNALED(status)


@pytest.mark.subprocess
@pytest.mark.parametrize("dest", ["ours", "user files"])
def test_sigkill_leaves_old_or_new(models, ref, tmp_path, dest):
    """Kills spread over a save's run time; after each, `dst` holds exactly the old or the new checkpoint
    (with user files, overwrite=True: or, during the last renames, no config.json: never a loadable mix),
    and the next save removes the killed one's staging dir."""
    sds = {seed: {k: v.contiguous() for k, v in native_to_diffusers(dict(models[seed].state_dict()), CFG).items()}
           for seed in (1, 2)}
    old, new = ref(1, FEW), ref(2, MANY)
    dst, user = tmp_path / "ckpt", dest == "user files"
    if user:
        _user_files(dst)

    def reset():
        ckpt.save_state_dict(sds[1], CFG, dst, max_shard_size=FEW, overwrite=user)
        snap = _snapshot(dst)
        assert _ours(snap) == old and _temps(tmp_path, dst) == []
        assert not user or {k: snap[k] for k in USER_FILES} == USER_FILES

    reset()
    t0 = time.perf_counter()
    _killed_save(sds[2], dst, MANY, user, None)
    run_time = time.perf_counter() - t0
    assert _ours(_snapshot(dst)) == new
    rng, n, outcomes = random.Random(11), 8, []
    for i in range(n):
        reset()
        delay = run_time * 1.2 * (i + rng.random()) / n
        killed = _killed_save(sds[2], dst, MANY, user, delay)
        snap = _snapshot(dst)
        ours = {k: v for k, v in _ours(snap).items() if not k.startswith(".ckpt.tmp-")}
        state = "old" if ours == old else "new" if ours == new else "uncommitted"
        outcomes.append((round(delay, 3), killed, state))
        assert state != "uncommitted" or (user and "config.json" not in ours), outcomes
        assert not user or {k: snap[k] for k in USER_FILES} == USER_FILES
    reset()
    assert any(killed for _, killed, _ in outcomes), outcomes


def test_progress_bars_of_load_and_convert(tmp_path, monkeypatch, capsys):
    """Loading and plain `convert` show tqdm bars over the bytes read / written: forced by progress=True,
    off with False, and by default (None) only from formats.PROGRESS_MIN_BYTES on (never for tiny files)."""
    from wan_model.io import formats
    from wan_model.io.checkpoint import load_model
    from wan_model.io.convert import convert_checkpoint

    src = tmp_path / "src"
    random_model(WanConfig.from_preset("tiny-t2v")).save_pretrained(src)
    capsys.readouterr()
    load_model(src)
    assert "loading" not in capsys.readouterr().err                      # tiny: below the default threshold
    monkeypatch.setattr(formats, "PROGRESS_MIN_BYTES", 1)
    load_model(src)
    assert "loading" in capsys.readouterr().err
    convert_checkpoint(src, tmp_path / "a.safetensors", "original", progress=False)
    assert capsys.readouterr().err == ""
    convert_checkpoint(src, tmp_path / "b.safetensors", "original", progress=True)
    err = capsys.readouterr().err
    assert "loading" in err and "writing" in err and "100%" in err
