"""Sequence-level losses on packed tokens: GSPO (TEMPO's M-step) and the sequence-clipped value loss
(E-step), equal in value and gradient to ``tempo_mega.algo.losses.gspo_policy_loss`` / ``critic_loss`` on
the padded layout (one row per sequence).

Packed layout: 1-D ``[N]`` token tensors and ``cu_seqlens`` int32 ``[S+1]`` (``cu_seqlens[0] == 0``,
``cu_seqlens[-1] == N``, non-decreasing); sequence s is tokens ``cu_seqlens[s] : cu_seqlens[s+1]``. Empty
sequences are allowed and, like rows without valid tokens in the references, do not count in the mean
over sequences. ``pack_padded`` / ``unpack_to_padded`` convert between the two layouts.

Kernels: one program per sequence loops over its tokens in blocks (pass 1: the sequence means; pass 2:
the token losses), fp32 accumulation (fp64 for fp64 inputs); the forward saves two numbers per sequence
and the backward recomputes the per-token terms from the inputs. Gradients:

GSPO, with S' the number of non-empty sequences, T_b the length of sequence b,
s_b = mean_t(logp - old), r_b = exp(min(s_b, 10)) (the reference's token log-ratio
sg(s_b) + logp_t - sg(logp_t) has the value s_b and the gradient 1 per token):

    dL/dlogp_t = 1/(S' T_b) * (-A_t r_b) * w_t * [s_b <= 10]
    w_t = 1 if lu > lc;  [r_b in [1-cl, 1+ch]] if lu < lc;  (1 + [r_b in range]) / 2 if lu == lc

with lu = -A_t r_b and lc = -A_t clamp(r_b, 1-cl, 1+ch) (torch.maximum splits ties 50/50; torch.clamp's
gradient is 1 on the closed range). No gradient reaches old_logprobs or advantages.

Value loss, with delta_b = mean_t V - mean_t V_old, off_b = clamp(delta_b, -c, c) - delta_b,
Vc_t = V_t + off_b, eu = (V - R)^2, ec = (Vc - R)^2, wu_t = [eu > ec] + [eu == ec]/2, wc_t = 1 - wu_t,
k_b = [-c <= delta_b <= c], C_b = sum_t wc_t (Vc_t - R_t):

    dL/dV_t = 1/(S' T_b) * (wu_t (V_t - R_t) + wc_t (Vc_t - R_t) + (k_b - 1) C_b / T_b)

(the last term is the gradient through delta_b, which only flows when the clamp is active).
No gradient reaches old_values or returns.

dtypes: the loss is float32 for bf16 / fp16 / fp32 inputs and float64 when any input is float64, in both
implementations (the torch references upcast before calling the algo functions); gradients come back in
the dtype of logprobs / values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tempo_mega.algo.losses import critic_loss, gspo_policy_loss

from ._common import interpreting, resolve_impl, triton_available

__all__ = [
    "gspo_loss",
    "gspo_loss_reference",
    "pack_padded",
    "seq_clipped_value_loss",
    "seq_clipped_value_loss_reference",
    "unpack_to_padded",
]

LOG_RATIO_CAP = 10.0  # gspo_policy_loss clamps the token log-ratio at most 10


# ----------------------------------------------------------------------------------------- layouts
def pack_padded(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """x [B, L], mask [B, L] -> (x[mask] [N] in row-major order, cu_seqlens int32 [B+1]).

    Every row is a sequence (rows without valid tokens become empty sequences). Differentiable in x."""
    if x.shape != mask.shape or x.dim() != 2:
        raise ValueError(f"pack_padded: x and mask must both be [B, L], "
                         f"got {tuple(x.shape)} and {tuple(mask.shape)}")
    m = mask.bool()
    cu = torch.zeros(x.shape[0] + 1, dtype=torch.int32, device=x.device)
    cu[1:] = m.sum(-1).cumsum(0)
    return x[m], cu


def unpack_to_padded(x_packed: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    """(x [N], cu_seqlens [S+1]) -> (x [S, Lmax] left-aligned with 0 padding, mask bool [S, Lmax]).

    Differentiable in x_packed. Syncs with the device (Lmax)."""
    _check_cu(x_packed.numel(), cu_seqlens, sync=True)
    lengths = cu_seqlens.diff().long()
    lmax = int(lengths.max()) if lengths.numel() else 0
    mask = torch.arange(lmax, device=x_packed.device)[None, :] < lengths.to(x_packed.device)[:, None]
    x = x_packed.new_zeros(mask.shape).masked_scatter(mask, x_packed)
    return x, mask


def _check_cu(n: int, cu: Tensor, *, sync: bool) -> None:
    if cu.dim() != 1 or cu.numel() < 1 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [S+1], got {cu.dtype} {tuple(cu.shape)}")
    if sync:  # value checks read the device; the kernel path does them on CPU only
        if int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu.diff() < 0).any()):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at N={n}, "
                             f"got {cu.tolist()}")


def _check_packed(name: str, cu: Tensor, *xs: Tensor) -> int:
    n = xs[0].numel()
    for x in xs:
        if x.dim() != 1 or x.numel() != n:
            raise ValueError(f"{name}: packed inputs must all be 1-D [N], got {[tuple(t.shape) for t in xs]}")
    if any(t.device != cu.device for t in xs):
        raise ValueError(f"{name}: cu_seqlens and the packed inputs must be on one device, "
                         f"got {cu.device} and {[str(t.device) for t in xs]}")
    _check_cu(n, cu, sync=not cu.is_cuda)
    return n


def _acc_dtype(*xs: Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


# ----------------------------------------------------------------------------------------- references
def gspo_loss_reference(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    cu_seqlens: Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 5e-4,
) -> Tensor:
    """``gspo_policy_loss`` on the padded equivalent (inputs upcast to float32, or float64)."""
    _check_packed("gspo_loss_reference", cu_seqlens, logprobs, old_logprobs, advantages)
    acc = _acc_dtype(logprobs, old_logprobs, advantages)
    lp, mask = unpack_to_padded(logprobs.to(acc), cu_seqlens)
    old, _ = unpack_to_padded(old_logprobs.detach().to(acc), cu_seqlens)
    adv, _ = unpack_to_padded(advantages.detach().to(acc), cu_seqlens)
    loss, _ = gspo_policy_loss(lp, old, adv, mask, clip_low=clip_low, clip_high=clip_high)
    return loss


def seq_clipped_value_loss_reference(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    cu_seqlens: Tensor,
    clip_range_value: float = 0.1,
) -> Tensor:
    """``critic_loss`` on the padded equivalent (inputs upcast to float32, or float64)."""
    _check_packed("seq_clipped_value_loss_reference", cu_seqlens, values, old_values, returns)
    acc = _acc_dtype(values, old_values, returns)
    v, mask = unpack_to_padded(values.to(acc), cu_seqlens)
    old, _ = unpack_to_padded(old_values.detach().to(acc), cu_seqlens)
    ret, _ = unpack_to_padded(returns.detach().to(acc), cu_seqlens)
    loss, _ = critic_loss(v, old, ret, mask, clip_range_value=clip_range_value)
    return loss


# ----------------------------------------------------------------------------------------- Triton
if triton_available():  # kernels are defined at import; TRITON_INTERPRET must be set before that
    import triton
    import triton.language as tl

    @triton.jit
    def _const(hi, lo, ACC: tl.constexpr):
        # Float constants arrive as two float32 scalars (hi + lo): exact in float32, ~1e-15 in float64.
        # (``+ zeros`` rather than ``.to``: the interpreter passes python floats, the compiler tensors.)
        return (hi + tl.zeros([], dtype=ACC)) + (lo + tl.zeros([], dtype=ACC))

    @triton.jit
    def _seq_bounds(CU, ACC: tl.constexpr):
        # this program's sequence: its index, token range [start, end) and length (>= 1, as a divisor)
        seq = tl.program_id(0)
        start = tl.load(CU + seq).to(tl.int64)
        end = tl.load(CU + seq + 1).to(tl.int64)
        return seq, start, end, tl.maximum(end - start, 1).to(ACC)

    @triton.jit
    def _gspo_ratios(seq_lr, lo_hi, lo_lo, hi_hi, hi_lo, ACC: tl.constexpr):
        # the sequence's ratio (log-ratio capped at 10), its clipped value and the clip bounds
        ratio = tl.exp(tl.minimum(seq_lr, 10.0))
        lo = _const(lo_hi, lo_lo, ACC)
        hi = _const(hi_hi, hi_lo, ACC)
        return ratio, tl.minimum(tl.maximum(ratio, lo), hi), lo, hi

    @triton.jit
    def _value_errors(V, RET, offs, ok, off, ACC: tl.constexpr):
        # per token: unclipped and clipped errors and their squares (the clip moves v by off)
        v = tl.load(V + offs, mask=ok, other=0.0).to(ACC)
        r = tl.load(RET + offs, mask=ok, other=0.0).to(ACC)
        e_u = v - r
        e_c = (v + off) - r
        return e_u, e_c, e_u * e_u, e_c * e_c

    @triton.jit
    def _gspo_fwd_kernel(LOGP, OLD, ADV, CU, SEQ_LR, ROW_LOSS, lo_hi, lo_lo, hi_hi, hi_lo,
                         ACC: tl.constexpr, BLOCK: tl.constexpr):
        seq, start, end, t_len = _seq_bounds(CU, ACC)
        acc = tl.zeros([BLOCK], dtype=ACC)
        for t0 in range(start, end, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            ok = offs < end
            lp = tl.load(LOGP + offs, mask=ok, other=0.0).to(ACC)
            old = tl.load(OLD + offs, mask=ok, other=0.0).to(ACC)
            acc += lp - old
        seq_lr = tl.sum(acc, axis=0) / t_len
        ratio, ratio_c, lo, hi = _gspo_ratios(seq_lr, lo_hi, lo_lo, hi_hi, hi_lo, ACC)
        acc2 = tl.zeros([BLOCK], dtype=ACC)
        for t0 in range(start, end, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            ok = offs < end
            a = tl.load(ADV + offs, mask=ok, other=0.0).to(ACC)
            acc2 += tl.maximum(-a * ratio, -a * ratio_c)  # a = 0 on masked lanes
        tl.store(SEQ_LR + seq, seq_lr)
        tl.store(ROW_LOSS + seq, tl.sum(acc2, axis=0) / t_len)

    @triton.jit
    def _gspo_bwd_kernel(ADV, CU, SEQ_LR, SCALE, DLOGP, lo_hi, lo_lo, hi_hi, hi_lo,
                         ACC: tl.constexpr, BLOCK: tl.constexpr):
        seq, start, end, t_len = _seq_bounds(CU, ACC)
        seq_lr = tl.load(SEQ_LR + seq).to(ACC)
        ratio, ratio_c, lo, hi = _gspo_ratios(seq_lr, lo_hi, lo_lo, hi_hi, hi_lo, ACC)
        inside = ((ratio >= lo) & (ratio <= hi)).to(ACC)
        uncapped = (seq_lr <= 10.0).to(ACC)
        coef = tl.load(SCALE).to(ACC) / t_len * uncapped * ratio
        for t0 in range(start, end, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            ok = offs < end
            a = tl.load(ADV + offs, mask=ok, other=0.0).to(ACC)
            lu = -a * ratio
            lc = -a * ratio_c
            w = tl.where(lu > lc, 1.0, tl.where(lu == lc, 0.5 + 0.5 * inside, inside))
            tl.store(DLOGP + offs, (-a * coef * w).to(DLOGP.dtype.element_ty), mask=ok)

    @triton.jit
    def _value_fwd_kernel(V, OLD, RET, CU, DELTA, CSUM, ROW_LOSS, c_hi, c_lo,
                          ACC: tl.constexpr, BLOCK: tl.constexpr):
        seq, start, end, t_len = _seq_bounds(CU, ACC)
        acc_v = tl.zeros([BLOCK], dtype=ACC)
        acc_o = tl.zeros([BLOCK], dtype=ACC)
        for t0 in range(start, end, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            ok = offs < end
            acc_v += tl.load(V + offs, mask=ok, other=0.0).to(ACC)
            acc_o += tl.load(OLD + offs, mask=ok, other=0.0).to(ACC)
        delta = tl.sum(acc_v, axis=0) / t_len - tl.sum(acc_o, axis=0) / t_len
        c = _const(c_hi, c_lo, ACC)
        off = tl.minimum(tl.maximum(delta, -c), c) - delta
        acc_l = tl.zeros([BLOCK], dtype=ACC)
        acc_c = tl.zeros([BLOCK], dtype=ACC)
        for t0 in range(start, end, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            ok = offs < end
            e_u, e_c, eu, ec = _value_errors(V, RET, offs, ok, off, ACC)
            wc = tl.where(ec > eu, 1.0, tl.where(ec == eu, 0.5, 0.0))
            acc_l += tl.where(ok, tl.maximum(eu, ec), 0.0)
            acc_c += tl.where(ok, wc * e_c, 0.0)
        tl.store(DELTA + seq, delta)
        tl.store(CSUM + seq, tl.sum(acc_c, axis=0))
        tl.store(ROW_LOSS + seq, 0.5 * (tl.sum(acc_l, axis=0) / t_len))

    @triton.jit
    def _value_bwd_kernel(V, RET, CU, DELTA, CSUM, SCALE, DV, c_hi, c_lo,
                          ACC: tl.constexpr, BLOCK: tl.constexpr):
        seq, start, end, t_len = _seq_bounds(CU, ACC)
        delta = tl.load(DELTA + seq).to(ACC)
        c = _const(c_hi, c_lo, ACC)
        off = tl.minimum(tl.maximum(delta, -c), c) - delta
        clamped = ((delta < -c) | (delta > c)).to(ACC)  # 1 - k_b
        corr = -clamped * tl.load(CSUM + seq).to(ACC) / t_len
        scale = tl.load(SCALE).to(ACC) / t_len
        for t0 in range(start, end, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            ok = offs < end
            e_u, e_c, eu, ec = _value_errors(V, RET, offs, ok, off, ACC)
            wu = tl.where(eu > ec, 1.0, tl.where(eu == ec, 0.5, 0.0))
            dv = scale * (wu * e_u + (1.0 - wu) * e_c + corr)
            tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=ok)


def _block(device: torch.device) -> int:
    """Tokens per block: 1024 on a GPU; 16 in the interpreter, so tiny test sequences still span blocks."""
    return 16 if interpreting() and device.type != "cuda" else 1024


def _f32_pair(x: float) -> tuple[float, float]:
    """x as hi + lo, both float32-representable: hi + lo rounds to float32(x) in float32 and is within
    ~1e-15 relative of x in float64 (Triton passes python floats as float32)."""
    hi = torch.tensor(x, dtype=torch.float32).item()
    lo = torch.tensor(x - hi, dtype=torch.float32).item()
    return hi, lo


def _tl_acc(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def _num_rows(cu: Tensor, acc: torch.dtype) -> Tensor:
    """max(1, number of non-empty sequences) as a 0-d ``acc`` tensor on the device (no sync)."""
    return (cu[1:] > cu[:-1]).sum().clamp(min=1).to(acc)


class _GSPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, cu: Tensor,
                clip_low: float, clip_high: float) -> Tensor:
        acc = _acc_dtype(logprobs, old_logprobs, advantages)
        s = cu.numel() - 1
        seq_lr = torch.zeros(s, dtype=acc, device=logprobs.device)
        row_loss = torch.zeros(s, dtype=acc, device=logprobs.device)
        consts = (*_f32_pair(1.0 - clip_low), *_f32_pair(1.0 + clip_high))
        if s > 0 and logprobs.numel() > 0:
            _gspo_fwd_kernel[(s,)](logprobs, old_logprobs, advantages, cu, seq_lr, row_loss, *consts,
                                   ACC=_tl_acc(acc), BLOCK=_block(logprobs.device))
        n_rows = _num_rows(cu, acc)
        ctx.save_for_backward(advantages, cu, seq_lr, n_rows)
        ctx.consts = consts
        ctx.logp_meta = (logprobs.shape, logprobs.dtype)
        return row_loss.sum() / n_rows

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        advantages, cu, seq_lr, n_rows = ctx.saved_tensors
        dlogp = None
        if ctx.needs_input_grad[0]:
            shape, dtype = ctx.logp_meta
            dlogp = torch.zeros(shape, dtype=dtype, device=advantages.device)
            s = cu.numel() - 1
            if s > 0 and dlogp.numel() > 0:
                scale = (grad_loss.to(seq_lr.dtype) / n_rows).reshape(1)
                _gspo_bwd_kernel[(s,)](advantages, cu, seq_lr, scale, dlogp, *ctx.consts,
                                       ACC=_tl_acc(seq_lr.dtype), BLOCK=_block(dlogp.device))
        return dlogp, None, None, None, None, None


class _SeqClippedValueLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, old_values: Tensor, returns: Tensor, cu: Tensor,
                clip_range_value: float) -> Tensor:
        acc = _acc_dtype(values, old_values, returns)
        s = cu.numel() - 1
        delta = torch.zeros(s, dtype=acc, device=values.device)
        csum = torch.zeros(s, dtype=acc, device=values.device)
        row_loss = torch.zeros(s, dtype=acc, device=values.device)
        consts = _f32_pair(clip_range_value)
        if s > 0 and values.numel() > 0:
            _value_fwd_kernel[(s,)](values, old_values, returns, cu, delta, csum, row_loss, *consts,
                                    ACC=_tl_acc(acc), BLOCK=_block(values.device))
        n_rows = _num_rows(cu, acc)
        ctx.save_for_backward(values, returns, cu, delta, csum, n_rows)
        ctx.consts = consts
        return row_loss.sum() / n_rows

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        values, returns, cu, delta, csum, n_rows = ctx.saved_tensors
        dv = None
        if ctx.needs_input_grad[0]:
            dv = torch.zeros_like(values)
            s = cu.numel() - 1
            if s > 0 and values.numel() > 0:
                scale = (grad_loss.to(delta.dtype) / n_rows).reshape(1)
                _value_bwd_kernel[(s,)](values, returns, cu, delta, csum, scale, dv, *ctx.consts,
                                        ACC=_tl_acc(delta.dtype), BLOCK=_block(values.device))
        return dv, None, None, None, None


def _prep(cu: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
    return (cu.contiguous(), *(x.contiguous() for x in xs))


def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    cu_seqlens: Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 5e-4,
    impl: str = "auto",
) -> Tensor:
    """GSPO policy loss on packed tokens: ``gspo_policy_loss`` on the padded layout, as a scalar.

    logprobs / old_logprobs / advantages [N], cu_seqlens int32 [S+1]. Differentiable w.r.t. logprobs
    only. ``impl``: "auto" (Triton on CUDA), "triton" or "torch" (``gspo_loss_reference``)."""
    _check_packed("gspo_loss", cu_seqlens, logprobs, old_logprobs, advantages)
    if resolve_impl(impl, logprobs, old_logprobs, advantages, cu_seqlens, name="gspo_loss") == "torch":
        return gspo_loss_reference(logprobs, old_logprobs, advantages, cu_seqlens, clip_low, clip_high)
    cu, lp, old, adv = _prep(cu_seqlens, logprobs, old_logprobs.detach(), advantages.detach())
    return _GSPOLoss.apply(lp, old, adv, cu, float(clip_low), float(clip_high))


def seq_clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    cu_seqlens: Tensor,
    clip_range_value: float = 0.1,
    impl: str = "auto",
) -> Tensor:
    """Sequence-clipped value loss on packed tokens: ``critic_loss`` on the padded layout, as a scalar.

    values / old_values / returns [N], cu_seqlens int32 [S+1]. Differentiable w.r.t. values only.
    ``impl``: "auto" (Triton on CUDA), "triton" or "torch" (``seq_clipped_value_loss_reference``)."""
    _check_packed("seq_clipped_value_loss", cu_seqlens, values, old_values, returns)
    if resolve_impl(impl, values, old_values, returns, cu_seqlens, name="seq_clipped_value_loss") == "torch":
        return seq_clipped_value_loss_reference(values, old_values, returns, cu_seqlens, clip_range_value)
    cu, v, old, ret = _prep(cu_seqlens, values, old_values.detach(), returns.detach())
    return _SeqClippedValueLoss.apply(v, old, ret, cu, float(clip_range_value))
