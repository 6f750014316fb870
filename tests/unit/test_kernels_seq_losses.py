"""Packed GSPO and sequence-clipped value losses (Triton) against the algo functions on the padded layout.

On CPU the Triton kernels run in the interpreter (tiny shapes, 16-token blocks so sequences span several
blocks); on a CUDA machine the same tests run the compiled kernels, plus the real-shape `gpu` tests.

Every kernel result is compared with ``gspo_policy_loss`` / ``critic_loss`` evaluated in float64 on a
padded copy of the kernel's own (already rounded) inputs, and with the packed torch references.
Tolerances:
    fp64 kernel: loss and grads rtol 1e-10, atol 1e-13 * scale
    fp32 kernel (fp32 or bf16 inputs; the loss is fp32 for both): loss rtol 1e-5; fp32 grads rtol 1e-5,
    atol 1e-6 * max |grad|
    bf16 grads (stored in the input dtype, truncated by the interpreter): rtol 2^-7 (one bf16 ulp),
    atol 1e-6 * max |grad|
"""

import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (the compiled kernels run on CUDA)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from tempo_mega.algo.losses import critic_loss, gspo_policy_loss  # noqa: E402

pytest.importorskip("triton")

from tempo_mega.kernels.seq_losses import (  # noqa: E402
    gspo_loss,
    gspo_loss_reference,
    pack_padded,
    seq_clipped_value_loss,
    seq_clipped_value_loss_reference,
    unpack_to_padded,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
LENGTHS = {
    "one-token": [1],
    "one-empty": [0],
    "ragged": [3, 0, 1, 40, 17],
    "ragged-2": [5, 1, 33, 16, 2, 0, 0, 48],
    "many": [int(x) for x in torch.randint(0, 40, (13,), generator=torch.Generator().manual_seed(0))],
}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.0**-7}


def cu_of(lengths):
    return torch.tensor([0, *lengths]).cumsum(0).to(torch.int32).to(DEVICE)


def assert_close(actual, expected, dtype, what="grad"):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    if dtype == torch.float64:
        rtol, atol = 1e-10, 1e-13 * max(scale, 1.0)
    elif what == "loss":
        rtol, atol = 1e-5, 1e-7
    else:
        rtol, atol = GRAD_RTOL[dtype], 1e-6 * scale
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def padded_algo(fn, x, other1, other2, cu, grad_scale=1.0, **kw):
    """Loss and d loss / dx of the algo function (float64) on the padded layout of the packed inputs."""
    x64 = x.detach().double().requires_grad_()
    xp, mask = unpack_to_padded(x64, cu)
    o1, _ = unpack_to_padded(other1.detach().double(), cu)
    o2, _ = unpack_to_padded(other2.detach().double(), cu)
    loss, _ = fn(xp, o1, o2, mask, **kw)
    (grad_scale * loss).backward()
    return loss.detach(), x64.grad


def kernel_run(fn, x, other1, other2, cu, grad_scale=1.0, **kw):
    x = x.detach().requires_grad_()
    loss = fn(x, other1, other2, cu, **kw)
    (grad_scale * loss).backward()
    return loss.detach(), x.grad


