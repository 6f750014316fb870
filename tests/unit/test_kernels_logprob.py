"""fused_linear_logprob against the full-logits reference: forward and backward, Triton and torch chunked.

On CPU the Triton kernels run under Triton's interpreter (set below, before anything imports triton).
Tolerances (``assert_close``: |x - ref| <= atol * max|ref| + rtol * |ref|, atol relative to the scale):

| quantity                      | fp32 inputs            | bf16 inputs                                  |
|-------------------------------|------------------------|----------------------------------------------|
| logprobs, entropy (fp32 out)  | atol 2e-6, rtol 1e-5   | same: fp32 math on the same bf16 inputs      |
| grad hidden, grad weight      | atol 2e-6, rtol 1e-5   | rtol 2**-7 (one bf16 ulp), atol 1e-5         |
| GPU, real shapes (bf16)       | -                      | logprobs atol 2e-3 abs; grads atol 2**-6     |

The bf16 reference is computed in fp32 from the same bf16-rounded inputs, so on CPU (where the
chunked GEMMs upcast to fp32) a bf16 gradient differs from it by its final rounding only.
"""

import os

import torch  # (does not import triton)

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # before anything imports triton; with a GPU the Triton tests run compiled, on CUDA tensors
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tempo_mega.kernels import logprob as lp_mod  # noqa: E402
from tempo_mega.kernels.logprob import fused_linear_logprob, fused_linear_logprob_reference  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

CHUNK_ROWS = 4  # the chunked paths are tested with 4-token chunks: N = 37 -> 10 chunks

TOL = {  # (device, dtype) -> (atol for outputs, rtol for outputs, atol for grads, rtol for grads)
    ("cpu", torch.float32): (2e-6, 1e-5, 2e-6, 1e-5),
    ("cpu", torch.bfloat16): (2e-6, 1e-5, 1e-5, 2**-7),
    # compiled on a GPU: another summation order; bf16 dlogits feed the backward GEMMs
    ("cuda", torch.float32): (1e-5, 1e-5, 1e-5, 1e-5),
    ("cuda", torch.bfloat16): (1e-5, 1e-5, 2**-7, 2**-7),
}


def device_for(impl):
    """Triton runs compiled on CUDA tensors when there is a GPU, interpreted on CPU tensors otherwise."""
    if impl == "triton":
        pytest.importorskip("triton")
        return "cuda" if ON_GPU else "cpu"
    return "cpu"


def assert_close(actual, ref, atol, rtol, what):
    actual, ref = actual.float(), ref.float()
    scale = ref.abs().max().clamp_min(1.0) if ref.numel() else torch.tensor(1.0)
    err = (actual - ref).abs()
    bound = atol * scale + rtol * ref.abs()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert (err <= bound).all(), f"{what}: max error {err.max():.3g} (worst excess {(err - bound).max():.3g})"


def make_case(n, h, v, dtype, seed=0, logit_scale=3.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * logit_scale / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return tuple(t.to(device) for t in (hidden, weight, targets, g_lp, g_ent))


def run(fn, hidden, weight, targets, temperature, entropy, g_lp, g_ent, **kw):
    """(logp, entropy or None, grad_hidden, grad_weight) for loss = <g_lp, logp> + <g_ent, entropy>."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w, targets, temperature, entropy, **kw)
    lp, ent = out if entropy else (out, None)
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0.0)
    loss.backward()
    return lp.detach(), None if ent is None else ent.detach(), h.grad, w.grad


def reference(hidden, weight, targets, temperature, entropy, g_lp, g_ent):
    """The reference on fp32 copies of the (possibly bf16-rounded) inputs."""
    return run(fused_linear_logprob_reference, hidden.float(), weight.float(), targets, temperature, entropy,
               g_lp, g_ent)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force CHUNK_ROWS tokens per chunk whatever V is."""
    real = lp_mod._chunk_rows
    monkeypatch.setattr(lp_mod, "_chunk_rows", lambda n, v: min(real(n, v), CHUNK_ROWS))


# ----------------------------------------------------------------------------- the sweep
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 5, 37])
@pytest.mark.parametrize("h", [16, 40])
@pytest.mark.parametrize("v", [50, 130])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [False, True], ids=["lp", "lp+ent"])
def test_matches_reference(small_chunks, impl, dtype, n, h, v, temperature, entropy):
    device = device_for(impl)
    hidden, weight, targets, g_lp, g_ent = make_case(n, h, v, dtype, seed=n * 1000 + h * 10 + v, device=device)
    lp, ent, gh, gw = run(fused_linear_logprob, hidden, weight, targets, temperature, entropy, g_lp, g_ent,
                          impl=impl)
    r_lp, r_ent, r_gh, r_gw = reference(hidden, weight, targets, temperature, entropy, g_lp, g_ent)
    atol, rtol, g_atol, g_rtol = TOL[device, dtype]
    assert lp.dtype == torch.float32 and lp.shape == (n,)
    assert gh.dtype == dtype and gw.dtype == dtype
    assert_close(lp, r_lp, atol, rtol, "logprobs")
    if entropy:
        assert ent.dtype == torch.float32 and ent.shape == (n,)
        assert_close(ent, r_ent, atol, rtol, "entropy")
    assert_close(gh, r_gh, g_atol, g_rtol, "grad hidden")
    assert_close(gw, r_gw, g_atol, g_rtol, "grad weight")


