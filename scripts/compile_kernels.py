"""Compile every Triton kernel of ``tempo_mega.kernels`` ahead of time for NVIDIA GPUs, without a GPU.

    python scripts/compile_kernels.py                        # all kernels, configs and targets
    python scripts/compile_kernels.py --targets 90 --csv compile_kernels.csv
    python scripts/compile_kernels.py --quick --targets 90   # one config per kernel, sm_90 only

Each ``@triton.jit`` kernel is compiled with Triton's own pipeline (``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))``: TTIR, TTGIR, LLVM IR, PTX, then the ``ptxas`` of the Triton wheel)
for an explicit target, so no CUDA driver is queried: the signature, the constexprs and the alignment
attributes come from the kernel's own binder (``create_function_from_signature`` with the target's
backend, the code ``JITFunction.run`` uses before it compiles), fed with ``MockTensor`` pointers of the
dtypes the wrappers pass and the integers they pass at the real shapes below. Block sizes, warps and the
autotune configs come from the wrappers' own helpers (``value_head._fwd_blocks`` / ``_bwd_blocks_for``,
``seq_losses._block``, ``logprob._fwd_block_n`` / ``_dlogits_tiles`` / ``_chunk_rows`` and every
``triton.Config`` of ``logprob._logprob_fwd_kernel_tuned`` that ``logprob._fwd_configs_for`` keeps for the
target, as the autotuner's prune hook does on that GPU), so this script cannot drift from them.

Shapes (the real ones): value head N=131072 x H=5120 (bf16 hidden and RMSNorm weight, fp32 head);
GSPO and the sequence-clipped value loss, forward and backward, on fp32 token tensors (what the trainer
feeds them: log-probs and values are fp32) with fp32 accumulation and the GPU block of ``_block``
(16K-token sequences; the token count is no kernel argument); fused log-prob forward at V=151936 with
H=4096 and H=5120 bf16, N=16384 tokens, with and without entropy, every autotune config the target keeps; its
dlogits kernel on the first fp32 [chunk, V] slab of the backward (bf16 output).
Specializations not compiled: a token count N not divisible by 16 and backward chunks after the first
(their pointers lose 16-byte alignment) give Triton a variant without the divisibility attribute;
float64 and bf16 loss inputs (supported, not what the trainer runs).

Targets: sm_80 (A100), sm_90 (H100/H200; Triton compiles sm_90a) and sm_100 (B200; sm_100a), all three
supported by Triton 3.9's NVIDIA backend on a CPU-only machine. For each kernel x config x target it prints
registers (``ptxas -v``), spills (``n_spills`` as Triton's ``CompiledKernel`` reports it on a GPU, the
driver's local memory per thread / 4, here ptxas's stack frame bytes / 4; plus ptxas's spill store + load
bytes),
shared memory (Triton's ``metadata.shared``, the dynamic shared memory a launch asks for), num_warps,
num_stages and the compile seconds. Exit status 1 on a compile error, on any spill, or on shared
memory over the target's per-block opt-in limit (sm_80 166912 B, sm_90 and sm_100 232448 B).
Registers and spills are only what ``ptxas`` reports: on a CPU there is no driver to load the cubin.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

TARGETS = (90, 80, 100)  # all NVIDIA targets this script compiles for
SMEM_LIMIT = {80: 166_912, 90: 232_448, 100: 232_448}  # max dynamic shared memory per block (opt-in), bytes
SMS = {80: 108, 90: 132, 100: 148}  # SMs of the A100, H100/H200, B200 (value-head backward row groups)

VALUE_HEAD_N, VALUE_HEAD_H = 131_072, 5_120
LOGPROB_N, LOGPROB_V, LOGPROB_HS = 16_384, 151_936, (4_096, 5_120)


@dataclass
class Job:
    kernel: str
    variant: str  # the shape / flags, one string
    config: str  # block sizes and launch options, one string
    fn: Any  # the JITFunction
    args: tuple  # positional arguments as the wrapper passes them (MockTensor for tensors)
    kwargs: dict = field(default_factory=dict)  # constexprs and launch options


@dataclass
class Result:
    kernel: str
    variant: str
    config: str
    target: int
    n_regs: int | None = None
    n_spills: int | None = None  # Triton's: local memory bytes / 4
    spill_bytes: int | None = None  # ptxas: spill stores + spill loads
    shared: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    seconds: float = 0.0
    error: str = ""


def problems(r: Result) -> list[str]:
    """Why this result fails the check (empty: it passes): a compile error, any spill, shared memory over
    the target's limit, or a missing measurement."""
    if r.error:
        return [f"compile error: {r.error}"]
    out = []
    if r.n_regs is None or r.n_spills is None or r.spill_bytes is None or r.shared is None:
        out.append("no register / spill / shared-memory figures")
    if (r.n_spills or 0) > 0 or (r.spill_bytes or 0) > 0:
        out.append(f"spills: n_spills={r.n_spills}, {r.spill_bytes} B of spill stores + loads")
    limit = SMEM_LIMIT.get(r.target)
    if limit is None:
        out.append(f"no shared-memory limit known for sm_{r.target}")
    elif (r.shared or 0) > limit:
        out.append(f"shared memory {r.shared} B > {limit} B (sm_{r.target})")
    return out


