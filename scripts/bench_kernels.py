"""Benchmark the Triton kernels of ``tempo_mega.kernels`` against their torch references (CUDA only).

For every kernel, shape and mode ("fwd": forward without autograd, "fwd+bwd": forward and backward of
a scalar built from the output) it prints and, with ``--csv PATH``, writes:

  ms              median time of the fused kernel (triton.testing.do_bench)
  bytes, t_min    min_bytes() of the mode (fwd, or fwd + bwd) and the time to move them at the card's
                  peak HBM bandwidth (``--card``: h200 4.8, h100 3.35, a100 2.039, b200 8 TB/s, from
                  tempo_mega.plan.CARDS; default the CUDA device's name; ``--peak-gbps`` overrides)
  % of peak       100 * t_min / ms (equally: achieved GB/s over the peak)
  TFLOP/s         fused_linear_logprob only (it is GEMM-bound, so %peak bandwidth is low by design)
  x eager         speedup over the torch reference run eagerly
  x compile       speedup over torch.compile(reference)
  x liger         fused_linear_logprob only: speedup over Liger-Kernel's fused linear cross entropy
                  (reduction="sum", fwd+bwd only since Liger computes its gradients in the forward),
                  when ``liger_kernel`` is installed
  MiB / ref MiB   peak memory above the inputs (torch.cuda.max_memory_allocated) for fused / reference

Kernel modules load lazily; a kernel whose module (or function) is missing is skipped with one line.
Without CUDA the script prints one line and exits 0: it never reports CPU numbers as kernel timings.
``--check`` instead runs every case once at toy shapes on CPU (no timings) to test this script's wiring;
``--model`` prints the bandwidth model (bytes and t_min at the GPU shapes) anywhere, without timing.

    python scripts/bench_kernels.py --csv bench_kernels.csv
    python scripts/bench_kernels.py --kernels fused_linear_logprob --modes fwd+bwd
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

KERNELS = ("fused_linear_logprob", "fused_value_head", "gspo_loss", "seq_clipped_value_loss")
MODES = ("fwd", "fwd+bwd")


# ----------------------------------------------------------------------------- bytes moved
def min_bytes(kernel: str, dims: dict[str, int], elt: int, direction: str) -> int:
    """The HBM bytes one direction ("fwd" or "bwd") of the fused kernel cannot avoid: each input it needs
    read once and each output written once (what it saves for the backward counts as a forward output and
    a backward input; intermediates such as per-program partials do not count). ``elt`` is the element
    size of the main activations (2 for bf16; the token tensors of the sequence losses, 4 in this
    benchmark). Ids are int64 (8 B), cu_seqlens int32, statistics and log-probs fp32.

    fused_linear_logprob (N, H, V, entropy e in {0, 1}):
        fwd reads hidden N*H*elt, weight V*H*elt, targets 8N; writes logp 4N, lse 4N, entropy 4N*e.
        bwd reads hidden, weight, targets, lse 4N, the logp gradient 4N (and with e: entropy 4N and its
        gradient 4N); writes grad_hidden N*H*elt, grad_weight V*H*elt.
        (GEMM-bound: 2NVH FLOPs fwd, 8NVH fwd+bwd with the recomputation; see flops().)
    fused_value_head (N, H; norm and head weights fp32 here, 4H each):
        fwd reads hidden N*H*elt, both weights 8H, the bias 4; writes values 4N, rstd and dot 8N.
        bwd reads hidden N*H*elt, rstd and dot 8N, the values' gradient 4N, both weights 8H;
        writes grad_hidden N*H*elt and both weight gradients 8H.
    gspo_loss (N tokens, S sequences):
        fwd reads logprobs, old_logprobs, advantages 3*elt*N, cu_seqlens 4(S+1); writes the per-sequence
        log-ratio and loss 8S.
        bwd reads advantages elt*N, cu_seqlens, the log-ratios 4S; writes grad_logprobs elt*N.
    seq_clipped_value_loss (N, S):
        fwd reads values, old_values, returns 3*elt*N, cu_seqlens 4(S+1); writes delta, the clipped-error
        sum and the loss per sequence 12S.
        bwd reads values and returns 2*elt*N, cu_seqlens, delta and the sum 8S; writes grad_values elt*N.
    """
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"min_bytes: direction must be 'fwd' or 'bwd', got {direction!r}")
    fwd = direction == "fwd"
    if kernel == "fused_linear_logprob":
        n, h, v, e = dims["N"], dims["H"], dims["V"], int(bool(dims.get("entropy")))
        reads = n * h * elt + v * h * elt + 8 * n
        if fwd:
            return reads + 4 * n * (2 + e)
        return reads + 4 * n + 4 * n + e * 8 * n + n * h * elt + v * h * elt
    if kernel == "fused_value_head":
        n, h = dims["N"], dims["H"]
        if fwd:
            return n * h * elt + 8 * h + 4 + 4 * n + 8 * n
        return n * h * elt + 8 * n + 4 * n + 8 * h + n * h * elt + 8 * h
    if kernel == "gspo_loss":
        n, s = dims["N"], dims["S"]
        if fwd:
            return 3 * elt * n + 4 * (s + 1) + 8 * s
        return elt * n + 4 * (s + 1) + 4 * s + elt * n
    if kernel == "seq_clipped_value_loss":
        n, s = dims["N"], dims["S"]
        if fwd:
            return 3 * elt * n + 4 * (s + 1) + 12 * s
        return 2 * elt * n + 4 * (s + 1) + 8 * s + elt * n
    raise ValueError(f"min_bytes: unknown kernel {kernel!r}")


def bytes_moved(kernel: str, dims: dict[str, int], elt: int, mode: str) -> int:
    """min_bytes of a benchmark mode: "fwd" the forward alone, "fwd+bwd" the forward plus the backward."""
    if mode not in MODES:
        raise ValueError(f"bytes_moved: mode must be one of {MODES}, got {mode!r}")
    total = min_bytes(kernel, dims, elt, "fwd")
    return total + min_bytes(kernel, dims, elt, "bwd") if mode == "fwd+bwd" else total


def time_at_peak_ms(nbytes: int, bytes_per_s: float) -> float:
    """The least time, in ms, to move nbytes at a card's peak HBM bandwidth."""
    return nbytes / bytes_per_s * 1e3