# ----------------------------------------------------------------------------- GSPO
def gspo_case(lengths, dtype, regime, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    if regime == "inside":  # |s_b| << 3e-4: no sequence clipped
        logp = old + 1e-6 * torch.randn(n, generator=g, dtype=torch.float64)
    elif regime == "clipped":  # spread ~1e-2: most sequences outside [1 - 3e-4, 1 + 5e-4]
        logp = old + 1e-2 * torch.randn(n, generator=g, dtype=torch.float64)
    else:  # "cap": alternate sequences around the log-ratio cap of 10 (above, below)
        seq_id = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        shift = torch.where(seq_id % 2 == 0, 10.5, 9.5).double()
        logp = old + shift + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    adv[::7] = 0.0  # A = 0: both branches tie
    return [t.to(dtype).to(DEVICE) for t in (logp, old, adv)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("regime", ["inside", "clipped", "cap"])
@pytest.mark.parametrize("case", list(LENGTHS))
def test_gspo_matches_padded_reference(case, regime, dtype):
    lengths = LENGTHS[case]
    cu = cu_of(lengths)
    logp, old, adv = gspo_case(lengths, dtype, regime, seed=len(lengths))
    loss, grad = kernel_run(gspo_loss, logp, old, adv, cu, grad_scale=1.7, impl="triton")
    ref_loss, ref_grad = padded_algo(gspo_policy_loss, logp, old, adv, cu, grad_scale=1.7)

    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.dim() == 0
    assert grad.dtype == dtype and grad.shape == logp.shape
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype)
    # and the packed torch reference (what impl="torch" runs) agrees too
    t_loss, t_grad = kernel_run(gspo_loss, logp, old, adv, cu, grad_scale=1.7, impl="torch")
    assert t_loss.dtype == loss.dtype
    assert_close(t_loss, ref_loss, dtype, "loss")
    assert_close(t_grad, ref_grad, dtype)


def test_gspo_regimes_do_what_they_say():
    """The clipped and cap cases really clip / cap (so the tests above cover those branches)."""
    lengths = LENGTHS["ragged-2"]
    cu = cu_of(lengths)
    bounds = [(a, b) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()) if b > a]
    seq_lr = lambda lp, old: torch.stack([(lp - old)[a:b].mean() for a, b in bounds])  # noqa: E731
    logp, old, _ = gspo_case(lengths, torch.float64, "clipped", seed=1)
    r = seq_lr(logp, old).exp()
    assert ((r < 1 - 3e-4) | (r > 1 + 5e-4)).sum() >= 3 and ((r >= 1 - 3e-4) & (r <= 1 + 5e-4)).sum() >= 1
    logp, old, _ = gspo_case(lengths, torch.float64, "cap", seed=1)
    s = seq_lr(logp, old)
    assert (s > 10).any() and (s < 10).any()
    logp, old, adv = gspo_case(lengths, torch.float64, "cap", seed=1)
    _, grad = kernel_run(gspo_loss, logp, old, adv, cu, impl="triton")
    capped = [(a, b) for a, b in bounds if (logp - old)[a:b].mean() > 10]
    assert capped
    for a, b in capped:
        assert torch.all(grad[a:b] == 0)  # no gradient above the cap


def test_gspo_inside_clip_range_is_plain_policy_gradient():
    """No clipping: dL/dlogp_t = -A_t r_b / (S' T_b) (a closed form, independent of the algo code)."""
    lengths = [4, 9, 1]
    cu = cu_of(lengths)
    logp, old, adv = gspo_case(lengths, torch.float64, "inside", seed=4)
    _, grad = kernel_run(gspo_loss, logp, old, adv, cu, impl="triton")
    expected = torch.empty_like(grad)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        r = (logp[a:b] - old[a:b]).mean().exp()
        expected[a:b] = -adv[a:b] * r / (len(lengths) * (b - a))
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


def test_gspo_no_grad_to_old_or_advantages_and_custom_clips():
    lengths = [6, 0, 11]
    cu = cu_of(lengths)
    logp, old, adv = gspo_case(lengths, torch.float64, "clipped", seed=5)
    old, adv = old.clone().requires_grad_(), adv.clone().requires_grad_()
    lp = logp.clone().requires_grad_()
    gspo_loss(lp, old, adv, cu, clip_low=2e-3, clip_high=1e-2, impl="triton").backward()
    assert old.grad is None and adv.grad is None and lp.grad is not None
    ref_loss, ref_grad = padded_algo(gspo_policy_loss, logp, old, adv, cu, clip_low=2e-3, clip_high=1e-2)
    assert_close(lp.grad, ref_grad, torch.float64)


