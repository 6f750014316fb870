"""``tempo-mega doctor``: what this environment has, and which tempo-mega features work in it.

    python scripts/check_env.py                        # versions, GPUs, feature table
    python scripts/check_env.py --json                 # the same, machine-readable
    python scripts/check_env.py --require megatron_backend,fp8   # exit 1 if one is unavailable

Every optional package is imported defensively: a broken install is reported, never raised
(Transformer Engine raises RuntimeError, not ImportError, when its CUDA libraries are missing, and a
broken TE makes ``import megatron.core`` fail too). The exit status is 0 unless ``--require`` names
a feature that is unavailable (1) or a feature that does not exist (2).

This module imports only the standard library at import time; ``main`` imports the packages it checks.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import platform
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "FEATURES",
    "FP8_MIN_CAPABILITY",
    "PACKAGES",
    "CudaInfo",
    "Feature",
    "GpuInfo",
    "PackageStatus",
    "collect",
    "evaluate_features",
    "main",
]

# FP8 tensor cores arrive with Ada (8.9) and Hopper (9.0); TE refuses FP8 below that.
FP8_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class PackageSpec:
    key: str  # stable name used in the JSON output and in feature requirements
    label: str  # what a person calls it (the pip name where there is one)
    module: str  # what to import
    dists: tuple[str, ...]  # distribution names to read a version from when the module has none


# Order: torch first (everything else needs it), TE before megatron-core (a broken TE breaks megatron).
PACKAGES: tuple[PackageSpec, ...] = (
    PackageSpec("torch", "torch", "torch", ("torch",)),
    PackageSpec("transformer_engine", "transformer_engine", "transformer_engine",
                ("transformer-engine", "transformer_engine", "transformer-engine-cu13", "transformer-engine-cu12")),
    PackageSpec("megatron_core", "megatron-core", "megatron.core", ("megatron-core", "megatron_core")),
    PackageSpec("sglang", "sglang", "sglang", ("sglang",)),
    PackageSpec("triton", "triton", "triton", ("triton", "pytorch-triton")),
    PackageSpec("apex", "apex", "apex", ("apex",)),
    PackageSpec("nvidia_ml_py", "nvidia-ml-py", "pynvml", ("nvidia-ml-py",)),
    PackageSpec("wandb", "wandb", "wandb", ("wandb",)),
    PackageSpec("transformers", "transformers", "transformers", ("transformers",)),
    PackageSpec("math_verify", "math-verify", "math_verify", ("math-verify", "math_verify")),
    PackageSpec("hydra", "hydra-core", "hydra", ("hydra-core",)),
)
_SPECS = {p.key: p for p in PACKAGES}


@dataclass
class PackageStatus:
    """``importable`` False with a ``version``: installed but broken (``error`` says why)."""

    label: str
    version: str | None = None
    importable: bool = False
    error: str | None = None

    def describe(self) -> str:
        if self.importable:
            return self.version or "installed (version unknown)"
        if self.version is None and self.error is None:
            return "not installed"
        return f"broken ({self.error})" if self.version is None else f"{self.version}, broken ({self.error})"

    def why_unusable(self) -> str:
        return "not installed" if self.version is None and self.error is None else f"broken: {self.error}"


@dataclass
class GpuInfo:
    index: int
    name: str
    memory_gib: float
    capability: tuple[int, int]


@dataclass
class CudaInfo:
    """What torch sees. ``cuda_version`` is the CUDA torch was built with (None: a CPU build)."""

    cuda_version: str | None = None
    cudnn_version: int | None = None
    available: bool = False
    nccl_version: str | None = None
    nccl_built: bool = False
    gpus: list[GpuInfo] = field(default_factory=list)
    error: str | None = None
    nvml_driver: str | None = None
    nvml_gpu_count: int = 0
    nvml_error: str | None = None


@dataclass
class Feature:
    key: str
    title: str
    needs: str
    ok: bool = False
    missing: list[str] = field(default_factory=list)


# key -> (title, what it needs). Every key is a valid --require name.
FEATURES: dict[str, tuple[str, str]] = {
    "torch_backend": ("Torch backend (single process)", "torch"),
    "hf_rollouts": ("HF rollouts (CPU/GPU reference sampler)", "torch + transformers"),
    "hydra_config": ("Hydra configs (tempo-mega train)", "hydra-core"),
    "math_rewards": ("Math verifier rewards", "math-verify"),
    "megatron_backend": ("Megatron backend", "megatron-core"),
    "te_layers": ("Transformer Engine layer spec", "transformer_engine + CUDA GPU"),
    "fp8": ("FP8 training (TE recipes)", "transformer_engine + compute capability >= 8.9"),
    "triton_kernels": ("Triton kernels", "triton + CUDA GPU"),
    "sglang_rollouts": ("SGLang rollouts", "sglang + CUDA GPU"),
    "nccl": ("NCCL collectives (multi-GPU)", "torch built with NCCL + CUDA GPU"),
    "apex_fused": ("apex fused kernels (optional; torch fallbacks otherwise)", "apex + CUDA GPU"),
    "nvml_telemetry": ("NVML telemetry", "nvidia-ml-py + GPU driver"),
    "wandb_logging": ("wandb logging", "wandb"),
}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")[:200]


def _dist_version(dists: Sequence[str]) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@contextlib.contextmanager
def _quiet():
    """Keep import-time chatter (megatron/apex/TE warnings and prints) off stdout, so --json parses."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        yield