# ----------------------------------------------------------------------------- the reference itself
def test_reference_against_torch_losses():
    hidden, weight, targets, _, _ = make_case(6, 8, 11, torch.float64)
    lp, ent = fused_linear_logprob_reference(hidden, weight, targets, 0.5, return_entropy=True)
    logits = (hidden @ weight.T / 0.5).float()
    torch.testing.assert_close(lp, -F.cross_entropy(logits, targets, reduction="none"))
    torch.testing.assert_close(ent, torch.distributions.Categorical(logits=logits).entropy())


# ----------------------------------------------------------------------------- chunking and memory
def test_torch_path_really_chunks(small_chunks, monkeypatch):
    """Every logits slab has at most CHUNK_ROWS rows, forward and backward."""
    n, v = 37, 130
    shapes = []
    real = lp_mod._Gemms.logits
    monkeypatch.setattr(lp_mod._Gemms, "logits", lambda self, h: shapes.append(tuple(h.shape)) or real(self, h))
    hidden, weight, targets, g_lp, g_ent = make_case(n, 16, v, torch.float32)
    run(fused_linear_logprob, hidden, weight, targets, 1.0, True, g_lp, g_ent, impl="torch")
    n_chunks = -(-n // CHUNK_ROWS)
    assert len(shapes) == 2 * n_chunks  # forward, then recomputed in backward
    assert max(rows for rows, _ in shapes) == CHUNK_ROWS and sum(r for r, _ in shapes) == 2 * n


def test_chunk_rows_follow_the_budget(monkeypatch):
    monkeypatch.setattr(lp_mod, "CHUNK_BUDGET_BYTES", 3 * 4 * 1000)
    assert lp_mod._chunk_rows(100, 1000) == 3  # three fp32 rows of V = 1000
    assert lp_mod._chunk_rows(2, 1000) == 2  # never more than N
    assert lp_mod._chunk_rows(100, 10**9) == 1  # at least one row
    monkeypatch.undo()
    assert lp_mod._chunk_rows(16384, 151936) * 151936 * 4 <= 256 * 2**20


class _LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any aten op returns (CPU-friendly memory bound)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_full_logits_never_exist(small_chunks, impl):
    """No op, forward or backward, produces N*V elements; the reference does (so the probe can fail).

    (Triton kernels are not aten ops: the probe sees their partials and everything torch does around them.)
    """
    n, h, v = 64, 16, 130  # N*V = 8320 > the largest legitimate tensor: V*H = 2080 (grad weight)
    hidden, weight, targets, g_lp, g_ent = make_case(n, h, v, torch.float32, device=device_for(impl))
    allowed = 4 * max(CHUNK_ROWS * v, v * h, n * h)  # fp32 bytes
    assert allowed < 4 * n * v
    with _LargestTensor() as probe:
        run(fused_linear_logprob, hidden, weight, targets, 1.0, True, g_lp, g_ent, impl=impl)
    assert probe.largest <= allowed, f"a tensor of {probe.largest} B (bound {allowed} B, logits {4 * n * v} B)"
    with _LargestTensor() as probe:
        reference(hidden, weight, targets, 1.0, True, g_lp, g_ent)
    assert probe.largest >= 4 * n * v


# ----------------------------------------------------------------------------- Triton specifics
@pytest.mark.parametrize("splits", [1, 2, 3, 4])  # V = 130 is 3 interpreter vocab blocks: 4 leaves one empty
def test_triton_vocab_splits_merge(splits):
    hidden, weight, targets, _, _ = make_case(5, 40, 130, torch.float32, seed=splits, device=device_for("triton"))
    lp, lse, ent = lp_mod._triton_forward(hidden, weight, targets, 0.7, True, splits=splits)
    r_lp, r_ent = fused_linear_logprob_reference(hidden, weight, targets, 0.7, True)
    logits = hidden @ weight.T / 0.7
    atol, rtol = TOL[hidden.device.type, torch.float32][:2]
    assert_close(lse, logits.logsumexp(-1), atol, rtol, "lse")
    assert_close(lp, r_lp, atol, rtol, "logprobs")
    assert_close(ent, r_ent, atol, rtol, "entropy")


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("used", ["lp", "ent"])
def test_one_output_unused(small_chunks, impl, used):
    """With return_entropy=True and only one output in the loss, the other's gradient is None inside."""
    hidden, weight, targets, g_lp, g_ent = make_case(9, 16, 50, torch.float32, seed=3, device=device_for(impl))
    zero = torch.zeros_like(g_lp)
    g = (g_lp, zero) if used == "lp" else (zero, g_ent)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    lp, ent = fused_linear_logprob(h, w, targets, 0.7, return_entropy=True, impl=impl)
    ((lp * g[0]).sum() if used == "lp" else (ent * g[1]).sum()).backward()
    _, _, r_gh, r_gw = reference(hidden, weight, targets, 0.7, True, *g)
    _, _, g_atol, g_rtol = TOL[hidden.device.type, torch.float32]
    assert_close(h.grad, r_gh, g_atol, g_rtol, "grad hidden")
    assert_close(w.grad, r_gw, g_atol, g_rtol, "grad weight")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_extreme_logits_stay_finite(impl):
    """Logits of a few hundred: no overflow; a near one-hot distribution has entropy ~ 0, never < 0."""
    hidden, weight, targets, g_lp, g_ent = make_case(7, 16, 130, torch.float32, seed=5, logit_scale=100.0,
                                                     device=device_for(impl))
    lp, ent, gh, gw = run(fused_linear_logprob, hidden, weight, targets, 1.0, True, g_lp, g_ent, impl=impl)
    r_lp, r_ent, r_gh, r_gw = reference(hidden, weight, targets, 1.0, True, g_lp, g_ent)
    assert (ent >= 0).all()
    assert_close(lp, r_lp, 1e-6, 1e-5, "logprobs")  # scale ~ 100s: 1e-4 absolute
    assert_close(ent, r_ent, 1e-4, 1e-4, "entropy")
    assert_close(gh, r_gh, 1e-5, 1e-4, "grad hidden")
    assert_close(gw, r_gw, 1e-5, 1e-4, "grad weight")


def test_leading_dims_frozen_weight_and_empty():
    hidden, weight, targets, _, _ = make_case(6, 16, 50, torch.float32)
    h = hidden.clone().requires_grad_()
    lp = fused_linear_logprob(h.view(2, 3, 16), weight, targets.view(2, 3), impl="torch")
    assert lp.shape == (2, 3)
    lp.sum().backward()  # weight does not require grad: only hidden gets one
    r_h = hidden.clone().requires_grad_()
    fused_linear_logprob_reference(r_h, weight, targets).sum().backward()
    assert_close(h.grad, r_h.grad, 2e-6, 1e-5, "grad hidden")
    assert_close(lp.detach().view(-1), fused_linear_logprob_reference(hidden, weight, targets), 2e-6, 1e-5, "lp")
    empty = fused_linear_logprob(hidden[:0], weight, targets[:0], return_entropy=True, impl="torch")
    assert empty[0].shape == (0,) and empty[1].shape == (0,)


def test_autocast_casts_like_a_matmul():
    """Under CPU autocast (bf16), fp32 inputs are computed as their bf16 roundings, like lm_head would be."""
    hidden, weight, targets, _, _ = make_case(5, 16, 50, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = fused_linear_logprob(hidden, weight, targets, impl="torch")
    expect = fused_linear_logprob_reference(hidden.bfloat16().float(), weight.bfloat16().float(), targets)
    assert_close(lp, expect, 2e-6, 1e-5, "logprobs")


def test_bad_inputs_raise():
    hidden, weight, targets, _, _ = make_case(4, 16, 50, torch.float32)
    with pytest.raises(ValueError, match="disagree"):
        fused_linear_logprob(hidden, weight[:, :8], targets)
    with pytest.raises(ValueError, match="targets"):
        fused_linear_logprob(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprob(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="impl"):
        fused_linear_logprob(hidden, weight, targets, impl="cuda")


def test_auto_is_torch_on_cpu(monkeypatch):
    called = []
    real = lp_mod._torch_forward
    monkeypatch.setattr(lp_mod, "_torch_forward", lambda *a: called.append(1) or real(*a))
    hidden, weight, targets, _, _ = make_case(4, 16, 50, torch.float32)
    fused_linear_logprob(hidden, weight, targets)
    assert called == [1]


# ----------------------------------------------------------------------------- GPU, real shapes
def _reference_in_slices(hidden, weight, targets, temperature, g_lp, g_ent, rows=1024):
    """The reference applied to token slices (the full [N, V] autograd graph would not fit)."""
    w = weight.detach().float().requires_grad_()
    lps, ents, ghs = [], [], []
    for i in range(0, hidden.shape[0], rows):
        h = hidden[i : i + rows].detach().float().requires_grad_()
        lp, ent = fused_linear_logprob_reference(h, w, targets[i : i + rows], temperature, True)
        ((lp * g_lp[i : i + rows]).sum() + (ent * g_ent[i : i + rows]).sum()).backward()
        lps.append(lp.detach())
        ents.append(ent.detach())
        ghs.append(h.grad)
    return torch.cat(lps), torch.cat(ents), torch.cat(ghs), w.grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_real_shape_gpu(impl):
    """N = 16384, H = 4096, V = 151936 (Qwen) in bf16: values, grads and peak memory."""
    if impl == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process (set by another test module?): Triton is not compiled")
    if impl == "triton":
        pytest.importorskip("triton")
    n, h, v, temperature = 16384, 4096, 151936, 0.7
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(v, h, device="cuda", generator=g) * 3 / h**0.5).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    g_lp, g_ent = torch.randn(n, device="cuda", generator=g), torch.randn(n, device="cuda", generator=g)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent, gh, gw = run(fused_linear_logprob, hidden, weight, targets, temperature, True, g_lp, g_ent, impl=impl)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # copies of hidden/weight and their grads (~2.6 GB), the fp32 grad-weight accumulator (2.5 GB),
    # slabs of 256 MiB; the fp32 logits alone would be n * v * 4 = 10 GB.
    assert extra < 0.75 * n * v * 4, f"peak extra memory {extra / 2**30:.2f} GiB"

    r_lp, r_ent, r_gh, r_gw = _reference_in_slices(hidden, weight, targets, temperature, g_lp, g_ent)
    assert_close(lp, r_lp, 2e-3 / 20, 0, "logprobs")  # |logp| ~ 20: 2e-3 absolute
    assert_close(ent, r_ent, 2e-3 / 20, 0, "entropy")
    assert_close(gh, r_gh, 2**-6, 2**-7, "grad hidden")
    assert_close(gw, r_gw, 2**-6, 2**-7, "grad weight")


class _FirstSlab(Exception):
    """Raised in place of the first logits GEMM: the chunk loop's choices are visible, no slab is made."""


def test_real_chunking_at_qwen_vocab(monkeypatch):
    """The real _chunk_rows (no small_chunks fixture) at Qwen's V = 151936 and the real budget, where the
    budget binds: an int (range() takes no float), the most rows whose fp32 [rows, V] slab fits
    CHUNK_BUDGET_BYTES, and computed from V, not H, in forward and backward."""
    n, h, v = 16384, 2, 151936
    rows = lp_mod._chunk_rows(n, v)
    assert type(rows) is int
    assert rows * 4 * v <= lp_mod.CHUNK_BUDGET_BYTES < (rows + 1) * 4 * v
    assert rows < n  # the budget binds here, unlike at test shapes
    seen = []

    def first_slab(self, hidden_chunk):
        seen.append(tuple(hidden_chunk.shape))
        raise _FirstSlab

    monkeypatch.setattr(lp_mod._Gemms, "logits", first_slab)
    hidden, weight = torch.zeros(n, h), torch.zeros(v, h)
    targets = torch.zeros(n, dtype=torch.long)
    with pytest.raises(_FirstSlab):
        fused_linear_logprob(hidden, weight, targets, impl="torch")
    with pytest.raises(_FirstSlab):
        lp_mod._chunked_backward(hidden, weight, targets, torch.zeros(n), None, torch.ones(n), None, 1.0,
                                 need_hidden=True, need_weight=True, triton_dlogits=False)
    assert seen == [(rows, h), (rows, h)]
