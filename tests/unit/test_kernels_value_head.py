"""fused_value_head (RMSNorm + value projection, Triton) against its torch reference and Qwen3's modules.

On CPU the Triton kernels run in the interpreter (tiny shapes); on a CUDA machine the same tests run the
compiled kernels on the GPU, plus the real-shape `gpu` tests.

Tolerances (kernel vs the float64 reference evaluated on the kernel's own, already-rounded inputs):
    fp64 kernel: rtol 1e-10, atol 1e-12 (values and all grads)
    fp32 kernel and fp32 grads: rtol 1e-5, atol 1e-5 * max|ref|
    bf16 / fp16 grads (dL/dhidden, dL/dnorm_weight, stored in the input dtype): rtol 2^-7 (one bf16 ulp:
    the interpreter truncates fp32 -> bf16), atol 1e-5 * max|ref|; fp16 rtol 2^-10
The output is fp32 for 16-bit inputs and computed from exactly upcast inputs, so it gets fp32 tolerances.
"""

import math
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (the compiled kernels run on CUDA)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from tempo_mega.kernels.value_head import fused_value_head, value_head_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
BIAS_KINDS = ("tensor1", "tensor0d", "float", "none")


def make_inputs(n, h, dtype, bias_kind="tensor1", seed=0, weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    weight_dtype = weight_dtype or dtype
    head_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the head is kept in fp32
    hidden = (torch.randn(n, h, generator=g, dtype=torch.float64) * 3).to(dtype)
    norm_w = (1 + 0.3 * torch.randn(h, generator=g, dtype=torch.float64)).to(weight_dtype)
    head_w = (torch.randn(h, generator=g, dtype=torch.float64) / h**0.5).to(head_dtype)
    bias = {
        "tensor1": torch.tensor([0.37], dtype=head_dtype),
        "tensor0d": torch.tensor(-0.21, dtype=head_dtype),
        "float": 0.125,
        "none": None,
    }[bias_kind]
    out = [t.to(DEVICE).requires_grad_() for t in (hidden, norm_w, head_w)]
    if isinstance(bias, torch.Tensor):
        bias = bias.to(DEVICE).requires_grad_()
    return (*out, bias)


def run(fn, hidden, norm_w, head_w, bias, grad_out, **kw):
    """Output and grads of (hidden, norm_w, head_w, bias) for a given upstream gradient."""
    leaves = [t for t in (hidden, norm_w, head_w, bias) if isinstance(t, torch.Tensor)]
    for t in leaves:
        t.grad = None
    y = fn(hidden, norm_w, head_w, bias, **kw)
    y.backward(grad_out.to(y.dtype))
    grads = [t.grad.clone() if t.grad is not None else None for t in leaves]
    for t in leaves:
        t.grad = None
    return y.detach(), grads


def reference64(hidden, norm_w, head_w, bias, grad_out, eps=1e-6):
    """The reference in float64 on the same (already-rounded) inputs."""
    h = hidden.detach().double().requires_grad_()
    w = norm_w.detach().double().requires_grad_()
    u = head_w.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_() if isinstance(bias, torch.Tensor) else bias
    return run(value_head_reference, h, w, u, b, grad_out, eps=eps)


def assert_close(actual, expected, rtol, atol_rel, scale=None):
    """|actual - expected| <= rtol |expected| + atol_rel * scale (default scale: max |expected|)."""
    actual, expected = actual.double(), expected.double()
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol_rel * max(scale, 1e-30))


def dx_scale(hidden, norm_w, head_w, grad_out, eps=1e-6):
    """Size of the terms dL/dhidden is a difference of (g rstd w u): the yardstick for its atol, since
    the difference itself can cancel to ~0 (e.g. H = 1, where dL/dx ~ eps / x^2)."""
    x = hidden.detach().double()
    rstd = torch.rsqrt(x.pow(2).mean(-1) + eps)
    wu = norm_w.detach().double() * head_w.detach().double().reshape(-1)
    return ((grad_out.double() * rstd).abs().max() * wu.abs().max()).item()


SHAPES = [(1, 1), (1, 7), (5, 64), (37, 100), (19, 300), (3, 600)]  # H not a multiple of the blocks;
# 300 spans 3 backward column blocks, 600 two forward H-iterations; 37 rows span 3 row blocks.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n,h", SHAPES)
def test_forward_backward_match_reference(n, h, dtype):
    inputs = make_inputs(n, h, dtype, bias_kind=BIAS_KINDS[(n + h) % 4], seed=n * 1000 + h)
    grad_out = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    y, grads = run(fused_value_head, *inputs, grad_out, impl="triton")
    y_ref, grads_ref = reference64(*inputs, grad_out)

    assert y.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and y.shape == (n,)
    out_rtol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(y, y_ref, out_rtol, out_rtol)
    names = ["hidden", "norm_weight", "head_weight", "head_bias"]
    scales = [dx_scale(*inputs[:3], grad_out), None, None, None]
    for name, g, g_ref, t, scale in zip(names, grads, grads_ref, inputs, scales):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close(g, g_ref, GRAD_RTOL[t.dtype], 1e-10 if t.dtype == torch.float64 else 1e-5, scale)


