"""The critic's final RMSNorm fused with its value projection: hidden [N, H] -> values [N] float32.

    rstd_n = rsqrt(mean_h hidden_{n,h}^2 + eps)
    v_n    = sum_h (hidden_{n,h} * rstd_n * norm_weight_h) * head_weight_h + head_bias

Numerics. Everything is computed in float32 (float64 when ``hidden`` is float64): hidden and both weights
are upcast on load, and the normalized activations are never rounded. This is exactly Qwen3RMSNorm
followed by the float32 ``nn.Linear(H, 1)`` head for float32 inputs. For bf16/fp16 inputs Qwen3RMSNorm
rounds twice more (``(x * rstd).to(input_dtype)``, then ``weight * that`` in the weight's dtype) before the
head reads ``.float()``; we skip those roundings (more accurate, and within about one bf16 ulp of the
unfused path). ``value_head_reference`` computes the same float32 formula plainly in torch.

Memory. The forward reads hidden once (sum of squares and the weighted dot in the same pass, since rstd is
a per-row factor: v_n = rstd_n * sum_h x w u + b) and saves two float32 numbers per row, rstd_n and the raw
dot c_n = sum_h x_{n,h} w_h u_h. The backward recomputes everything else from hidden:

    g_n = dL/dv_n,  P_h = sum_n g_n rstd_n x_{n,h}
    dL/dx_{n,h}   = g_n rstd_n (w_h u_h - x_{n,h} rstd_n^2 c_n / H)
    dL/dw_h       = u_h P_h,   dL/du_h = w_h P_h,   dL/db = sum_n g_n

so no [N, H] activation is ever stored; the only [N, H] tensor is dL/dhidden itself. P is reduced over
rows by per-program partial sums ([G, H] float32, G row groups) and one torch ``.sum(0)``.
(w = norm_weight, u = head_weight.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import interpreting, resolve_impl, triton_available

__all__ = ["fused_value_head", "value_head_reference"]


def _acc_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def value_head_reference(
    hidden: Tensor,
    norm_weight: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | float | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Plain torch: RMSNorm then the value projection, all in float32 (float64 for float64 hidden).

    Materializes [N, H] float32 activations (autograd keeps them); the Triton path does not."""
    acc = _acc_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        x = hidden.to(acc)
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        normed = x * rstd * norm_weight.to(acc)
        out = (normed * head_weight.reshape(-1).to(acc)).sum(-1)
        if isinstance(head_bias, Tensor):
            out = out + head_bias.to(acc).reshape(())
        elif head_bias is not None:
            out = out + float(head_bias)
    return out


