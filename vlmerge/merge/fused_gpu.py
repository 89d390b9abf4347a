"""fused.py's formula as one Triton kernel over many tensors at once (a whole tower per launch).

Tensors are addressed as element offsets from two root pointers (inputs: base, task vectors, sorted |d|;
outputs: the destination parameters), read from an int64 table with one row per tensor; a block map sends each
program to its tensor. A candidate is then: build two small tables on the host, one copy, one launch (three
with rescale: L1 partial sums per block, a deterministic sum per tensor, then the merge). Floating-point
contraction is off and the normalize divide is IEEE: the same bits as fused.merge_cpu.

Measured on an H200 (bench/bench_resident_gpu.py, 7B-shaped bf16 tower, 2 sources, floor 13.9 ms, 2026-11):
linear 14.3 ms, TIES 29.3 ms, DARE-TIES 32.2 ms; the previous per-tensor torch ops took 108, 376 and 414 ms.
TIES' extra time is not bandwidth; a guess, not profiled: each block's chain of dependent loads (row, rank, threshold).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vlmerge.merge.fused import SPARSIFY, GtaCall
from vlmerge.merge.ops import work_dtype
from vlmerge.merge.sparsify import L1_EPS, check_indexable

BLOCK = 2048
SUM_CHUNK = 1024
STATIC = 6  # int columns per tensor: base, deltas, out, numel, sorted, first block
PER_SOURCE_INT = 5  # lo rank, hi rank, hash key, keep below, dense
PER_SOURCE_FLOAT = 3  # weight, lo value, hi value


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: fused.merge_cpu does everything
    triton = None


def triton_ready() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def gta_kernel(block_tensor, ints, floats, factors, partials, in_root, out_root, NI: tl.constexpr,
                   NF: tl.constexpr, N_SRC: tl.constexpr, SPARSIFY: tl.constexpr, CONSENSUS: tl.constexpr,
                   NORMALIZE: tl.constexpr, RESCALE: tl.constexpr, L1_PASS: tl.constexpr, ALIGNED: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid).to(tl.int64)
        irow = ints + t * NI
        frow = floats + t * NF
        work = floats.dtype.element_ty
        base_off = tl.load(irow)
        delta_off = tl.load(irow + 1)
        out_off = tl.load(irow + 2)
        numel = tl.load(irow + 3)
        sorted_off = tl.load(irow + 4)
        if ALIGNED:
            base_off = tl.multiple_of(base_off, 16)
            delta_off = tl.multiple_of(delta_off, 16)
            out_off = tl.multiple_of(out_off, 16)
            numel = tl.multiple_of(numel, 16)
        e = (pid - tl.load(irow + 5)) * BLOCK + tl.arange(0, BLOCK)
        inside = e < numel
        s = tl.zeros([BLOCK], work)
        pos = tl.zeros([BLOCK], work)
        neg = tl.zeros([BLOCK], work)
        w_pos = tl.zeros([BLOCK], work)
        w_neg = tl.zeros([BLOCK], work)
        for j in tl.static_range(N_SRC):
            src = irow + 6 + j * 5
            d = tl.load(in_root + delta_off + j * numel + e, mask=inside, other=0.0).to(work)
            keep = inside
            if SPARSIFY == 1:
                lo_rank = tl.load(src)
                hi_rank = tl.load(src + 1)
                row_sorted = in_root + sorted_off + j * numel
                lo = tl.where(lo_rank >= 0, tl.load(row_sorted + tl.maximum(lo_rank, 0)).to(work),
                              tl.load(frow + 2 + j * 3 + 1))  # fmt: skip
                hi = tl.where(hi_rank >= 0, tl.load(row_sorted + tl.maximum(hi_rank, 0)).to(work),
                              tl.load(frow + 2 + j * 3 + 2))  # fmt: skip
                a = tl.abs(d)
                keep = (a >= lo) & (a <= hi)
            if SPARSIFY == 2:
                h = e.to(tl.uint32) ^ tl.load(src + 2).to(tl.uint32)
                h = h ^ (h >> 16)
                h = (h * 0x7FEB352D).to(tl.uint32)
                h = h ^ (h >> 15)
                h = (h * 0x846CA68B).to(tl.uint32)
                h = h ^ (h >> 16)
                keep = (h >> 8) < tl.load(src + 3).to(tl.uint32)
            if L1_PASS:
                a64 = tl.abs(d).to(tl.float64)
                tl.store(partials + (pid.to(tl.int64) * N_SRC + j) * 2, tl.sum(a64, 0))
                tl.store(partials + (pid.to(tl.int64) * N_SRC + j) * 2 + 1, tl.sum(a64 * keep.to(tl.float64), 0))
            else:
                w = tl.load(frow + 2 + j * 3)
                c = w
                if RESCALE:
                    c = w * tl.load(factors + t * N_SRC + j)
                x = d * c
                if SPARSIFY != 0:
                    x = x * keep.to(work)
                s = s + x
                if CONSENSUS:
                    up = (x > 0).to(work)
                    down = (x < 0).to(work)
                    pos = pos + x * up
                    neg = neg + x * down
                    if NORMALIZE:
                        w_pos = w_pos + up * w
                        w_neg = w_neg + down * w
        if not L1_PASS:
            mixed = s
            if CONSENSUS:
                elect = (s >= 0).to(work)
                mixed = pos * elect + neg * (1.0 - elect)
                if NORMALIZE:
                    divisor = w_pos * elect + w_neg * (1.0 - elect)
                    divisor = divisor + (divisor == 0).to(work)
                    if work == tl.float32:
                        mixed = tl.div_rn(mixed, divisor)
                    else:
                        mixed = mixed / divisor
            b = tl.load(in_root + base_off + e, mask=inside, other=0.0).to(work)
            merged = mixed * tl.load(frow) + b * tl.load(frow + 1)
            merged = merged.to(in_root.dtype.element_ty).to(out_root.dtype.element_ty)
            tl.store(out_root + out_off + e, merged, mask=inside)

    @triton.jit
    def factor_kernel(ints, partials, factors, NI: tl.constexpr, N_SRC: tl.constexpr, EPS: tl.constexpr,
                      BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
        t = tl.program_id(0).to(tl.int64)
        irow = ints + t * NI
        numel = tl.load(irow + 3)
        first = tl.load(irow + 5)
        blocks = (numel + BLOCK - 1) // BLOCK
        for j in tl.static_range(N_SRC):
            acc_before = tl.zeros([CHUNK], tl.float64)
            acc_after = tl.zeros([CHUNK], tl.float64)
            for k in range(0, blocks, CHUNK):
                index = k + tl.arange(0, CHUNK)
                at = partials + ((first + index) * N_SRC + j) * 2
                acc_before += tl.load(at, mask=index < blocks, other=0.0)
                acc_after += tl.load(at + 1, mask=index < blocks, other=0.0)
            before = tl.sum(acc_before, 0)
            after = tl.sum(acc_after, 0)
            skip = (before < EPS) | (after < EPS) | (tl.load(irow + 6 + j * 5 + 4) != 0)
            factor = tl.where(skip, 1.0, before / tl.where(skip, 1.0, after))
            tl.store(factors + t * N_SRC + j, factor.to(factors.dtype.element_ty))


class TritonGroup:
    """Static launch tables of tensors merged together: same device, input dtype and output dtype.

    `bases[i]` [*S_i], `deltas[i]` [n, *S_i], `sorted_abs[i]` [n, numel_i] or None, all contiguous and of one
    dtype; outputs are passed to `run` (contiguous, numel_i elements each, one dtype).
    """

    def __init__(self, bases: list[Tensor], deltas: list[Tensor], sorted_abs: list[Tensor | None], *,
                 kernels=None, launch_options: dict | None = None):  # fmt: skip
        self.bases, self.deltas, self.sorted_abs = bases, deltas, sorted_abs
        self.root = bases[0]
        self.device = self.root.device
        self.kernels = kernels or (gta_kernel, factor_kernel)
        self.launch_options = {"enable_fp_fusion": False} if launch_options is None else launch_options
        self.numel = np.array([b.numel() for b in bases], dtype=np.int64)
        blocks = -(-self.numel // BLOCK)
        first = np.concatenate([[0], np.cumsum(blocks)[:-1]]).astype(np.int64)
        self.total_blocks = int(blocks.sum())
        offsets = [[self._offset(b), self._offset(d), 0, b.numel(), self._offset(s) if s is not None else 0, f]
                   for b, d, s, f in zip(bases, deltas, sorted_abs, first.tolist())]  # fmt: skip
        self.static = np.array(offsets, dtype=np.int64).reshape(len(bases), STATIC)
        self.aligned = bool((self.static[:, [0, 1, 3, 4]] % 16 == 0).all())
        self.block_tensor = torch.repeat_interleave(
            torch.arange(len(bases), dtype=torch.int32), torch.from_numpy(blocks)
        ).to(self.device)
        self.has_sorted = all(s is not None for s in sorted_abs)
        self._out_pointers: list[int] | None = None
        self._out_offsets: list[int] = []

    def _offset(self, tensor: Tensor, root: Tensor | None = None) -> int:
        root = self.root if root is None else root
        size = root.element_size()
        if tensor.dtype != root.dtype or tensor.device != root.device or not tensor.is_contiguous():
            raise ValueError("a fused group needs contiguous tensors of one dtype on one device")
        delta = tensor.data_ptr() - root.data_ptr()
        if delta % size:
            raise ValueError("tensor storage is not aligned to its element size")
        return delta // size

    def run(self, call: GtaCall, outs: list[Tensor]) -> None:
        """Merge every tensor of the group (rows of `call` in group order) into `outs`."""
        if self.total_blocks == 0:
            return
        sparsify = SPARSIFY[call.spec.sparsification]
        if sparsify == 1 and not self.has_sorted:
            raise ValueError("magnitude pruning on the GPU needs sorted |delta| for every tensor")
        if sparsify == 2:
            check_indexable(int(self.numel.max()))
        out_root = outs[0]
        if out_root.device != self.device:
            raise ValueError(f"outputs on {out_root.device}, inputs on {self.device}")
        pointers = [o.data_ptr() for o in outs]
        if pointers != self._out_pointers:  # checked once per set of destinations
            self._out_offsets = [self._offset(o, out_root) for o in outs]
            self._out_pointers = pointers
        ints = self.static.copy()
        ints[:, 2] = self._out_offsets
        aligned = self.aligned and bool((ints[:, 2] % 16 == 0).all())
        per_source = np.stack([call.lo_rank, call.hi_rank, call.keys, call.keep_below, call.dense.astype(np.int64)],
                              axis=2).reshape(len(outs), -1)  # fmt: skip
        ints = np.concatenate([ints, per_source], axis=1)
        work = work_dtype(self.root.dtype)
        per_float = np.stack([call.weight, call.lo_value, call.hi_value], axis=2).reshape(len(outs), -1)
        floats = np.concatenate([call.scale[:, None], call.beta[:, None], per_float], axis=1)
        ints_dev = torch.from_numpy(np.ascontiguousarray(ints)).to(self.device)
        floats_dev = torch.from_numpy(np.ascontiguousarray(floats)).to(device=self.device, dtype=work)
        gta_kernel, factor_kernel = self.kernels
        n = call.n
        shape = dict(NI=ints.shape[1], NF=floats.shape[1], N_SRC=n, SPARSIFY=sparsify,
                     CONSENSUS=call.spec.consensus, NORMALIZE=call.normalize, RESCALE=call.rescale,
                     ALIGNED=aligned, BLOCK=BLOCK)  # fmt: skip
        factors = floats_dev  # unread without rescale
        if call.rescale:
            partials = torch.empty(self.total_blocks * n * 2, dtype=torch.float64, device=self.device)
            factors = torch.empty(len(outs) * n, dtype=work, device=self.device)
            gta_kernel[(self.total_blocks,)](self.block_tensor, ints_dev, floats_dev, factors, partials, self.root,
                                             out_root, **shape, L1_PASS=True, **self.launch_options)  # fmt: skip
            factor_kernel[(len(outs),)](ints_dev, partials, factors, NI=ints.shape[1], N_SRC=n, EPS=L1_EPS,
                                        BLOCK=BLOCK, CHUNK=SUM_CHUNK, **self.launch_options)  # fmt: skip
        gta_kernel[(self.total_blocks,)](self.block_tensor, ints_dev, floats_dev, factors, factors, self.root,
                                         out_root, **shape, L1_PASS=False, **self.launch_options)  # fmt: skip
