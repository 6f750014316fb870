"""Fused LM head + log-probability: ``log softmax(hidden @ weight.T / T)[target]`` without ``[N, V]`` logits.

The actor's per-token log-probabilities (and, on request, the entropy of the same distribution) are
computed chunk by chunk with an online logsumexp, so the full ``[N, V]`` logits never exist: at Qwen's
vocabulary (V = 151936) and N = 16384 response tokens they would be 10 GB in fp32.

Three implementations of one function:

- Triton (``impl="triton"``, the default on CUDA). Forward: one kernel, grid over (token blocks,
  vocabulary splits); each program loops over its vocabulary blocks, forms a ``[BLOCK_N, BLOCK_V]``
  logits tile with ``tl.dot`` (fp32 accumulation), and keeps a running max ``m``, running sum
  ``s = sum exp(z - m)``, ``a = sum exp(z - m) (z - m)`` (for the entropy) and the target's logit. The
  few vocabulary splits (enough programs to fill the GPU when N is small) are merged in torch on
  ``[splits, N]`` tensors. Saves ``lse [N]`` (and the entropy) for backward.
  Backward: a loop over token chunks. Per chunk, the logits slab is recomputed with one cuBLAS GEMM,
  a Triton elementwise kernel turns it into dL/dlogits in one pass, and two more GEMMs give
  ``grad_hidden[chunk] = dlogits @ W`` and ``grad_weight += dlogits.T @ hidden[chunk]``. Backward is
  two thirds of the FLOPs and is GEMM-bound; cuBLAS GEMMs beat a hand-written Triton GEMM with
  atomics into a 2.5 GB fp32 ``grad_weight``, so only the bandwidth-bound softmax-gradient step is
  a custom kernel (same structure as Liger-Kernel's fused linear cross entropy, which computes the
  gradient in its forward because its loss is a scalar; our outputs are per token, so the upstream
  gradient is only known in backward and the logits are recomputed there).
- Torch chunked (``impl="torch"``, the default off CUDA, and the memory-saving path on GPUs without
  Triton): the same token-chunk loop in plain torch for forward and backward. A chunk's fp32 logits
  slab ``[chunk, V]`` is bounded by ``CHUNK_BUDGET_BYTES``; peak transient memory is about two slabs.
- ``fused_linear_logprob_reference``: full logits, ``log_softmax``, gather. Tests and benchmarks only.

Gradients (z = logit / T, p = softmax(z), H = -sum p log p = lse - E_p[z]):
  d logp_t / d logit_v = (onehot_t(v) - p_v) / T
  d H      / d logit_v = -p_v (log p_v + H) / T
(the second: dH/dz_v = dlse/dz_v - d(sum_u p_u z_u)/dz_v = p_v - (p_v + p_v z_v - p_v E[z])
= -p_v (z_v - E[z]) = -p_v (log p_v + H)).

Precision: logits are always fp32 (fp32 accumulation, never rounded to bf16). With 16-bit inputs on
CUDA the GEMM operands stay 16-bit (``out_dtype=torch.float32``, torch >= 2.8) and dlogits is rounded
to the input dtype before the two backward GEMMs, as any bf16 autograd would; elsewhere (CPU, or
older torch) the operands are upcast to fp32. ``grad_weight`` is accumulated over chunks in fp32.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._common import interpreting, log, resolve_impl, triton_available

# Torch chunked path (both directions) and the Triton path's backward: one fp32 [chunk, V] logits slab
# is at most this many bytes. Tests lower it to force several chunks.
CHUNK_BUDGET_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------- reference
def fused_linear_logprob_reference(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0, return_entropy: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """The obvious version: full fp32 logits ``[N, V]``, log_softmax, gather (tests and benchmarks only)."""
    logits = hidden.float() @ weight.float().T / temperature
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, targets.long()[..., None]).squeeze(-1)
    if not return_entropy:
        return token_logp
    return token_logp, -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------- GEMMs with fp32 output
@functools.cache
def _f32_out_gemm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """16-bit operands with an fp32 result (``torch.mm(..., out_dtype=)``, CUDA, torch >= 2.8)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        a = torch.ones(16, 16, device=device, dtype=dtype)
        c = torch.zeros(16, 16, device=device, dtype=torch.float32)
        torch.mm(a, a, out_dtype=torch.float32)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
    except (RuntimeError, TypeError):
        log.warning("fused_linear_logprob: torch.mm(out_dtype=float32) is unavailable on %s (torch %s); "
                    "the chunked GEMMs upcast %s operands to fp32 (slower, more memory)",
                    device, torch.__version__, dtype)
        return False
    return True