@pytest.mark.parametrize("bias_kind", BIAS_KINDS)
def test_bias_kinds_and_eps(bias_kind):
    inputs = make_inputs(6, 40, torch.float32, bias_kind=bias_kind, seed=3)
    grad_out = torch.randn(6, dtype=torch.float64).to(DEVICE)
    y, grads = run(fused_value_head, *inputs, grad_out, eps=1e-2, impl="triton")
    y_ref, grads_ref = reference64(*inputs, grad_out, eps=1e-2)
    assert_close(y, y_ref, 1e-5, 1e-5)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, 1e-5, 1e-5)
    if bias_kind == "tensor1":
        assert grads[3].shape == (1,)
        assert_close(grads[3], grad_out.sum().reshape(1), 1e-6, 1e-6)


def test_gradcheck_float64():
    hidden, norm_w, head_w, bias = make_inputs(4, 10, torch.float64, seed=5)
    fn = lambda x, w, u, b: fused_value_head(x, w, u, b, impl="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, norm_w, head_w, bias), eps=1e-6, atol=1e-8)


def test_mixed_dtypes_like_the_critic():
    """bf16 hidden and RMSNorm weight, fp32 head (ValueHeadModel); head_weight given as [1, H]."""
    hidden, norm_w, head_w, bias = make_inputs(9, 48, torch.bfloat16, seed=7)
    head_w2 = head_w.detach().reshape(1, -1).requires_grad_()
    grad_out = torch.randn(9, dtype=torch.float64).to(DEVICE)
    y, grads = run(fused_value_head, hidden, norm_w, head_w2, bias, grad_out, impl="triton")
    y_ref, grads_ref = reference64(hidden, norm_w, head_w, bias, grad_out)
    assert_close(y, y_ref, 1e-5, 1e-5)
    assert grads[2].shape == (1, 48) and grads[2].dtype == torch.float32
    assert_close(grads[2].reshape(-1), grads_ref[2], 1e-5, 1e-5)
    assert_close(grads[0], grads_ref[0], 2.0**-7, 1e-5)


def test_leading_dims_and_empty():
    hidden, norm_w, head_w, bias = make_inputs(12, 24, torch.float32, seed=8)
    x = hidden.detach().reshape(3, 4, 24)
    y = fused_value_head(x, norm_w.detach(), head_w.detach(), bias.detach(), impl="triton")
    assert y.shape == (3, 4)
    assert_close(y.reshape(-1), value_head_reference(hidden.detach(), norm_w.detach(), head_w.detach(),
                                                     bias.detach()), 1e-6, 1e-6)
    empty = torch.zeros(0, 24, device=DEVICE, requires_grad=True)
    w = norm_w.detach().requires_grad_()
    y0 = fused_value_head(empty, w, head_w.detach(), None, impl="triton")
    assert y0.shape == (0,)
    y0.sum().backward()
    assert empty.grad.shape == (0, 24) and torch.equal(w.grad, torch.zeros_like(w))


def test_only_weight_grads():
    """hidden without requires_grad: the kernel skips dL/dhidden and still gives the weight grads."""
    hidden, norm_w, head_w, bias = make_inputs(7, 33, torch.float32, seed=9)
    x = hidden.detach()
    grad_out = torch.randn(7, dtype=torch.float64).to(DEVICE)
    _, grads = run(fused_value_head, x, norm_w, head_w, bias, grad_out, impl="triton")
    _, grads_ref = reference64(hidden, norm_w, head_w, bias, grad_out)
    assert grads[0] is None
    for g, g_ref in zip(grads[1:], grads_ref[1:]):
        assert_close(g, g_ref, 1e-5, 1e-5)


def test_matches_qwen3_rmsnorm_and_linear_head():
    """Qwen3RMSNorm then nn.Linear(H, 1) in fp32 is the same function; in bf16 Qwen3RMSNorm rounds the
    normalized activations to bf16 (twice) before the fp32 head, the fused kernel does not."""
    qwen3 = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    h = 64
    norm = qwen3.Qwen3RMSNorm(h, eps=1e-6).to(DEVICE)
    head = torch.nn.Linear(h, 1, dtype=torch.float32).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(h))
    x = torch.randn(11, h, device=DEVICE) * 2
    with torch.no_grad():
        ref = head(norm(x).float()).squeeze(-1)
        out = fused_value_head(x, norm.weight, head.weight[0], head.bias, eps=norm.variance_epsilon,
                               impl="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    xb, norm_b = x.bfloat16(), norm.to(torch.bfloat16)
    with torch.no_grad():
        ref_b = head(norm_b(xb).float()).squeeze(-1)  # the unfused critic path (score on normed hidden)
        out_b = fused_value_head(xb, norm_b.weight, head.weight[0], head.bias, impl="triton")
        exact_b = value_head_reference(xb.double(), norm_b.weight.double(), head.weight[0].double(),
                                       head.bias.double())
    torch.testing.assert_close(out_b.double(), exact_b, rtol=1e-5, atol=1e-5)
    # Qwen3RMSNorm rounds x * rstd to bf16, then w * that to bf16 again (relative 2^-9 each, round to
    # nearest): per row the gap is at most 2^-8 * sum_h |w_h u_h x_h rstd| (+ fp32 summation noise)
    xd = xb.double()
    wu = norm_b.weight.double() * head.weight[0].double()
    terms = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * wu
    bound = 2.0**-8 * terms.abs().sum(-1) + 1e-5
    assert ((out_b - ref_b).abs().double() <= bound).all()
    assert not torch.equal(out_b, ref_b)  # the roundings are real: the two paths do differ in bf16


def test_dispatch():
    hidden, norm_w, head_w, bias = make_inputs(4, 16, torch.float32, seed=10)
    args = [t.detach() for t in (hidden, norm_w, head_w, bias)]
    ref = value_head_reference(*args)
    torch.testing.assert_close(fused_value_head(*args, impl="torch"), ref)
    torch.testing.assert_close(fused_value_head(*args, impl="auto"), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="impl"):
        fused_value_head(*args, impl="cuda")
    with pytest.raises(ValueError, match="norm_weight"):
        fused_value_head(args[0], args[1][:-1], args[2], args[3])
    with pytest.raises(ValueError, match="one element"):
        fused_value_head(args[0], args[1], args[2], torch.zeros(2))


def test_which_path_ran(monkeypatch):
    """impl="torch" runs value_head_reference, impl="triton" the kernel, "auto" the reference on CPU
    tensors and the kernel on CUDA ones. The results agree, so only a record of the calls tells
    (as test_kernels_logprob's test_auto_is_torch_on_cpu does)."""
    import tempo_mega.kernels.value_head as vh_mod

    called = []
    real = vh_mod.value_head_reference
    monkeypatch.setattr(vh_mod, "value_head_reference", lambda *a, **k: called.append(1) or real(*a, **k))
    args = [t.detach() for t in make_inputs(4, 16, torch.float32, seed=11)]
    fused_value_head(*args, impl="torch")
    assert called == [1]
    fused_value_head(*args, impl="triton")
    assert called == [1]
    fused_value_head(*args, impl="auto")
    assert called == ([1, 1] if DEVICE == "cpu" else [1])


def test_reference_with_leading_dims():
    """value_head_reference on [2, 3, H] hidden: every reduction is over the last dim (a 2-D test cannot
    tell dim 1 from dim -1), against the formula per row in python floats."""
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 2
    norm_w = 1 + 0.3 * torch.randn(5, generator=g, dtype=torch.float64)
    head_w = torch.randn(1, 5, generator=g, dtype=torch.float64)  # nn.Linear(H, 1).weight's shape
    out = value_head_reference(hidden, norm_w, head_w, torch.tensor([0.25], dtype=torch.float64), eps=1e-6)
    assert out.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            x = hidden[i, j].tolist()
            rstd = 1 / math.sqrt(sum(v * v for v in x) / 5 + 1e-6)
            expected = sum(v * rstd * w * u for v, w, u in zip(x, norm_w.tolist(), head_w[0].tolist())) + 0.25
            assert float(out[i, j]) == pytest.approx(expected, rel=1e-12)
    via_public = fused_value_head(hidden, norm_w, head_w, 0.25, impl="torch")
    assert torch.equal(via_public, out)

# ----------------------------------------------------------------------------- real shapes (GPU)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_shape_bf16_gpu():
    """Qwen3-14B critic: N = 131072 tokens, H = 5120, bf16 hidden. Values and grads against the fp32
    reference, and no [N, H] fp32 activation: peak extra memory ~ dL/dhidden (bf16) + O(N + G*H)."""
    n, h = 131072, 5120
    hidden, norm_w, head_w, bias = make_inputs(n, h, torch.bfloat16, seed=11)
    grad_out = torch.randn(n, device=DEVICE, dtype=torch.float64) / n
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y, grads = run(fused_value_head, hidden, norm_w, head_w, bias, grad_out, impl="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n * h * 2 * 1.2 + (64 << 20), f"fused value head used {extra / 2**30:.2f} GiB"
    y_ref, grads_ref = run(value_head_reference, hidden, norm_w, head_w, bias, grad_out)
    assert_close(y, y_ref, 1e-4, 1e-4)
    # both sides rounded to bf16 (and reduced in different orders over 131072 rows): 2 bf16 ulps
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, 2.0**-6 if g.dtype == torch.bfloat16 else 1e-4, 1e-4)