def probe_package(spec: PackageSpec) -> tuple[PackageStatus, Any]:
    """Import ``spec.module``; returns its status and the module (None when it failed)."""
    status = PackageStatus(label=spec.label, version=_dist_version(spec.dists))
    try:
        with _quiet():
            module = importlib.import_module(spec.module)
    except ModuleNotFoundError as e:
        # A missing dependency of an installed package is a broken install, not an absent one.
        if e.name and spec.module.split(".")[0] != e.name.split(".")[0]:
            status.error = _one_line(e)
        elif status.version is not None:
            status.error = _one_line(e)
        return status, None
    except (Exception, SystemExit) as e:  # TE: RuntimeError/OSError when CUDA libraries are missing
        status.error = _one_line(e)
        return status, None
    version = getattr(module, "__version__", None)
    if isinstance(version, str) and version:
        status.version = version
    status.importable = True
    return status, module


def probe_cuda(torch: Any) -> CudaInfo:
    info = CudaInfo()
    if torch is None:
        info.error = "torch is not importable"
        return info
    try:
        info.cuda_version = torch.version.cuda
        cudnn = getattr(torch.backends, "cudnn", None)
        info.cudnn_version = cudnn.version() if cudnn is not None and cudnn.is_available() else None
        info.nccl_built = bool(torch.distributed.is_available() and torch.distributed.is_nccl_available())
        info.available = bool(torch.cuda.is_available())
        if info.available:
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                info.gpus.append(GpuInfo(index=i, name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                                         capability=(int(props.major), int(props.minor))))
            version = torch.cuda.nccl.version() if info.nccl_built else None
            if isinstance(version, tuple):
                info.nccl_version = ".".join(str(v) for v in version)
            elif isinstance(version, int):  # older torch: 2.21.5 encoded as 22105 (or 2215 before 2.9)
                major, rest = divmod(version, 10000) if version >= 10000 else divmod(version, 1000)
                minor, patch = divmod(rest, 100)
                info.nccl_version = f"{major}.{minor}.{patch}"
    except Exception as e:  # a driver/runtime mismatch surfaces here (e.g. "CUDA driver version is insufficient")
        info.error = _one_line(e)
    return info


def probe_nvml(pynvml: Any, info: CudaInfo) -> None:
    if pynvml is None:
        info.nvml_error = "nvidia-ml-py not importable"
        return
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound without a driver, NVMLError_DriverNotLoaded, ...
        info.nvml_error = _one_line(e)
        return
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        info.nvml_driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        info.nvml_gpu_count = int(pynvml.nvmlDeviceGetCount())
    except Exception as e:
        info.nvml_error = _one_line(e)
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def evaluate_features(packages: Mapping[str, PackageStatus], cuda: CudaInfo) -> list[Feature]:
    """Which features work given the package statuses and what torch sees. Pure: tests feed it fakes."""

    def need_pkg(key: str) -> list[str]:
        st = packages.get(key)
        if st is not None and st.importable:
            return []
        label = _SPECS[key].label
        return [f"needs {label} ({st.why_unusable() if st is not None else 'not checked'})"]

    gpu_missing = [] if cuda.gpus else [f"needs a CUDA GPU ({_no_gpu_reason(cuda)})"]

    def needs(*parts: list[str]) -> list[str]:
        return [m for part in parts for m in part]

    want = ".".join(map(str, FP8_MIN_CAPABILITY))
    fp8_gpu = [f"needs a CUDA GPU with compute capability >= {want} ({_no_gpu_reason(cuda)})"] if not cuda.gpus else []
    low = [g for g in cuda.gpus if g.capability < FP8_MIN_CAPABILITY]
    if low:
        seen = ", ".join(f"GPU {g.index} {g.name}: {g.capability[0]}.{g.capability[1]}" for g in low)
        fp8_gpu = [f"needs compute capability >= {want} ({seen})"]
    nccl = [] if cuda.nccl_built else ["needs a torch built with NCCL (this one has none)"]
    nvml = need_pkg("nvidia_ml_py")
    if not nvml and cuda.nvml_gpu_count == 0:
        nvml = [f"needs a GPU driver visible to NVML ({cuda.nvml_error or 'NVML sees no GPU'})"]

    missing = {
        "torch_backend": need_pkg("torch"),
        "hf_rollouts": needs(need_pkg("torch"), need_pkg("transformers")),
        "hydra_config": need_pkg("hydra"),
        "math_rewards": need_pkg("math_verify"),
        "megatron_backend": needs(need_pkg("torch"), need_pkg("megatron_core")),
        "te_layers": needs(need_pkg("transformer_engine"), gpu_missing),
        "fp8": needs(need_pkg("transformer_engine"), fp8_gpu),
        "triton_kernels": needs(need_pkg("triton"), gpu_missing),
        "sglang_rollouts": needs(need_pkg("sglang"), gpu_missing),
        "nccl": needs(need_pkg("torch"), nccl, gpu_missing),
        "apex_fused": needs(need_pkg("apex"), gpu_missing),
        "nvml_telemetry": nvml,
        "wandb_logging": need_pkg("wandb"),
    }
    out = []
    for key, (title, what) in FEATURES.items():
        miss = missing[key]
        out.append(Feature(key=key, title=title, needs=what, ok=not miss, missing=miss))
    return out


