"""Block offload: run a `WanTransformer` whose blocks do not all fit on the device (issue 25; REFERENCE.md section 11,
as musubi-tuner's H2D-only block swap does it). `model.enable_offload(blocks_on_device=N | vram_budget="12GB",
prefetch=1)` / `model.disable_offload()`; WanExperts' idle expert is parked on the host by `park` / `unpark`.

Design.
  resident   the first R = N - 1 blocks and every tensor outside the blocks stay on the device as they are.
  streamed   the other L - R blocks keep ONE master copy on the host: the tensors themselves when the device is the
             host (no copy, host memory does not grow), else one pinned buffer per block. Quantized weights (NVFP4,
             FP8) are their modules' packed buffers: packed on the host and in transit.
  ring       1 + prefetch slots on the device, each one flat byte buffer holding one block's tensors at fixed
             offsets (ALIGN-byte aligned): a block in a given slot always has the same addresses (a block is
             preferably loaded into its home slot, its position among the streamed blocks modulo the ring size).
  hooks      a forward pre-hook on each streamed block makes sure it and the next `prefetch` streamed blocks (cyclic:
             the last blocks of a forward prefetch the first ones of the next) are in slots, then binds the block's
             parameters and buffers to views of its slot; a forward post-hook, run even when the block raises,
             binds them back to meta placeholders. The block loop in model.py knows nothing of it.
  copies     host-to-device only, nothing is copied back (the masters are the truth). On CUDA they run on a side
             stream: the copy into a slot waits for the event recorded when the slot's previous block finished,
             the block waits for its copy's event. On other devices (CPU in the tests) they are synchronous.
So at any moment at most R + 1 + prefetch = N + prefetch blocks hold device storage; the parameters of the blocks not
being run are meta tensors (no storage). Offload is for inference: a forward of a streamed block with grad mode on
and weights requiring grad is refused (the ring is overwritten before a backward could read it).

What keeps working, on the masters. `state_dict` (and so `save_pretrained`) and `load_state_dict` see the master
copies (per-block state-dict hooks bind them in while they run); `on_host(model)` binds every streamed block to its
masters around LoRA load / unload, `quantize` and `to_dtype` (WanModel wraps them), then captures the blocks again
(new or replaced tensors become the new masters) and empties the ring. The results are exactly those without offload
where the host is the device; on a GPU these operations then run on the host's copies (the quantizers are
bit-identical across backends; a LoRA's fp32 delta products are computed on the host).

vram_budget -> N: the tensors outside the blocks are resident (`fixed` bytes), each block on the device takes one
slot of the largest block's size (`slot` bytes, tensors ALIGN-aligned): N + prefetch = (budget - fixed) // slot,
N capped at the number of blocks; below one block the budget is refused. Activations are not in the budget (the cost
model, `python -m wan_model cost`, adds them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn

from wan_model.core.config import parse_bytes

ALIGN = 512  # bytes: the CUDA caching allocator's alignment (and a multiple of the CPU allocator's 64)
HOST_DEVICES = ("cpu",)  # devices whose memory is the host's: the masters are the tensors themselves (the tests
                         # empty it to run the copying path of a GPU, masters and all, on the CPU)


def parse_budget(budget: int | str) -> int:
    """'12GB', '12.5 GB', '800MB', '24GiB' or an int of bytes -> bytes > 0 (GB = 1e9 as huggingface_hub and our
    max_shard_size; GiB = 2^30)."""
    return parse_bytes(budget, "vram_budget", "'12GB', '24GiB', '800MB'", binary=True)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _tensors(module: nn.Module, skip=frozenset()):
    """(owner module, name, is_param, tensor) of every parameter and buffer under `module` (shared ones once), but
    those of modules whose id is in `skip`."""
    seen = set()
    for m in module.modules():
        if id(m) in skip:
            continue
        for table, is_param in ((m._parameters, True), (m._buffers, False)):
            for name, t in table.items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    yield m, name, is_param, t


def block_bytes(block: nn.Module) -> int:
    """Bytes one ring slot needs for `block`: its tensors, each starting ALIGN-aligned."""
    return sum(_aligned(t.numel() * t.element_size()) for _, _, _, t in _tensors(block))


def fixed_bytes(model) -> int:
    """Bytes of the model's tensors outside the blocks (always resident)."""
    inside = {id(t) for b in model.blocks for _, _, _, t in _tensors(b)}
    return sum(t.numel() * t.element_size() for _, _, _, t in _tensors(model) if id(t) not in inside)