# ----------------------------------------------------------------------------- cards
CARD_ALIASES = {"h200": "h200-141gb", "h100": "h100-80gb", "a100": "a100-80gb", "b200": "b200"}


def resolve_card(name: str | None, device_name: str | None = None) -> str:
    """A tempo_mega.plan.CARDS key: ``name`` (a key or an alias: h200, h100, a100, b200) if given, else the
    card ``device_name`` (torch.cuda.get_device_name()) names, else h200."""
    from tempo_mega.plan import CARDS, card_for_device_name

    if name is not None:
        key = CARD_ALIASES.get(name.lower(), name.lower())
        if key not in CARDS:
            raise ValueError(f"unknown card {name!r}: one of {sorted(CARD_ALIASES)} or {sorted(CARDS)}")
        return key
    if device_name:
        return card_for_device_name(device_name)
    return "h200-141gb"


def flops(kernel: str, dims: dict[str, int], mode: str) -> float | None:
    """Matmul FLOPs actually executed (fused_linear_logprob only; the others are bandwidth-bound)."""
    if kernel != "fused_linear_logprob":
        return None
    gemm = 2.0 * dims["N"] * dims["V"] * dims["H"]
    return gemm if mode == "fwd" else 4 * gemm  # backward: recompute + grad_hidden + grad_weight


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    kernel: str
    dims: dict[str, int]
    dtype: torch.dtype
    make: Callable[[], dict[str, Tensor]]  # fresh inputs on the device
    fused: Callable[[dict[str, Tensor]], Tensor]  # -> output
    reference: Callable[[dict[str, Tensor]], Tensor]
    grad_inputs: tuple[str, ...]  # the inputs that require grad in fwd+bwd
    liger: Callable[[dict[str, Tensor]], Tensor] | None = None  # -> scalar loss (fwd+bwd only)

    @property
    def shape(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.dims.items())


def _scalar(out: Tensor | tuple[Tensor, Tensor], x: dict[str, Tensor]) -> Tensor:
    """A scalar with a non-trivial upstream gradient: the loss itself, <g, out>, or <g, logp> + <g1, entropy>."""
    if isinstance(out, tuple):
        return (out[0] * x["g"]).sum() + (out[1] * x["g1"]).sum()
    return out if out.dim() == 0 else (out * x["g"]).sum()


def _load(module: str, *names: str):
    """The named functions of tempo_mega.kernels.<module>, or None (with a line saying why)."""
    try:
        mod = importlib.import_module(f"tempo_mega.kernels.{module}")
        return tuple(getattr(mod, n) for n in names)
    except (ImportError, AttributeError) as e:
        print(f"skip {module}: {type(e).__name__}: {e}")
        return None