def _no_gpu_reason(cuda: CudaInfo) -> str:
    if cuda.error:
        return cuda.error
    if cuda.cuda_version is None:
        return "no CUDA GPU: torch is a CPU build"
    return "no CUDA GPU"


def collect() -> dict[str, Any]:
    """Probe everything; returns the report that ``--json`` prints."""
    statuses: dict[str, PackageStatus] = {}
    modules: dict[str, Any] = {}
    for spec in PACKAGES:
        statuses[spec.key], modules[spec.key] = probe_package(spec)
    mc = statuses["megatron_core"]
    te = statuses["transformer_engine"]
    if not mc.importable and mc.version is not None and te.error:
        mc.error = f"{mc.error} (transformer_engine is broken: {te.error})"
    cuda = probe_cuda(modules["torch"])
    probe_nvml(modules["nvidia_ml_py"], cuda)
    features = evaluate_features(statuses, cuda)
    return {
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "platform": platform.platform()},
        "packages": {k: asdict(v) for k, v in statuses.items()},
        "cuda": {k: v for k, v in asdict(cuda).items() if k != "gpus"},
        "gpus": [asdict(g) for g in cuda.gpus],
        "features": {f.key: {"title": f.title, "needs": f.needs, "ok": f.ok, "missing": f.missing} for f in features},
    }


def format_report(report: Mapping[str, Any]) -> str:
    pk = {k: PackageStatus(**v) for k, v in report["packages"].items()}
    cuda = report["cuda"]
    lines = ["tempo-mega doctor", ""]

    def row(name: str, value: str) -> None:
        lines.append(f"  {name:<19}{value}")

    py = report["python"]
    row("python", f"{py['version']} ({py['executable']})")
    torch_line = pk["torch"].describe()
    if pk["torch"].importable:
        cudnn = cuda["cudnn_version"]
        torch_line += f"  CUDA {cuda['cuda_version'] or 'none (CPU build)'}  cuDNN {cudnn if cudnn else '-'}"
    row("torch", torch_line)
    for spec in PACKAGES[1:]:
        if spec.key == "apex":
            st = pk["apex"]
            row("apex", st.describe() + ("" if st.importable else "  (optional: torch fallbacks are used)"))
            continue
        row(spec.label, pk[spec.key].describe())
    if cuda["nccl_version"]:
        row("NCCL", cuda["nccl_version"])
    else:
        row("NCCL", "- (built in, needs CUDA)" if cuda["nccl_built"] else "- (torch has no NCCL)")
    lines.append("")
    if report["gpus"]:
        lines.append(f"GPUs ({len(report['gpus'])}):")
        for g in report["gpus"]:
            cap = ".".join(str(c) for c in g["capability"])
            lines.append(f"  [{g['index']}] {g['name']}  {g['memory_gib']:.1f} GiB  compute capability {cap}")
    else:
        why = f" ({cuda['error']})" if cuda["error"] else ""
        lines.append(f"GPUs: no CUDA GPU{why}")
    if cuda["nvml_driver"]:
        lines.append(f"NVML: driver {cuda['nvml_driver']}, {cuda['nvml_gpu_count']} GPU(s)")
    else:
        lines.append(f"NVML: unavailable ({cuda['nvml_error']})")
    lines += ["", "features (name for --require, status, what):"]
    width = max(len(k) for k in report["features"])
    for key, f in report["features"].items():
        if f["ok"]:
            lines.append(f"  {key:<{width}}  ok       {f['title']}")
        else:
            lines.append(f"  {key:<{width}}  missing  {f['title']}: {'; '.join(f['missing'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tempo-mega doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--require", default="", metavar="FEATURE,...",
                        help=f"exit 1 unless these features work; one of: {', '.join(FEATURES)}")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    required = [r.strip() for r in args.require.split(",") if r.strip()]
    unknown = [r for r in required if r not in FEATURES]
    if unknown:
        print(f"tempo-mega doctor: error: unknown feature(s) {', '.join(unknown)}; "
              f"known: {', '.join(FEATURES)}", file=sys.stderr)
        return 2
    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    unavailable = [r for r in required if not report["features"][r]["ok"]]
    for r in unavailable:
        print(f"tempo-mega doctor: required feature {r} is unavailable: "
              f"{'; '.join(report['features'][r]['missing'])}", file=sys.stderr)
    return 1 if unavailable else 0


if __name__ == "__main__":
    sys.exit(main())