def blocks_for_budget(model, budget: int | str, prefetch: int = 1) -> int:
    """N for `vram_budget` (the module docstring's rule): (budget - fixed) // slot - prefetch, at most L."""
    b = parse_budget(budget)
    fixed, slot, L = fixed_bytes(model), max(block_bytes(blk) for blk in model.blocks), len(model.blocks)
    n = (b - fixed) // slot - prefetch
    if n < 1:
        raise ValueError(f"vram_budget {budget!r} ({b / 1e9:.3f} GB) holds {max(b - fixed, 0) / 1e9:.3f} GB after the "
                         f"{fixed / 1e9:.3f} GB of tensors outside the blocks: less than 1 + prefetch ({prefetch}) "
                         f"blocks of {slot / 1e9:.3f} GB; the smallest budget is "
                         f"{(fixed + (1 + prefetch) * slot) / 1e9:.3f} GB")
    return min(n, L)


@dataclasses.dataclass(eq=False)
class _Entry:
    """One parameter or buffer of a streamed block."""

    module: nn.Module
    name: str
    param: bool
    offset: int                 # in a slot
    master: torch.Tensor        # the host copy (contiguous); meta when the tensor is read from a file (`source`)
    host: torch.Tensor | None   # what `on_host` binds: the original object when the device is the host
    shell: torch.Tensor | None  # the original nn.Parameter on another device (its data emptied), restored by disable
    placeholder: torch.Tensor   # meta, bound while the block is not run
    source: list | None = None  # file tier: [(row, rows, tensor over the memory-mapped file)], rows of the tensor

    def read(self) -> torch.Tensor:
        """The tensor on the host: the master, or read from the file (a new tensor)."""
        if self.source is None:
            return self.master
        t = torch.empty(self.master.shape, dtype=self.master.dtype)
        for row, rows, src in self.source:
            (t[row:row + rows] if t.dim() else t).copy_(src.reshape((rows, *t.shape[1:]) if t.dim() else ()))
        return t

    def host_obj(self) -> torch.Tensor:
        """What `on_host` / state_dict bind: the host object, or a tensor read from the file."""
        if self.source is None:
            return self.host
        t = self.read()
        return nn.Parameter(t, requires_grad=self.placeholder.requires_grad) if self.param else t

    def pairs(self, dst: torch.Tensor) -> list:
        """(destination, source) copies that fill `dst` (shape and dtype of the tensor) from the host."""
        if self.source is None:
            return [(_raw(dst), _raw(self.master))]
        return [((dst[row:row + rows] if dst.dim() else dst), src.reshape((rows, *dst.shape[1:]) if dst.dim() else ()))
                for row, rows, src in self.source]

    @property
    def nbytes(self) -> int:
        return self.master.numel() * self.master.element_size()

    def bind(self, t: torch.Tensor) -> None:
        (self.module._parameters if self.param else self.module._buffers)[self.name] = t

    def bound(self) -> torch.Tensor:
        return (self.module._parameters if self.param else self.module._buffers)[self.name]


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor, 1-D uint8."""
    return t.reshape(-1).view(torch.uint8)


def _placeholder(t: torch.Tensor, param: bool) -> torch.Tensor:
    meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
    return nn.Parameter(meta, requires_grad=t.requires_grad) if param else meta


class _Copier:
    """Host-to-device copies: on a side stream with events on CUDA, synchronous elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def event(self, stream=None):
        """An event recorded on `stream` (default: the current one), None off CUDA."""
        if not self.cuda:
            return None
        e = torch.cuda.Event()
        e.record(stream or torch.cuda.current_stream(self.device))
        return e

    def copy(self, pairs, after=None):
        """dst.copy_(src) for (dst, src) in `pairs` (bytes), after event `after`; returns the done event."""
        if not self.cuda:
            for dst, src in pairs:
                dst.copy_(src)
            return None
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            return self.event(self.stream)

    def wait(self, event) -> None:
        """Make the current stream wait for `event`."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def sync(self) -> None:
        if self.cuda:
            self.stream.synchronize()


@dataclasses.dataclass(eq=False)
class _Slot:
    buf: torch.Tensor
    block: int | None = None
    ready: object = None       # event: the copy of `block` into buf is done
    free: object = None        # event: the last block run from buf is done
    objs: dict = dataclasses.field(default_factory=dict)  # block -> the objects bound (views of buf)


class BlockOffload:
    """The offload state of one model (`model._offload`); see the module docstring."""

    def __init__(self, model, blocks_on_device: int | None = None, vram_budget=None, prefetch: int = 1,
                 sources: dict | None = None, device=None, parked: bool = False):
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"enable_offload: prefetch must be an int >= 0, got {prefetch!r}")
        if (blocks_on_device is None) == (vram_budget is None):
            raise ValueError("enable_offload: pass exactly one of blocks_on_device=N or vram_budget='12GB', got "
                             f"blocks_on_device={blocks_on_device!r}, vram_budget={vram_budget!r}")
        L = len(model.blocks)
        if vram_budget is not None:
            blocks_on_device = blocks_for_budget(model, vram_budget, prefetch)
        if isinstance(blocks_on_device, bool) or not isinstance(blocks_on_device, int) or blocks_on_device < 1:
            raise ValueError(f"enable_offload: blocks_on_device must be an int >= 1, got {blocks_on_device!r}")
        self.model, self.prefetch = model, prefetch
        self.blocks_on_device = min(blocks_on_device, L)
        self.device = torch.device(device) if device is not None else model.device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.host_is_device = self.device.type in HOST_DEVICES
        self.copier = _Copier(self.device)
        resident = L if blocks_on_device >= L else blocks_on_device - 1
        self.streamed = list(range(resident, L))               # in run order
        self.pos = {b: k for k, b in enumerate(self.streamed)}
        self.entries: dict[int, list[_Entry]] = {}
        self.depth = 0                                         # on_host nesting
        self.hooks = []
        self.slots: list[_Slot] = []
        self.slot_bytes = 0
        self.fixed: list[_Entry] | None = None                 # while parked: every other tensor's entry
        self.ready = None                                      # event: the copies of `unpark` are done
        files = {b: self._file_views(b, sources) for b in self.streamed} if sources is not None else {}
        moving = model.device != self.device  # a model loaded on the host, offloaded to `device`
        for b in self.streamed:  # (every check is done: nothing below refuses)
            self.entries[b] = self._capture(_tensors(model.blocks[b]), {}, files.get(b))
            self._unbind(b)
        if parked:
            self.park()
        elif moving:  # everything else goes to the device as a whole (each module's own .to)
            for name, child in model.named_children():
                if name != "blocks":
                    child.to(self.device)
            for b in range(len(model.blocks)):
                if b not in self.pos:
                    model.blocks[b].to(self.device)
            for name, t in [*model._parameters.items(), *model._buffers.items()]:
                if isinstance(t, nn.Parameter):
                    t.data = t.data.to(self.device)
                elif t is not None:
                    model._buffers[name] = t.to(self.device)
            self._rebind()
        self._size_ring()
        for b in self.streamed:
            blk = model.blocks[b]
            self.hooks += [blk.register_forward_pre_hook(self._pre_hook(b)),
                           blk.register_forward_hook(self._post_hook(b), always_call=True)]
        self.hooks += [model.register_forward_pre_hook(self._model_hook),
                       model.register_state_dict_pre_hook(lambda *a: self._sd_pre_hook(*a)),
                       model.register_state_dict_post_hook(lambda *a: self._sd_post_hook(*a)),
                       model.register_load_state_dict_pre_hook(lambda *_: self._enter()),
                       model.register_load_state_dict_post_hook(lambda *_: self._exit())]
        if self.streamed and self.streamed[0] > 0:  # the resident blocks run while the first streamed ones come in
            self.hooks.append(model.blocks[0].register_forward_pre_hook(self._first_hook))

    # -- capture / bind ------------------------------------------------------------------------
    def _capture(self, items, old: dict[int, _Entry], files: dict | None = None) -> list[_Entry]:
        """Entries of the (module, name, is_param, tensor) `items` as bound now (on the device at enable / park,
        the host objects under on_host); `old`: id(host object) -> entry of an earlier capture, kept as it is
        (its master holds whatever was written into it); `files`: id(tensor) -> its views of a memory-mapped
        file (the file tier: no host copy is made, the tensor's own storage is freed)."""
        items, files = list(items), files or {}
        new = [t for *_, t in items if id(t) not in old and id(t) not in files]
        flat = None
        if new and not self.host_is_device:  # one pinned host buffer for the new masters
            total = sum(_aligned(t.numel() * t.element_size()) for t in new)
            flat = torch.empty(total, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        out, off, foff = [], 0, 0
        for m, name, is_param, t in items:
            prev = old.get(id(t))
            if prev is not None:
                out.append(dataclasses.replace(prev, module=m, name=name, offset=off))
                off += _aligned(prev.nbytes)
                continue
            rg = t.requires_grad
            if id(t) in files:
                meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
                shell = t if is_param else None
                if shell is not None:
                    shell.data = torch.empty(0, dtype=t.dtype, device=self.device)
                out.append(_Entry(m, name, is_param, off, meta, None, shell, _placeholder(t, is_param), files[id(t)]))
                off += _aligned(meta.numel() * meta.element_size())
                continue
            if self.host_is_device:
                master = t.detach() if t.is_contiguous() else t.detach().contiguous()
                host, shell = t if t.is_contiguous() else (nn.Parameter(master, rg) if is_param else master), None
            else:
                n = t.numel() * t.element_size()
                master = flat[foff:foff + n].view(t.dtype).view(t.shape)
                foff += _aligned(n)
                _raw(master).copy_(_raw(t.detach().contiguous()))
                host = nn.Parameter(master, requires_grad=rg) if is_param else master
                shell = t if is_param else None
                if shell is not None and shell.device != self.device:
                    shell = None  # a tensor made on the host (e.g. by quantize under on_host): disable makes a new one
                if shell is not None:
                    shell.data = torch.empty(0, dtype=t.dtype, device=self.device)  # frees the device copy
            out.append(_Entry(m, name, is_param, off, master, host, shell, _placeholder(t, is_param)))
            off += _aligned(master.numel() * master.element_size())
        return out

    def _file_views(self, b: int, sources: dict) -> dict[int, list]:
        """id(tensor) -> its [(row, rows, mapped tensor)] for block b's tensors named in `sources` ({native key:
        views}), after checking that the views cover the tensor exactly (ValueError naming the key)."""
        out = {}
        for path, m in self.model.blocks[b].named_modules():
            for name, t in [*m._parameters.items(), *m._buffers.items()]:
                key = f"blocks.{b}.{path + '.' if path else ''}{name}"
                src = sources.get(key)
                if src is None or t is None:
                    continue
                rows, inner = (t.shape[0], math.prod(t.shape[1:])) if t.dim() else (1, 1)
                if sum(r for _, r, _ in src) != rows or any(v.numel() != r * inner for _, r, v in src):
                    raise ValueError(f"enable_offload: the file's tensors for {key} "
                                     f"{[tuple(v.shape) for _, _, v in src]} do not make its shape {tuple(t.shape)}")
                out[id(t)] = (src, key, t)
        if out:  # a cheap identity check: the block's smallest tensor as the file has it
            src, key, t = min(out.values(), key=lambda v: v[2].numel())
            probe = _Entry(None, "", False, 0, torch.empty(t.shape, dtype=t.dtype, device="meta"), None, None, t, src)
            if not torch.equal(_raw(probe.read()), _raw(t.detach().contiguous().cpu())):
                raise ValueError(f"enable_offload: {key} in the file differs from the model's: the file tier needs "
                                 "the checkpoint this model was loaded from, unchanged")
        return {i: v[0] for i, v in out.items()}

    def _rebind(self) -> None:
        """After tensors changed device: the model's ops and the quantized layers' modes for the device."""
        for b in self.streamed:
            for m in self.model.blocks[b].modules():
                if hasattr(m, "_bind") and hasattr(m, "requested_mode"):  # NVFP4Linear: its mode per device
                    m._bind(self.device)
        if self.model.device == self.device:
            self.model.set_impl(self.model.impl)

    def _unbind(self, b: int) -> None:
        for e in self.entries[b]:
            e.bind(e.placeholder)

    def _all(self) -> list[_Entry]:
        """Every entry with a host master: the streamed blocks', and the others' while parked."""
        return [e for b in self.streamed for e in self.entries[b]] + (self.fixed or [])

    def _fixed_items(self):
        """The tensors outside the streamed blocks."""
        skip = {id(m) for b in self.streamed for m in self.model.blocks[b].modules()}
        return _tensors(self.model, skip)

    def _recapture(self) -> None:
        """After the masters were bound (and maybe changed or replaced): capture again, placeholders bound. A tensor
        of the file tier stays in the file if it still equals it, else it becomes a master in memory."""
        for b in self.streamed:
            old = {}
            for e in self.entries[b]:
                cur = e.bound()
                if e.source is None:
                    old[id(e.host)] = e
                elif cur is not e.placeholder and cur.shape == e.master.shape and cur.dtype == e.master.dtype and \
                        torch.equal(_raw(cur.detach()), _raw(e.read())):
                    old[id(cur)] = e
            self.entries[b] = self._capture(_tensors(self.model.blocks[b]), old)
            self._unbind(b)
        if self.fixed is not None:
            self.fixed = self._capture(self._fixed_items(), {id(e.host): e for e in self.fixed})
            for e in self.fixed:
                e.bind(e.placeholder)

    # -- ring ----------------------------------------------------------------------------------
    def _size_ring(self) -> None:
        """(Re)allocate the ring when the slots are too small or missing (none while parked); forget what they
        held."""
        need = max((sum(_aligned(e.nbytes) for e in self.entries[b]) for b in self.streamed), default=0)
        n = 0 if self.fixed is not None else min(1 + self.prefetch, len(self.streamed))
        self.copier.sync()
        if need > self.slot_bytes or len(self.slots) != n:
            self.slots = []  # the old buffers go before the new ones come
            self.slots = [_Slot(torch.empty(need, dtype=torch.uint8, device=self.device)) for _ in range(n)]
            for s in self.slots:  # memory just allocated on the compute stream: its pending users go first
                s.free = self.copier.event()
            self.slot_bytes = need
        else:
            for s in self.slots:
                s.block, s.ready, s.objs = None, None, {}

    def _want(self, b: int | None) -> list[int]:
        """Block `b` and the next streamed blocks, cyclic, as many as there are slots (b None: the first ones)."""
        k = 0 if b is None else self.pos[b]
        S = self.streamed
        return [S[(k + j) % len(S)] for j in range(len(self.slots))]

    def _fetch(self, want: list[int]) -> dict[int, _Slot]:
        """Make every block of `want` held by a slot (copies issued in order); returns block -> slot."""
        held = {s.block: s for s in self.slots if s.block is not None}
        for w in want:
            if w in held:
                continue
            home = self.slots[self.pos[w] % len(self.slots)]
            slot = next(s for s in (home, *self.slots) if s.block not in want)
            held.pop(slot.block, None)
            slot.block, slot.objs = None, {}  # a failed copy leaves the slot empty
            pairs = [p for e in self.entries[w] for p in e.pairs(self._view(slot, e))]
            slot.ready = self.copier.copy(pairs, after=slot.free)
            slot.block = w
            held[w] = slot
        return held

    def _first_hook(self, block, args):
        if not self.depth:
            self._fetch(self._want(None))

    @staticmethod
    def _view(slot: _Slot, e: _Entry) -> torch.Tensor:
        return slot.buf[e.offset:e.offset + e.nbytes].view(e.master.dtype).view(e.master.shape)

    def _objs(self, slot: _Slot, b: int) -> list[torch.Tensor]:
        """The objects bound while `b` runs from `slot` (made once per block and slot: fixed addresses)."""
        if b not in slot.objs:
            objs = []
            for e in self.entries[b]:
                v = self._view(slot, e)
                objs.append(nn.Parameter(v, requires_grad=False) if e.param else v)
            slot.objs[b] = objs
        return slot.objs[b]

    def _pre_hook(self, b: int):
        def hook(block, args):
            if self.depth:
                raise RuntimeError(f"block {b} runs while its weights are bound to the host (inside on_host)")
            if torch.is_grad_enabled() and any(e.placeholder.requires_grad for e in self.entries[b]):
                raise RuntimeError("block offload is inference-only: run the model under torch.no_grad() or "
                                   "torch.inference_mode() (or disable_offload() to train)")
            slot = self._fetch(self._want(b))[b]
            self.copier.wait(slot.ready)
            for e, o in zip(self.entries[b], self._objs(slot, b)):
                e.bind(o)
        return hook

    def _post_hook(self, b: int):
        def hook(block, args, output):
            for s in self.slots:
                if s.block == b:
                    s.free = self.copier.event()
            self._unbind(b)
        return hook

    def _model_hook(self, model, args):
        """Before a forward: a parked model comes in first; the copies of `unpark` are waited for."""
        if self.fixed is not None:
            self.unpark()
        self.copier.wait(self.ready)
        self.ready = None

    # -- the masters in place of the placeholders ------------------------------------------------
    def _sd_pre_hook(self, model, *args):
        if not self.depth:  # read only: the masters are bound while state_dict reads them
            self.copier.sync()
            for e in self._all():
                e.bind(e.host_obj())

    def _sd_post_hook(self, model, *args):
        if not self.depth:
            for e in self._all():
                e.bind(e.placeholder)

    def _enter(self) -> None:
        if self.depth == 0:
            self.copier.sync()
            for e in self._all():
                e.bind(e.host_obj())
        self.depth += 1

    def _exit(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self._recapture()
            self._size_ring()

    @contextlib.contextmanager
    def on_host(self):
        """Bind every host master (the streamed blocks', every tensor's while parked) in place of its placeholder:
        operations in the context run on them; on exit the tensors are captured again (a new or replaced tensor
        becomes a master) and the ring forgets what it held."""
        self._enter()
        try:
            yield
        finally:
            self._exit()

    # -- parking: every tensor on the host (WanExperts' idle expert) --------------------------------
    @property
    def parked(self) -> bool:
        return self.fixed is not None

    def park(self) -> None:
        """Every tensor of the model to the host: the streamed blocks are there already, the others get host
        masters (their own tensors when the device is the host, else a copy: the only device-to-host copy) and
        meta placeholders; the ring is freed."""
        if self.fixed is not None:
            return
        self.copier.sync()
        self.fixed = self._capture(self._fixed_items(), {})
        for e in self.fixed:
            e.bind(e.placeholder)
        self._size_ring()
        self.model.prepare_context = self._parked_prepare_context

    def unpark(self) -> None:
        """Bring the parked tensors back (on CUDA: copies on the side stream; the model's next forward waits for
        them) and the ring; the host masters of the fixed tensors are dropped (the device copies are the truth)."""
        if self.fixed is None:
            return
        pairs = self._bring(self.fixed)
        self.ready = self.copier.copy(pairs, after=self.copier.event())  # after the allocations' pending users
        moved = [e.module for e in self.fixed if hasattr(e.module, "_bind") and hasattr(e.module, "requested_mode")]
        self.fixed = None
        del self.model.prepare_context
        for m in moved:
            m._bind(self.device)
        self._rebind()
        self._size_ring()

    def _bring(self, entries: list[_Entry]) -> list:
        """Bind device copies of `entries`' masters (the originals when the device is the host); returns the
        (device bytes, host bytes) copies to run."""
        pairs = []
        for e in entries:
            if self.host_is_device:
                e.bind(e.host)
                continue
            t = torch.empty_like(e.master, device=self.device)
            pairs.append((_raw(t), _raw(e.master)))
            if e.shell is not None:
                e.shell.data = t
                e.bind(e.shell)
            else:
                e.bind(nn.Parameter(t, requires_grad=e.host.requires_grad) if e.param else t)
        return pairs

    def _parked_prepare_context(self, *args, **kwargs):
        """prepare_context of a parked model: the text / image embedders and the stacked K/V come in for it (the
        contexts are made on the device), then go again."""
        mods = [self.model.condition_embedder, self.model.cross_kv, self.model.cross_kv_img]
        ids = {id(m) for mod in mods if mod is not None for m in mod.modules()}
        visit = [e for e in self.fixed if id(e.module) in ids]
        pairs = self._bring(visit)
        self.copier.wait(self.copier.copy(pairs, after=self.copier.event()))
        try:
            return type(self.model).prepare_context(self.model, *args, **kwargs)
        finally:
            for e in visit:
                if e.shell is not None:
                    e.shell.data = torch.empty(0, dtype=e.master.dtype, device=self.device)
                e.bind(e.placeholder)

    # -- end ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the hooks, put every tensor back on the device, free the ring."""
        self.unpark()
        self.copier.wait(self.ready)
        self.copier.sync()
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for b in self.streamed:
            for e in self.entries[b]:
                if self.host_is_device and e.source is None:
                    e.bind(e.host)
                    continue
                t = e.read().to(self.device)
                if e.shell is not None:
                    e.shell.data = t
                    e.bind(e.shell)
                else:
                    e.bind(nn.Parameter(t, requires_grad=e.placeholder.requires_grad) if e.param else t)
        self.entries, self.slots, self.streamed = {}, [], []

    def describe(self) -> dict:
        """What is where: resident / streamed block indices, ring slots and their bytes, fixed bytes."""
        return {"blocks_on_device": self.blocks_on_device, "prefetch": self.prefetch,
                "resident": [i for i in range(len(self.model.blocks)) if i not in self.pos],
                "streamed": list(self.streamed), "slots": len(self.slots), "slot_bytes": self.slot_bytes,
                "fixed_bytes": fixed_bytes(self.model)}


def on_host(model):
    """A context in which the streamed blocks of `model` hold their host masters (a no-op without offload)."""
    off = getattr(model, "_offload", None)
    return off.on_host() if off is not None else contextlib.nullcontext()