# ----------------------------------------------------------------------------- value loss
def value_case(lengths, dtype, regime, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    values = torch.randn(n, generator=g, dtype=torch.float64)
    returns = values + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    if regime == "inside":  # |delta_b| < 0.1
        old = values + 0.02 * torch.randn(n, generator=g, dtype=torch.float64)
    else:  # "clipped": delta_b around +-0.3, both signs, so V_clip is both above and below V
        seq_id = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        shift = torch.where(seq_id % 2 == 0, 0.3, -0.3).double()
        old = values + shift + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    return [t.to(dtype).to(DEVICE) for t in (values, old, returns)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("regime", ["inside", "clipped"])
@pytest.mark.parametrize("case", list(LENGTHS))
def test_value_loss_matches_padded_reference(case, regime, dtype):
    lengths = LENGTHS[case]
    cu = cu_of(lengths)
    values, old, returns = value_case(lengths, dtype, regime, seed=len(lengths))
    loss, grad = kernel_run(seq_clipped_value_loss, values, old, returns, cu, grad_scale=0.6, impl="triton")
    ref_loss, ref_grad = padded_algo(critic_loss, values, old, returns, cu, grad_scale=0.6)

    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.dim() == 0
    assert grad.dtype == dtype and grad.shape == values.shape
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype)
    t_loss, t_grad = kernel_run(seq_clipped_value_loss, values, old, returns, cu, grad_scale=0.6,
                                impl="torch")
    assert_close(t_loss, ref_loss, dtype, "loss")
    assert_close(t_grad, ref_grad, dtype)


def test_value_loss_clipped_rows_have_the_row_mean_gradient_term():
    """With the clamp active the gradient is not per-token: it has the (k - 1) C_b / T_b term, so it is
    not (V - R) or (V_clip - R) alone. Check against autograd through critic_loss, and that the
    clamp is indeed active (and that the closed form without the term would be wrong)."""
    lengths = [7, 12]
    cu = cu_of(lengths)
    values, old, returns = value_case(lengths, torch.float64, "clipped", seed=3)
    _, grad = kernel_run(seq_clipped_value_loss, values, old, returns, cu, impl="triton")
    _, ref_grad = padded_algo(critic_loss, values, old, returns, cu)
    assert_close(grad, ref_grad, torch.float64)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        delta = values[a:b].mean() - old[a:b].mean()
        assert delta.abs() > 0.1
        v_clip = values[a:b] + delta.clamp(-0.1, 0.1) - delta
        per_token = torch.maximum(values[a:b] - returns[a:b], v_clip - returns[a:b])  # wrong on purpose
        assert not torch.allclose(grad[a:b], per_token / (2 * (b - a)))


def test_value_loss_delta_exactly_at_the_clip_bound():
    """delta_b == c: torch.clamp passes the gradient on the closed range, so no row-mean term."""
    cu = cu_of([1, 2])
    values = torch.tensor([0.25, 0.75, 0.25], dtype=torch.float64, device=DEVICE)
    old = torch.tensor([0.0, 0.25, 0.25], dtype=torch.float64, device=DEVICE)  # delta = 0.25, 0.25
    returns = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64, device=DEVICE)
    for dtype in (torch.float64, torch.float32):
        args = [t.to(dtype) for t in (values, old, returns)]
        loss, grad = kernel_run(seq_clipped_value_loss, *args, cu, clip_range_value=0.25, impl="triton")
        ref_loss, ref_grad = padded_algo(critic_loss, *args, cu, clip_range_value=0.25)
        assert_close(loss, ref_loss, dtype, "loss")
        assert_close(grad, ref_grad, dtype)


# ----------------------------------------------------------------------------- layout helpers, API
def test_pack_padded_with_holes_matches_algo_on_the_padded_batch():
    """A padded batch whose mask has holes and NaN at masked positions: packing then the kernel equals the
    algo function on the padded batch, value and gradient w.r.t. the padded tensor."""
    g = torch.Generator().manual_seed(7)
    b, length = 5, 23
    mask = torch.rand(b, length, generator=g) < 0.6
    mask[2] = False  # an empty row
    logp = (-torch.rand(b, length, generator=g, dtype=torch.float64) * 2).to(DEVICE)
    old = (logp + 1e-2 * torch.randn(b, length, generator=g, dtype=torch.float64).to(DEVICE)).masked_fill(
        ~mask.to(DEVICE), float("nan"))
    adv = torch.randn(b, length, generator=g, dtype=torch.float64).to(DEVICE)
    mask = mask.to(DEVICE)

    lp = logp.clone().requires_grad_()
    lp_packed, cu = pack_padded(lp, mask)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *mask.sum(-1).cumsum(0).tolist()]
    loss = gspo_loss(lp_packed, pack_padded(old, mask)[0], pack_padded(adv, mask)[0], cu, impl="triton")
    loss.backward()
    lp_ref = logp.clone().requires_grad_()
    ref_loss, _ = gspo_policy_loss(lp_ref, old, adv, mask)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lp.grad, lp_ref.grad, rtol=1e-10, atol=1e-14)

    v = torch.randn(b, length, generator=g, dtype=torch.float64).to(DEVICE)
    ov = v + 0.3 * torch.randn(b, length, generator=g, dtype=torch.float64).to(DEVICE)
    ret = torch.randn(b, length, generator=g, dtype=torch.float64).to(DEVICE)
    v1, v2 = v.clone().requires_grad_(), v.clone().requires_grad_()
    vp, cu = pack_padded(v1, mask)
    loss = seq_clipped_value_loss(vp, pack_padded(ov, mask)[0], pack_padded(ret, mask)[0], cu, impl="triton")
    loss.backward()
    ref_loss, _ = critic_loss(v2, ov, ret, mask)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v1.grad, v2.grad, rtol=1e-10, atol=1e-14)