# ----------------------------------------------------------------------------------------- Triton
if triton_available():  # kernels are defined at import; TRITON_INTERPRET must be set before that
    import triton
    import triton.language as tl

    @triton.jit
    def _value_head_fwd_kernel(X, stride_x, W, U, B, Y, RSTD, DOT, N, H, eps,
                               HAS_BIAS: tl.constexpr, ACC: tl.constexpr, ACC_IS_FP64: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
        # one program per BLOCK_N rows; one pass over H: sum of squares and the weighted dot together
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        row_off = rows.to(tl.int64) * stride_x
        sumsq = tl.zeros([BLOCK_N], dtype=ACC)
        dot = tl.zeros([BLOCK_N], dtype=ACC)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
            u = tl.load(U + cols, mask=col_ok, other=0.0).to(ACC)
            x = tl.load(X + row_off[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0).to(ACC)
            sumsq += tl.sum(x * x, axis=1)
            dot += tl.sum(x * (w * u)[None, :], axis=1)
        if ACC_IS_FP64:
            rstd = 1.0 / tl.sqrt(sumsq / H + eps)  # sqrt_rn is float32-only; float64 sqrt is IEEE
        else:
            rstd = 1.0 / tl.sqrt_rn(sumsq / H + eps)  # tl.sqrt / tl.rsqrt are approximate in float32
        y = rstd * dot
        if HAS_BIAS:
            y += tl.load(B).to(ACC)
        tl.store(Y + rows, y, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)
        tl.store(DOT + rows, dot, mask=row_ok)

    @triton.jit
    def _value_head_bwd_kernel(X, stride_x, W, U, DY, RSTD, DOT, DX, stride_dx, PART, N, H, num_groups,
                               STORE_DX: tl.constexpr, ACC: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
        # program (g, j): rows g*BLOCK_N, (g+G)*BLOCK_N, ... x columns j*BLOCK_H ... (j+1)*BLOCK_H
        group = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
        u = tl.load(U + cols, mask=col_ok, other=0.0).to(ACC)
        wu = w * u
        p_acc = tl.zeros([BLOCK_H], dtype=ACC)
        for r0 in range(group * BLOCK_N, N, num_groups * BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            row_ok = rows < N
            tile_ok = row_ok[:, None] & col_ok[None, :]
            g = tl.load(DY + rows, mask=row_ok, other=0.0).to(ACC)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0).to(ACC)
            dot = tl.load(DOT + rows, mask=row_ok, other=0.0).to(ACC)
            x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=tile_ok,
                        other=0.0).to(ACC)
            gr = g * rstd
            p_acc += tl.sum(gr[:, None] * x, axis=0)
            if STORE_DX:
                coef = gr * rstd * rstd * dot / H
                dx = gr[:, None] * wu[None, :] - coef[:, None] * x
                tl.store(DX + rows.to(tl.int64)[:, None] * stride_dx + cols[None, :],
                         dx.to(DX.dtype.element_ty), mask=tile_ok)
        tl.store(PART + group.to(tl.int64) * H + cols, p_acc, mask=col_ok)


def _tl_acc(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _fwd_blocks(h: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_H, num_warps): fixed heuristics, no autotune (it fails in the interpreter)."""
    return 8, min(512, _next_pow2(h)), 4


def _bwd_blocks(n: int, h: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_H, num_groups, num_warps). Column blocks are independent given rstd and the dot;
    row groups loop over rows and keep a [BLOCK_H] partial of P in registers."""
    if device.type == "cuda":
        programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        programs = 2  # interpreter: still several row groups for tiny N
    return _bwd_blocks_for(n, h, programs)


def _bwd_blocks_for(n: int, h: int, programs: int) -> tuple[int, int, int, int]:
    """``_bwd_blocks`` as a pure function of the shape and the wanted number of programs (4 per SM on a
    GPU); scripts/compile_kernels.py calls it with a target's SM count."""
    block_n, block_h = 16, min(128, _next_pow2(h))
    n_col_blocks = -(-h // block_h)
    groups = max(1, min(-(-n // block_n), -(-programs // n_col_blocks)))
    return block_n, block_h, groups, 4


class _FusedValueHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, norm_weight: Tensor, head_weight: Tensor, head_bias: Tensor | None,
                eps: float) -> Tensor:
        acc = _acc_dtype(hidden)
        n, h = hidden.shape
        y = torch.empty(n, dtype=acc, device=hidden.device)
        rstd = torch.empty(n, dtype=acc, device=hidden.device)
        dot = torch.empty(n, dtype=acc, device=hidden.device)
        if n > 0:
            block_n, block_h, warps = _fwd_blocks(h)
            extra = {} if interpreting() else {"num_warps": warps}
            _value_head_fwd_kernel[(-(-n // block_n),)](
                hidden, hidden.stride(0), norm_weight, head_weight,
                head_bias if head_bias is not None else y,  # dummy pointer when there is no bias tensor
                y, rstd, dot, n, h, float(eps),
                HAS_BIAS=head_bias is not None, ACC=_tl_acc(acc), ACC_IS_FP64=acc == torch.float64,
                BLOCK_N=block_n, BLOCK_H=block_h, **extra)
        ctx.save_for_backward(hidden, norm_weight, head_weight, rstd, dot)
        ctx.bias_meta = (head_bias.shape, head_bias.dtype) if head_bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        hidden, norm_weight, head_weight, rstd, dot = ctx.saved_tensors
        n, h = hidden.shape
        acc = rstd.dtype
        need_x, need_w, need_u, need_b = ctx.needs_input_grad[:4]
        grad_y = grad_y.contiguous()
        dx = torch.empty_like(hidden) if need_x else None
        if need_x or need_w or need_u:
            block_n, block_h, groups, warps = _bwd_blocks(n, h, hidden.device)
            part = torch.zeros(groups, h, dtype=acc, device=hidden.device)
            if n > 0:
                extra = {} if interpreting() else {"num_warps": warps}
                _value_head_bwd_kernel[(groups, -(-h // block_h))](
                    hidden, hidden.stride(0), norm_weight, head_weight, grad_y, rstd, dot,
                    dx if need_x else hidden, dx.stride(0) if need_x else 0, part, n, h, groups,
                    STORE_DX=bool(need_x), ACC=_tl_acc(acc),
                    BLOCK_N=block_n, BLOCK_H=block_h, **extra)
            p = part.sum(0)
            dw = (head_weight.to(acc) * p).to(norm_weight.dtype) if need_w else None
            du = (norm_weight.to(acc) * p).to(head_weight.dtype) if need_u else None
        else:
            dw = du = None
        db = grad_y.sum().reshape(ctx.bias_meta[0]).to(ctx.bias_meta[1]) if need_b else None
        return dx, dw, du, db, None


def fused_value_head(
    hidden: Tensor,
    norm_weight: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | float | None = None,
    eps: float = 1e-6,
    impl: str = "auto",
) -> Tensor:
    """RMSNorm(hidden) @ head_weight + head_bias without materializing the normalized activations.

    hidden [..., H] (bf16 / fp16 / fp32 / fp64), norm_weight [H], head_weight [H] (or [1, H]), head_bias a
    0-d / 1-element tensor, a float, or None. Returns [...] float32 (float64 for float64 hidden);
    differentiable w.r.t. hidden, both weights and a tensor bias. ``impl``: "auto" (Triton on CUDA),
    "triton" or "torch" (``value_head_reference``).
    """
    h = hidden.shape[-1]
    head_weight_flat = head_weight.reshape(-1)
    if norm_weight.shape != (h,) or head_weight_flat.shape != (h,):
        raise ValueError(f"fused_value_head: hidden [..., {h}] needs norm_weight [{h}] and "
                         f"head_weight [{h}], got {tuple(norm_weight.shape)} and {tuple(head_weight.shape)}")
    if isinstance(head_bias, Tensor) and head_bias.numel() != 1:
        raise ValueError(f"fused_value_head: head_bias must have one element, "
                         f"got shape {tuple(head_bias.shape)}")
    tensors = [hidden, norm_weight, head_weight] + ([head_bias] if isinstance(head_bias, Tensor) else [])
    if resolve_impl(impl, *tensors, name="fused_value_head") == "torch":
        return value_head_reference(hidden, norm_weight, head_weight_flat, head_bias, eps)

    lead = hidden.shape[:-1]
    x = hidden.reshape(-1, h)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if head_bias is None or isinstance(head_bias, Tensor):
        bias_t = head_bias
    else:  # a python float: a constant on the device (a fill, no host-to-device copy), exact in float64
        bias_t = torch.full((), float(head_bias), dtype=_acc_dtype(hidden), device=hidden.device)
    y = _FusedValueHead.apply(x, norm_weight.contiguous(), head_weight_flat.contiguous(), bias_t, float(eps))
    return y.reshape(lead)