class _Gemms:
    """The three per-chunk products with ``weight [V, H]``, each with fp32 accumulation.

    Fast path (16-bit on CUDA): operands stay 16-bit, results fp32. Otherwise the weight is upcast
    once per call (a no-op for fp32 weights) and all products run in fp32.
    """

    def __init__(self, weight: Tensor):
        self.weight = weight
        self.fast = _f32_out_gemm_ok(weight.device, weight.dtype)
        self.w32 = None if self.fast else weight.float()

    def logits(self, h: Tensor) -> Tensor:
        """[c, H] -> raw fp32 logits [c, V] (not yet divided by T)."""
        if self.fast:
            return torch.mm(h, self.weight.T, out_dtype=torch.float32)
        return h.float() @ self.w32.T

    def dlogits_dtype(self) -> torch.dtype:
        return self.weight.dtype if self.fast else torch.float32

    def grad_hidden(self, dz: Tensor) -> Tensor:
        """[c, V] -> [c, H] (fp32 on the upcast path; the caller casts)."""
        return dz @ (self.weight if self.fast else self.w32)

    def accumulate_grad_weight(self, gw32: Tensor, dz: Tensor, h: Tensor) -> None:
        """gw32 [V, H] fp32 += dz.T @ h."""
        if self.fast:
            torch.addmm(gw32, dz.T, h, out_dtype=torch.float32, out=gw32)
        else:
            gw32.addmm_(dz.T, h.float())


# The compiled forward's autotune list, (BLOCK_V, BLOCK_H, num_warps, num_stages), at BLOCK_N up to 128.
# Every one compiles without a register spill on sm_90 and sm_100 (scripts/compile_kernels.py checks it in
# CI): at 4 warps a 128x128 fp32 logits tile alone takes 128 registers a thread and the tile spills, and at
# 16 warps ptxas caps a thread at 128 registers and it spills too, so all are 8 warps.
_FWD_TILES = ((128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 4), (64, 64, 8, 4), (64, 128, 8, 3))


def _fwd_configs_for(configs: list, major: int, entropy: bool) -> list:
    """The forward's autotune configs a GPU of compute capability ``major``.x tries: all of them, but on
    sm_8x the entropy variant of the BLOCK_V=128, BLOCK_H=64 tiles spills a few registers (2-6 with this
    Triton), so Ampere leaves those out. Shared with scripts/compile_kernels.py, which compiles exactly
    the configs each target keeps."""
    if major < 9 and entropy:
        return [c for c in configs if (c.kwargs["BLOCK_V"], c.kwargs["BLOCK_H"]) != (128, 64)]
    return list(configs)