def test_unpack_roundtrip():
    lengths = [3, 0, 5, 1]
    cu = cu_of(lengths)
    x = torch.arange(9.0, device=DEVICE)
    padded, mask = unpack_to_padded(x, cu)
    assert padded.shape == (4, 5) and mask.sum(-1).tolist() == lengths
    assert padded[2].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0] and padded[1].tolist() == [0.0] * 5
    x2, cu2 = pack_padded(padded, mask)
    assert torch.equal(x2, x) and torch.equal(cu2, cu)
    empty, m0 = unpack_to_padded(torch.zeros(0, device=DEVICE), cu_of([]))
    assert empty.shape == (0, 0) and m0.shape == (0, 0)


@pytest.mark.parametrize("lengths", [[], [0, 0]])
def test_no_tokens_gives_zero_loss(lengths):
    cu = cu_of(lengths)
    z = torch.zeros(0, device=DEVICE)
    for fn in (gspo_loss, seq_clipped_value_loss):
        for impl in ("triton", "torch"):
            x = z.clone().requires_grad_()
            loss = fn(x, z, z, cu, impl=impl)
            assert loss.item() == 0.0
            loss.backward()
            assert x.grad.shape == (0,)


def test_dispatch_and_validation():
    cu = cu_of([2, 3])
    x = torch.randn(5, device=DEVICE)
    assert torch.equal(gspo_loss(x, x, x, cu, impl="torch"), gspo_loss_reference(x, x, x, cu))
    assert torch.equal(seq_clipped_value_loss(x, x, x, cu, impl="torch"),
                       seq_clipped_value_loss_reference(x, x, x, cu))
    torch.testing.assert_close(gspo_loss(x, x, x, cu, impl="auto"), gspo_loss_reference(x, x, x, cu))
    with pytest.raises(ValueError, match="impl"):
        gspo_loss(x, x, x, cu, impl="fast")
    with pytest.raises(ValueError, match="1-D"):
        seq_clipped_value_loss(x, x[:4], x, cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        gspo_loss(x, x, x, cu.float())
    if DEVICE == "cpu":  # value checks need a device sync; the kernel path does them on CPU only
        with pytest.raises(ValueError, match="end at N"):
            gspo_loss(x, x, x, cu_of([2, 2]), impl="triton")


def test_which_path_ran(monkeypatch):
    """impl="torch" runs the packed torch reference, impl="triton" the kernel, "auto" the reference on
    CPU tensors and the kernel on CUDA ones: a record of the calls (the results agree)."""
    import tempo_mega.kernels.seq_losses as sl_mod

    called = []
    for name in ("gspo_loss_reference", "seq_clipped_value_loss_reference"):
        real = getattr(sl_mod, name)
        monkeypatch.setattr(sl_mod, name, lambda *a, _real=real, _name=name, **k: called.append(_name) or _real(*a, **k))
    cu = cu_of([2, 3])
    x = torch.randn(5, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    for fn, name in ((gspo_loss, "gspo_loss_reference"), (seq_clipped_value_loss, "seq_clipped_value_loss_reference")):
        for impl, runs_reference in (("torch", True), ("triton", False), ("auto", DEVICE == "cpu")):
            called.clear()
            fn(x, x, x, cu, impl=impl)
            assert called == ([name] if runs_reference else []), (name, impl)

# ----------------------------------------------------------------------------- real shapes (GPU)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_shape_16k_sequences_gpu(dtype):
    """16 sequences of up to 16K tokens (ragged, one empty), fp32 / bf16, against float64 algo."""
    g = torch.Generator().manual_seed(12)
    lengths = [16384, 16000, 1, 0, *torch.randint(1, 16385, (12,), generator=g).tolist()]
    cu = cu_of(lengths)
    for regime in ("clipped", "cap"):
        logp, old, adv = gspo_case(lengths, dtype, regime, seed=13)
        loss, grad = kernel_run(gspo_loss, logp, old, adv, cu, impl="triton")
        ref_loss, ref_grad = padded_algo(gspo_policy_loss, logp, old, adv, cu)
        assert_close(loss, ref_loss, dtype, "loss")
        assert_close(grad, ref_grad, dtype)
    for regime in ("inside", "clipped"):
        values, old, returns = value_case(lengths, dtype, regime, seed=14)
        loss, grad = kernel_run(seq_clipped_value_loss, values, old, returns, cu, impl="triton")
        ref_loss, ref_grad = padded_algo(critic_loss, values, old, returns, cu)
        assert_close(loss, ref_loss, dtype, "loss")
        assert_close(grad, ref_grad, dtype)