def _liger_flce():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def logprob_cases(shapes, device, dtype) -> list[Case]:
    fns = _load("logprob", "fused_linear_logprob", "fused_linear_logprob_reference")
    if fns is None:
        return []
    fused_fn, ref_fn = fns
    liger = _liger_flce()
    cases = []
    for n, h, v, entropy in shapes:
        def make(n=n, h=h, v=v):
            g = torch.Generator(device=device).manual_seed(0)
            return {
                "hidden": torch.randn(n, h, device=device, generator=g).to(dtype),
                "weight": (torch.randn(v, h, device=device, generator=g) * 3 / h**0.5).to(dtype),
                "targets": torch.randint(0, v, (n,), device=device, generator=g),
                "g": torch.randn(n, device=device, generator=g),
                "g1": torch.randn(n, device=device, generator=g),
            }

        def fused(x, entropy=entropy):
            return fused_fn(x["hidden"], x["weight"], x["targets"], 1.0, entropy)

        def reference(x, entropy=entropy):
            return ref_fn(x["hidden"], x["weight"], x["targets"], 1.0, entropy)

        def liger_loss(x):
            out = liger(x["hidden"], x["weight"], x["targets"], reduction="sum")
            return out[0] if isinstance(out, tuple) else out

        cases.append(Case("fused_linear_logprob", case_dims("fused_linear_logprob", (n, h, v, entropy)), dtype,
                          make, fused, reference, ("hidden", "weight"),
                          liger=liger_loss if liger is not None and not entropy else None))
    return cases


def value_head_cases(shapes, device, dtype) -> list[Case]:
    fns = _load("value_head", "fused_value_head", "value_head_reference")
    if fns is None:
        return []
    fused_fn, ref_fn = fns
    cases = []
    for n, h in shapes:
        def make(n=n, h=h):
            g = torch.Generator(device=device).manual_seed(0)
            return {
                "hidden": torch.randn(n, h, device=device, generator=g).to(dtype),
                "norm_weight": 1 + 0.1 * torch.randn(h, device=device, generator=g),
                "head_weight": torch.randn(h, device=device, generator=g) / h**0.5,
                "head_bias": torch.zeros(1, device=device),
                "g": torch.randn(n, device=device, generator=g),
            }

        def fused(x):
            return fused_fn(x["hidden"], x["norm_weight"], x["head_weight"], x["head_bias"], 1e-6)

        def reference(x):
            return ref_fn(x["hidden"], x["norm_weight"], x["head_weight"], x["head_bias"], 1e-6)

        cases.append(Case("fused_value_head", {"N": n, "H": h}, dtype, make, fused, reference,
                          ("hidden", "norm_weight", "head_weight")))
    return cases


def seq_loss_cases(kernel, shapes, device) -> list[Case]:
    fns = _load("seq_losses", kernel, f"{kernel}_reference")
    if fns is None:
        return []
    fused_fn, ref_fn = fns
    cases = []
    for n, s in shapes:
        def make(n=n, s=s):
            g = torch.Generator(device=device).manual_seed(0)
            # S sequences of random lengths summing to N (at least one token each)
            cuts = torch.randperm(n - 1, device=device, generator=g)[: s - 1].sort().values + 1
            cu = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), n)]).to(torch.int32)
            first = -torch.rand(n, device=device, generator=g) * 3
            return {
                "x": first + 1e-3 * torch.randn(n, device=device, generator=g),
                "old": first,
                "third": torch.randn(n, device=device, generator=g),  # advantages / returns
                "cu": cu,
            }

        def fused(x):
            return fused_fn(x["x"], x["old"], x["third"], x["cu"])

        def reference(x):
            return ref_fn(x["x"], x["old"], x["third"], x["cu"])

        cases.append(Case(kernel, {"N": n, "S": s}, torch.float32, make, fused, reference, ("x",)))
    return cases


def bench_shapes(device_type: str, quick: bool) -> dict[str, list[tuple]]:
    """The shapes per kernel: toy ones on CPU (``--check``), one per kernel with ``quick``, else all."""
    if device_type == "cpu":
        return {"fused_linear_logprob": [(64, 32, 300, False), (64, 32, 300, True)],
                "fused_value_head": [(64, 32)], "seq": [(256, 8)]}
    if quick:
        return {"fused_linear_logprob": [(4096, 4096, 151936, False)], "fused_value_head": [(16384, 4096)],
                "seq": [(262144, 256)]}
    return {"fused_linear_logprob": [(4096, 4096, 151936, False), (16384, 4096, 151936, False),
                                     (16384, 4096, 151936, True), (16384, 1536, 151936, False)],
            "fused_value_head": [(16384, 1536), (16384, 4096), (65536, 4096)],
            "seq": [(65536, 64), (262144, 256), (1048576, 1024)]}