def _chunk_rows(n: int, v: int) -> int:
    """Tokens per chunk so that one fp32 [chunk, V] slab fits CHUNK_BUDGET_BYTES."""
    return max(1, min(n, CHUNK_BUDGET_BYTES // (4 * v)))


# ----------------------------------------------------------------------------- torch chunked
def _torch_forward(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, entropy: bool):
    """-> (logp [N], lse [N], entropy [N] or None), fp32; one [chunk, V] slab at a time."""
    n, v = hidden.shape[0], weight.shape[0]
    gemms = _Gemms(weight)
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if entropy else None
    step = _chunk_rows(n, v)
    for i in range(0, n, step):
        z = gemms.logits(hidden[i : i + step]).mul_(1.0 / temperature)  # [c, V]
        lse_c = torch.logsumexp(z, dim=-1)
        lse[i : i + step] = lse_c
        logp[i : i + step] = z.gather(1, targets[i : i + step, None]).squeeze(1) - lse_c
        if entropy:
            z.sub_(lse_c[:, None])  # log p
            ent[i : i + step] = -(z.exp() * z).sum(-1)
        del z
    return logp, lse, ent


def _torch_dlogits(z: Tensor, t: Tensor, lse: Tensor, ent: Tensor | None, g_lp: Tensor | None,
                   g_ent: Tensor | None, temperature: float) -> Tensor:
    """In place on the fp32 slab z = logits / T: dL/dlogits = (g_lp (onehot - p) - g_ent p (log p + H)) / T."""
    z.sub_(lse[:, None])  # log p
    if g_ent is None:
        z.exp_().mul_(-g_lp[:, None])
    else:
        p = z.exp()
        z.add_(ent[:, None]).mul_(g_ent[:, None])  # g_ent (log p + H)
        if g_lp is not None:
            z.add_(g_lp[:, None])
        z.mul_(p).neg_()
        del p
    if g_lp is not None:
        z.scatter_add_(1, t[:, None], g_lp[:, None])
    return z.mul_(1.0 / temperature)


def _chunked_backward(hidden, weight, targets, lse, ent, g_lp, g_ent, temperature,
                      need_hidden: bool, need_weight: bool, triton_dlogits: bool):
    """Recompute each token chunk's logits, form dL/dlogits, and project it onto hidden and weight."""
    n, v = hidden.shape[0], weight.shape[0]
    gemms = _Gemms(weight)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    gw32 = None
    if need_weight:
        gw32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    step = _chunk_rows(n, v)
    for i in range(0, n, step):
        h = hidden[i : i + step]
        sl = slice(i, i + step)
        chunk = (targets[sl], lse[sl], None if ent is None else ent[sl],
                 None if g_lp is None else g_lp[sl], None if g_ent is None else g_ent[sl])
        raw = gemms.logits(h)
        if triton_dlogits:
            dz = _triton_dlogits(raw, *chunk, temperature, gemms.dlogits_dtype())
        else:
            dz = _torch_dlogits(raw.mul_(1.0 / temperature), *chunk, temperature).to(gemms.dlogits_dtype())
        del raw
        if need_hidden:
            grad_hidden[sl] = gemms.grad_hidden(dz)
        if need_weight:
            gemms.accumulate_grad_weight(gw32, dz, h)
        del dz
    grad_weight = None if gw32 is None else gw32.to(weight.dtype)
    return grad_hidden, grad_weight


class _LinearLogprob(torch.autograd.Function):
    """Shared autograd for both paths: forward by ``use_triton``; backward always the chunk loop."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, entropy, use_triton):
        ctx.set_materialize_grads(False)
        if use_triton and hidden.shape[0] > 0:  # (an empty grid is not a launch)
            logp, lse, ent = _triton_forward(hidden, weight, targets, temperature, entropy)
        else:
            logp, lse, ent = _torch_forward(hidden, weight, targets, temperature, entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.temperature, ctx.use_triton = temperature, use_triton
        return (logp, ent) if entropy else logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_lp is None and g_ent is None) or not (need_h or need_w):
            return None, None, None, None, None, None
        g_lp = None if g_lp is None else g_lp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        with torch.autocast(hidden.device.type, enabled=False):
            gh, gw = _chunked_backward(hidden, weight, targets, lse, ent, g_lp, g_ent, ctx.temperature,
                                       need_h, need_w, triton_dlogits=ctx.use_triton)
        return gh, gw, None, None, None, None


# ----------------------------------------------------------------------------- public API
def fused_linear_logprob(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(hidden @ weight.T / temperature)[targets], never materializing the ``[N, V]`` logits.

    hidden: [N, H] (or [..., H]), weight: [V, H] (the LM head, possibly tied to the embedding),
    targets: [N] (or [...]) integer ids in [0, V) (not checked: that would sync the GPU); bf16, fp16 or fp32 (mixed dtypes are promoted; under
    autocast both are cast to the autocast dtype, as ``torch.mm`` would be).
    Returns fp32 log-probs [N], or ``(logprobs, entropy)`` fp32 [N] each with ``return_entropy=True``.
    Differentiable in hidden and weight. impl: "auto" (Triton on CUDA, torch chunked elsewhere),
    "triton" or "torch".
    """
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"fused_linear_logprob: hidden [..., H] and weight [V, H] disagree: "
                         f"{tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"fused_linear_logprob: targets {tuple(targets.shape)} must be hidden's leading "
                         f"shape {tuple(hidden.shape[:-1])}")
    if not temperature > 0:
        raise ValueError(f"fused_linear_logprob: temperature must be > 0, got {temperature}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError("fused_linear_logprob: hidden and weight must be floating point")
    use_triton = resolve_impl(impl, hidden, weight, name="fused_linear_logprob") == "triton"

    lead = targets.shape
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype).contiguous()
    w = weight.to(dtype).contiguous()
    t = targets.reshape(-1).long().contiguous()
    with torch.autocast(device_type, enabled=False):
        out = _LinearLogprob.apply(h, w, t, float(temperature), bool(return_entropy), use_triton)
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)