# ----------------------------------------------------------------------------- the jobs
def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


def build_jobs(arch: int, quick: bool = False) -> list[Job]:
    """Every kernel launch the wrappers make at the real shapes, for one target (``quick``: one autotune
    config of the log-prob forward and one flag variant per kernel)."""
    import torch
    import triton.language as tl
    from tempo_mega.kernels import logprob, seq_losses, value_head
    from triton.runtime.jit import MockTensor

    bf16, f32, i32, i64 = (MockTensor(d) for d in (torch.bfloat16, torch.float32, torch.int32, torch.int64))
    jobs: list[Job] = []

    # value head: hidden bf16 [N, H], RMSNorm weight bf16 (the trunk's dtype), head weight and bias fp32
    n, h = VALUE_HEAD_N, VALUE_HEAD_H
    bn, bh, warps = value_head._fwd_blocks(h)
    jobs.append(Job("value_head_fwd", f"N={n} H={h} bf16", _fmt({"BLOCK_N": bn, "BLOCK_H": bh, "num_warps": warps}),
                    value_head._value_head_fwd_kernel,
                    (bf16, h, bf16, f32, f32, f32, f32, f32, n, h, 1e-6),
                    {"HAS_BIAS": True, "ACC": tl.float32, "ACC_IS_FP64": False, "BLOCK_N": bn, "BLOCK_H": bh,
                     "num_warps": warps}))
    bn, bh, groups, warps = value_head._bwd_blocks_for(n, h, 4 * SMS[arch])
    jobs.append(Job("value_head_bwd", f"N={n} H={h} bf16 groups={groups}",
                    _fmt({"BLOCK_N": bn, "BLOCK_H": bh, "num_warps": warps}),
                    value_head._value_head_bwd_kernel,
                    (bf16, h, bf16, f32, f32, f32, f32, bf16, h, f32, n, h, groups),
                    {"STORE_DX": True, "ACC": tl.float32, "BLOCK_N": bn, "BLOCK_H": bh, "num_warps": warps}))

    # sequence losses: fp32 token tensors, int32 cu_seqlens, fp32 accumulation, the GPU block
    block = seq_losses._block(torch.device("cuda"))
    cfg = _fmt({"BLOCK": block, "num_warps": 4})  # the launches pass no num_warps: Triton's default
    # float arguments are not specialized: any clip value compiles the same kernel
    lo = (*seq_losses._f32_pair(1 - 3e-4), *seq_losses._f32_pair(1 + 5e-4))
    c = seq_losses._f32_pair(0.1)
    seq = "16K-token rows fp32 acc=fp32"
    const = {"ACC": tl.float32, "BLOCK": block}
    jobs += [
        Job("gspo_fwd", seq, cfg, seq_losses._gspo_fwd_kernel, (f32, f32, f32, i32, f32, f32, *lo), const),
        Job("gspo_bwd", seq, cfg, seq_losses._gspo_bwd_kernel, (f32, i32, f32, f32, f32, *lo), const),
        Job("value_loss_fwd", seq, cfg, seq_losses._value_fwd_kernel, (f32, f32, f32, i32, f32, f32, f32, *c),
            const),
        Job("value_loss_bwd", seq, cfg, seq_losses._value_bwd_kernel, (f32, f32, i32, f32, f32, f32, f32, *c),
            const),
    ]

    # fused log-prob forward: every autotune config the target keeps, both entropy flags (autotune key)
    n, v = LOGPROB_N, LOGPROB_V
    block_n = logprob._fwd_block_n(n)
    for h in LOGPROB_HS[:1] if quick else LOGPROB_HS:
        for entropy in (False,) if quick else (False, True):
            configs = logprob._fwd_configs_for(logprob._logprob_fwd_kernel_tuned.configs, arch // 10, entropy)
            for config in configs[:1] if quick else configs:
                launch = config.all_kwargs()
                jobs.append(Job("logprob_fwd", f"N={n} V={v} H={h} bf16 entropy={int(entropy)}",
                                _fmt({"BLOCK_N": block_n, **launch}), logprob._logprob_fwd_kernel,
                                (bf16, bf16, i64, f32, f32, f32, f32, n, v, h, h, h, 1.0),
                                {"BLOCK_N": block_n, "UPCAST": False, "ENTROPY": entropy, "PRECISION": "ieee",
                                 **launch}))

    # dlogits: one fp32 [chunk, V] slab of the backward -> bf16 dlogits (the 16-bit GEMM path)
    chunk = logprob._chunk_rows(n, v)
    block_r, block_v, warps = logprob._dlogits_tiles(interp=False)
    for has_ent in (False,) if quick else (False, True):
        jobs.append(Job("logprob_dlogits", f"C={chunk} V={v} fp32->bf16 entropy={int(has_ent)}",
                        _fmt({"BLOCK_R": block_r, "BLOCK_V": block_v, "num_warps": warps}), logprob._dlogits_kernel,
                        (f32, bf16, i64, f32, f32, f32, f32, chunk, v, v, v, 1.0),
                        {"HAS_LP": True, "HAS_ENT": has_ent, "BLOCK_R": block_r, "BLOCK_V": block_v,
                         "num_warps": warps}))
    return jobs


# ----------------------------------------------------------------------------- compiling
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> tuple[int | None, int | None, int | None]:
    """(registers, stack frame bytes, spill store + load bytes) from ``ptxas -v`` output, None if absent."""
    regs = _PTXAS_REGS.search(log)
    spills = _PTXAS_SPILLS.search(log)
    return (int(regs.group(1)) if regs else None,
            int(spills.group(1)) if spills else None,
            int(spills.group(2)) + int(spills.group(3)) if spills else None)


def compile_job(job: Job, arch: int) -> Result:
    """Compile one job for sm_<arch> through the kernel's own binder, as ``JITFunction.run`` would."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    res = Result(job.kernel, job.variant, job.config, arch)
    t0 = time.perf_counter()
    try:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        fn = job.fn
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*job.args, **job.kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, dict(job.kwargs), bound, spec, opts)
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed by make_cubin
        knobs.compilation.always_compile = True  # never a cache hit: the timing and the log are this compile's
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
        res.seconds = time.perf_counter() - t0
        res.n_regs, stack, res.spill_bytes = parse_ptxas_log(log.getvalue())
        res.n_spills = None if stack is None else stack // 4
        md = kernel.metadata
        res.shared, res.num_warps, res.num_stages = md.shared, md.num_warps, md.num_stages
    except Exception as e:  # reported per job; the run goes on and exits 1
        res.seconds = time.perf_counter() - t0
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    return res


def _worker_init(cache_dir: str) -> None:
    # compiled, not interpreted kernels (read when the kernel modules are imported), and a private cache
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def _compile_index(arch: int, quick: bool, index: int) -> Result:
    return compile_job(build_jobs(arch, quick)[index], arch)


def run(targets: list[int], quick: bool, jobs: int) -> list[Result]:
    work = [(arch, i) for arch in targets for i in range(len(build_jobs(arch, quick)))]
    with tempfile.TemporaryDirectory(prefix="compile_kernels.") as cache:
        if jobs <= 1:
            _worker_init(cache)
            return [_compile_index(arch, quick, i) for arch, i in work]
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(cache,)) as pool:
            futures = [pool.submit(_compile_index, arch, quick, i) for arch, i in work]
            return [f.result() for f in futures]


# ----------------------------------------------------------------------------- output
COLUMNS = ("kernel", "variant", "config", "target", "n_regs", "n_spills", "spill_bytes", "shared", "num_warps",
           "num_stages", "seconds", "status")


def _row(r: Result) -> dict[str, Any]:
    bad = problems(r)
    return {"kernel": r.kernel, "variant": r.variant, "config": r.config, "target": f"sm_{r.target}",
            "n_regs": r.n_regs, "n_spills": r.n_spills, "spill_bytes": r.spill_bytes, "shared": r.shared,
            "num_warps": r.num_warps, "num_stages": r.num_stages, "seconds": round(r.seconds, 2),
            "status": "ok" if not bad else "FAIL: " + "; ".join(bad)}


def format_table(results: list[Result]) -> str:
    rows = [{k: "-" if v is None else str(v) for k, v in _row(r).items()} for r in results]
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in COLUMNS} if rows else {}
    lines = ["| " + " | ".join(c.ljust(widths[c]) for c in COLUMNS) + " |",
             "|" + "|".join("-" * (widths[c] + 2) for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row[c].ljust(widths[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(map(str, TARGETS)),
                   help="comma-separated compute capabilities (default: 90,80,100, all supported)")
    p.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    p.add_argument("--quick", action="store_true",
                   help="one autotune config and one flag variant per kernel (the full set takes minutes)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all CPUs)")
    args = p.parse_args(argv)
    try:
        targets = [int(t.strip().removeprefix("sm_")) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        p.error(f"--targets: comma-separated integers such as 90,80,100, got {args.targets!r}")
    unknown = [t for t in targets if t not in SMEM_LIMIT]
    if unknown:
        p.error(f"--targets: unsupported {unknown}; supported: {sorted(SMEM_LIMIT)}")

    os.environ["TRITON_INTERPRET"] = "0"  # compile, never interpret: read when the kernel modules are imported
    import triton

    t0 = time.perf_counter()
    results = run(targets, args.quick, args.jobs)
    print(f"# triton {triton.__version__}, targets {', '.join(f'sm_{t}' for t in targets)}, "
          f"{len(results)} compiles in {time.perf_counter() - t0:.1f} s wall ({args.jobs} processes)")
    print(format_table(results))
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
            writer.writeheader()
            writer.writerows(_row(r) for r in results)
        print(f"# wrote {len(results)} rows to {args.csv}")
    failed = [r for r in results if problems(r)]
    for r in failed:
        print(f"FAIL {r.kernel} [{r.variant}] [{r.config}] sm_{r.target}: {'; '.join(problems(r))}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