def case_dims(kernel: str, shape: tuple) -> dict[str, int]:
    """A bench_shapes entry as the dims of a Case (what min_bytes and flops read)."""
    if kernel == "fused_linear_logprob":
        n, h, v, entropy = shape
        return {"N": n, "H": h, "V": v, "entropy": int(entropy)}
    if kernel == "fused_value_head":
        return {"N": shape[0], "H": shape[1]}
    return {"N": shape[0], "S": shape[1]}


def build_cases(kernels, device, quick: bool) -> list[Case]:
    sh = bench_shapes(device.type, quick)
    lp_shapes, vh_shapes, seq_shapes = sh["fused_linear_logprob"], sh["fused_value_head"], sh["seq"]
    cases: list[Case] = []
    if "fused_linear_logprob" in kernels:
        cases += logprob_cases(lp_shapes, device, torch.bfloat16)
    if "fused_value_head" in kernels:
        cases += value_head_cases(vh_shapes, device, torch.bfloat16)
    for k in ("gspo_loss", "seq_clipped_value_loss"):
        if k in kernels:
            cases += seq_loss_cases(k, seq_shapes, device)
    return cases


# ----------------------------------------------------------------------------- measuring
def _step(fn: Callable, case: Case, x: dict[str, Tensor], mode: str) -> Callable[[], None]:
    """A closure running one forward (no autograd) or one forward + backward (torch.autograd.grad)."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(x)
        return run
    leaves = [x[k] for k in case.grad_inputs]

    def run():
        out = fn(x)
        torch.autograd.grad(_scalar(out, x), leaves)
    return run


def _inputs(case: Case, mode: str) -> dict[str, Tensor]:
    x = case.make()
    if mode != "fwd":
        for k in case.grad_inputs:
            x[k].requires_grad_(True)
    return x


def measure(fn: Callable, case: Case, mode: str) -> tuple[float, float]:
    """(median ms, peak MiB above the inputs) for fn on fresh inputs; NaN on OOM or failure."""
    import triton.testing

    try:
        x = _inputs(case, mode)
        run = _step(fn, case, x, mode)
        run()  # compile / autotune outside the timed region and the memory window
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = triton.testing.do_bench(run, warmup=5, rep=50, return_mode="median")
        return float(ms), peak_mib
    except torch.cuda.OutOfMemoryError:
        print(f"  {case.kernel} [{case.shape}] {mode}: out of memory")
        return math.nan, math.nan
    except Exception as e:  # a failing baseline (e.g. torch.compile) must not end the whole run
        print(f"  {case.kernel} [{case.shape}] {mode}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return math.nan, math.nan
    finally:
        x = run = None
        torch.cuda.empty_cache()


def element_size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def make_row(case: Case, mode: str, card: str, peak_bytes_per_s: float, ms: float, mem: float = math.nan,
             ms_eager: float = math.nan, mem_ref: float = math.nan, ms_compile: float = math.nan,
             ms_liger: float = math.nan) -> dict:
    """One result row (the CSV's columns). ``t_min_ms``: min_bytes at the card's peak HBM bandwidth;
    ``pct_peak`` = 100 * t_min_ms / ms (the same as achieved GB/s over the peak)."""
    nbytes = bytes_moved(case.kernel, case.dims, element_size(case.dtype), mode)
    fl = flops(case.kernel, case.dims, mode)
    t_min = time_at_peak_ms(nbytes, peak_bytes_per_s)
    return {
        "kernel": case.kernel, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", ""),
        "mode": mode, "ms": ms, "bytes": nbytes, "card": card, "peak_gbps": peak_bytes_per_s / 1e9,
        "t_min_ms": t_min, "pct_peak": 100 * t_min / ms, "gbps": nbytes / (ms * 1e-3) / 1e9,
        "tflops": fl / (ms * 1e-3) / 1e12 if fl else math.nan,
        "ms_eager": ms_eager, "speedup_eager": ms_eager / ms,
        "ms_compile": ms_compile, "speedup_compile": ms_compile / ms,
        "ms_liger": ms_liger, "speedup_liger": ms_liger / ms,
        "peak_mib": mem, "peak_mib_ref": mem_ref,
    }


def bench(cases: list[Case], modes, card: str, peak_bytes_per_s: float) -> list[dict]:
    rows = []
    compiled: dict[int, Callable] = {}
    for case in cases:
        if id(case.reference) not in compiled:
            compiled[id(case.reference)] = torch.compile(case.reference)
        for mode in modes:
            ms, mem = measure(case.fused, case, mode)
            ms_eager, mem_ref = measure(case.reference, case, mode)
            ms_compile, _ = measure(compiled[id(case.reference)], case, mode)
            ms_liger = math.nan
            if case.liger is not None and mode == "fwd+bwd":
                ms_liger, _ = measure(case.liger, case, mode)
            rows.append(make_row(case, mode, card, peak_bytes_per_s, ms, mem, ms_eager, mem_ref, ms_compile,
                                 ms_liger))
            print(_format(rows[-1]), flush=True)
    return rows


def _format(r: dict) -> str:
    def f(x, spec):
        return "    -" if x != x else format(x, spec)
    return (f"{r['kernel']:<24} {r['shape']:<34} {r['mode']:<8} {f(r['ms'], '9.3f')} ms "
            f"(min {f(r['t_min_ms'], '8.3f')} ms, {r['bytes'] / 1e6:9.1f} MB) {f(r['pct_peak'], '5.1f')}% of peak "
            f"{f(r['gbps'], '7.0f')} GB/s {f(r['tflops'], '6.0f')} TFLOP/s  x{f(r['speedup_eager'], '5.2f')} eager "
            f"x{f(r['speedup_compile'], '5.2f')} compile x{f(r['speedup_liger'], '5.2f')} liger  "
            f"{f(r['peak_mib'], '8.0f')} MiB (ref {f(r['peak_mib_ref'], '8.0f')})")


def model_table(kernels, modes, card: str, peak_bytes_per_s: float, quick: bool) -> str:
    """The bandwidth model alone (no GPU, no timing): min bytes and t_min per kernel, shape and mode at
    the GPU benchmark's shapes, as a Markdown table."""
    sh = bench_shapes("cuda", quick)
    lines = [f"bandwidth model: {card}, {peak_bytes_per_s / 1e12:g} TB/s peak HBM", "",
             "| kernel | shape | dtype | mode | min MB | t_min us |", "|---|---|---|---|---:|---:|"]
    for kernel in kernels:
        dtype = "float32" if kernel in ("gspo_loss", "seq_clipped_value_loss") else "bfloat16"
        for shape in sh["seq" if kernel in ("gspo_loss", "seq_clipped_value_loss") else kernel]:
            dims = case_dims(kernel, shape)
            for mode in modes:
                nbytes = bytes_moved(kernel, dims, element_size(getattr(torch, dtype)), mode)
                lines.append(f"| {kernel} | {' '.join(f'{k}={v}' for k, v in dims.items())} | {dtype} | {mode} | "
                             f"{nbytes / 1e6:.1f} | {time_at_peak_ms(nbytes, peak_bytes_per_s) * 1e3:.1f} |")
    return "\n".join(lines)


def check(cases: list[Case]) -> None:
    """Toy shapes on CPU: each fused / reference callable runs forward and backward once."""
    for case in cases:
        for mode in MODES:
            for fn in (case.fused, case.reference):
                _step(fn, case, _inputs(case, mode), mode)()
        print(f"ok {case.kernel} [{case.shape}]")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--card", help="the card for t_min / %%peak: h200, h100, a100, b200 (or a tempo_mega.plan "
                   "CARDS key); default: the CUDA device's name, else h200")
    p.add_argument("--peak-gbps", type=float,
                   help="override the card's peak HBM bandwidth, GB/s (e.g. 2000 for an H100 PCIe)")
    p.add_argument("--model", action="store_true",
                   help="print the bandwidth model (min bytes, t_min) at the GPU shapes and exit; no GPU needed")
    p.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    p.add_argument("--quick", action="store_true", help="one shape per kernel")
    p.add_argument("--check", action="store_true", help="run each case once at toy shapes on CPU, no timings")
    args = p.parse_args(argv)

    on_gpu = not args.check and not args.model and torch.cuda.is_available()
    try:
        card = resolve_card(args.card, torch.cuda.get_device_name() if on_gpu else None)
    except ValueError as e:
        p.error(str(e))
    from tempo_mega.plan import CARDS

    peak = args.peak_gbps * 1e9 if args.peak_gbps else CARDS[card].hbm_bytes_per_s
    if args.model:
        print(model_table(args.kernels, args.modes, card, peak, args.quick))
        return 0
    if args.check:
        check(build_cases(args.kernels, torch.device("cpu"), quick=True))
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; kernel timings are measured on GPUs only (nothing to report)")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_kernels: TRITON_INTERPRET=1 is set; unset it to time compiled kernels")
        return 2

    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}, card {card}, "
          f"peak {peak / 1e9:.0f} GB/s")
    rows = bench(build_cases(args.kernels, device, args.quick), args.modes, card, peak)
    if args.csv and rows:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"# wrote {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