# ----------------------------------------------------------------------------- Triton
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _logprob_fwd_kernel(
        h_ptr, w_ptr, tgt_ptr,  # [N, H], [V, H], [N]
        m_ptr, s_ptr, a_ptr, zt_ptr,  # partials [SPLITS, N] fp32
        N, V, H, stride_h, stride_w, inv_t,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
        UPCAST: tl.constexpr, ENTROPY: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One program: BLOCK_N tokens x one vocabulary split; online logsumexp over its vocab blocks."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        n_splits = tl.num_programs(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)

        n_vblocks = tl.cdiv(V, BLOCK_V)
        per_split = tl.cdiv(n_vblocks, n_splits)
        vb_lo = pid_s * per_split
        vb_hi = tl.minimum(vb_lo + per_split, n_vblocks)  # may be empty: the partials stay neutral

        # m starts at a finite "minus infinity": exp(m_old - m_new) is then 0 without an inf - inf = NaN.
        m = tl.full([BLOCK_N], -1.0e30, tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        a = tl.zeros([BLOCK_N], tl.float32)
        zt = tl.zeros([BLOCK_N], tl.float32)
        for vb in range(vb_lo, vb_hi):
            cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                k_ok = ks < H
                ht = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                wt = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                             mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                if UPCAST:  # the interpreter's bf16 arithmetic and bf16 tl.dot are broken
                    ht = ht.to(tl.float32)
                    wt = wt.to(tl.float32)
                acc = tl.dot(ht, tl.trans(wt), acc, input_precision=PRECISION)
            z = tl.where(col_ok[None, :], acc * inv_t, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])  # 0 on masked columns
            if ENTROPY:
                # a = sum exp(z - m)(z - m) about the *new* max: alpha * (a + (m_old - m_new) s) + block
                d = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
                a = alpha * (a + (m - m_new) * s) + tl.sum(e * d, axis=1)
            s = s * alpha + tl.sum(e, axis=1)
            m = m_new
            zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)

        out = pid_s * N + rows
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(zt_ptr + out, zt, mask=row_ok)
        if ENTROPY:
            tl.store(a_ptr + out, a, mask=row_ok)

    # GPU: tune the vocab/hidden tiles and pipelining per (V, H, BLOCK_N, dtypes). BLOCK_N is chosen by
    # the caller (it fixes the grid); the autotuner does not work under the interpreter. Each GPU tries the
    # configs that compile without a register spill for its architecture (``_fwd_configs_for``).
    _logprob_fwd_kernel_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_V": bv, "BLOCK_H": bh}, num_warps=w, num_stages=st)
                 for bv, bh, w, st in _FWD_TILES],
        key=["V", "H", "BLOCK_N", "ENTROPY"],
        prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: _fwd_configs_for(
            configs, torch.cuda.get_device_capability(nargs["h_ptr"].device)[0], bool(kw.get("ENTROPY")))},
    )(_logprob_fwd_kernel)

    @triton.jit
    def _dlogits_kernel(
        x_ptr, out_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
        C, V, stride_x, stride_out, inv_t,
        HAS_LP: tl.constexpr, HAS_ENT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """A [BLOCK_R, BLOCK_V] tile: raw logits -> dL/dlogits, one read and one write."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok = rows < C
        ok = row_ok[:, None] & (cols[None, :] < V)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        logp = x * inv_t - tl.load(lse_ptr + rows, mask=row_ok, other=0.0)[:, None]
        p = tl.exp(logp)
        dz = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
        if HAS_LP:
            g = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)[:, None]
            tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)[:, None]
            dz += g * (tl.where(cols[None, :] == tgt, 1.0, 0.0) - p)
        if HAS_ENT:
            ge = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)[:, None]
            ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)[:, None]
            dz -= ge * p * (logp + ent)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], (dz * inv_t).to(out_ptr.dtype.element_ty),
                 mask=ok)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _fwd_block_n(n: int) -> int:
    """Tokens per program of the compiled forward kernel (it fixes the grid, so it is no autotune key's
    choice); a pure function of N, shared with scripts/compile_kernels.py."""
    return min(128, max(16, triton.next_power_of_2(n)))


def _dlogits_tiles(interp: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps) of ``_dlogits_kernel``: few, large tiles in the interpreter."""
    return (16, 64, 8) if interp else (4, 1024, 8)


def _triton_forward(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, entropy: bool,
                    splits: int | None = None):
    """-> (logp [N], lse [N], entropy [N] or None), fp32, via the tiled online-logsumexp kernel.

    splits: vocabulary splits (the grid's second axis); None picks enough programs to fill the device.
    """
    n, hdim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    interp = interpreting() or dev.type != "cuda"
    if interp:  # one interpreted program iteration costs ~1 ms whatever the tile: few, large tiles
        block_n, tiles = min(32, max(16, triton.next_power_of_2(n))), {"BLOCK_V": 64, "BLOCK_H": 32}
        min_programs, min_split_cols = 4, 64  # a few splits so that the merge is exercised on CPU too
    else:
        block_n, tiles = _fwd_block_n(n), {}
        min_programs, min_split_cols = 2 * _num_sms(dev), 1024
    n_blocks = triton.cdiv(n, block_n)
    if splits is None:
        # Small N: split the vocabulary so that the grid fills the device (>= min_split_cols per split).
        splits = max(1, min(triton.cdiv(min_programs, n_blocks), triton.cdiv(v, min_split_cols)))
    part = torch.empty((4, splits, n), dtype=torch.float32, device=dev)
    m, s, a, zt = part.unbind(0)  # a is written only with ENTROPY
    if hidden.dtype == torch.float32 and not interp:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        precision = "ieee"  # ignored for 16-bit operands
    args = (hidden, weight, targets, m, s, a, zt, n, v, hdim, hidden.stride(0), weight.stride(0),
            1.0 / temperature)
    grid = (n_blocks, splits)
    if interp:
        _logprob_fwd_kernel[grid](*args, BLOCK_N=block_n, **tiles, UPCAST=True, ENTROPY=entropy,
                                  PRECISION=precision)
    else:
        _logprob_fwd_kernel_tuned[grid](*args, BLOCK_N=block_n, UPCAST=False, ENTROPY=entropy,
                                        PRECISION=precision)
    # Merge the splits: lse = M + log S with S = sum_k s_k exp(m_k - M); entropy = log S - A / S with
    # A = sum_k exp(m_k - M) (a_k + (m_k - M) s_k) = sum exp(z - M)(z - M); both terms are >= 0.
    big_m = m.max(0).values
    scale = torch.exp(m - big_m)
    big_s = (s * scale).sum(0)
    lse = big_m + big_s.log()
    logp = zt.sum(0) - lse
    ent = None
    if entropy:
        big_a = (scale * (a + (m - big_m) * s)).sum(0)
        ent = big_s.log() - big_a / big_s
    return logp, lse, ent


def _triton_dlogits(raw: Tensor, t: Tensor, lse: Tensor, ent: Tensor | None, g_lp: Tensor | None,
                    g_ent: Tensor | None, temperature: float, out_dtype: torch.dtype) -> Tensor:
    """raw fp32 logits [c, V] -> dL/dlogits [c, V] in out_dtype (in place when that is fp32)."""
    c, v = raw.shape
    interp = interpreting() or raw.device.type != "cuda"
    # The interpreter truncates fp32 -> bf16 stores: write fp32 there and round in torch.
    out = raw if (out_dtype == torch.float32 or interp) else torch.empty((c, v), dtype=out_dtype, device=raw.device)
    block_r, block_v, warps = _dlogits_tiles(interp)
    dummy = lse  # pointer for an absent operand (never read: its HAS_ flag is off)
    _dlogits_kernel[(triton.cdiv(c, block_r), triton.cdiv(v, block_v))](
        raw, out, t, lse, dummy if ent is None else ent, dummy if g_lp is None else g_lp,
        dummy if g_ent is None else g_ent, c, v, raw.stride(0), out.stride(0), 1.0 / temperature,
        HAS_LP=g_lp is not None, HAS_ENT=g_ent is not None, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps,
    )
    return out.to(out_dtype)


__all__ = ["CHUNK_BUDGET_BYTES", "fused_linear_logprob", "fused_linear_logprob_reference"]
