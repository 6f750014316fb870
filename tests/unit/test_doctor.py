"""tempo-mega doctor (scripts/check_env.py): reports versions, GPUs and features on this machine,
and decides features from package statuses exactly as the table says (checked on synthetic inputs)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tempo_mega import doctor
from tempo_mega.doctor import FEATURES, CudaInfo, GpuInfo, PackageStatus, evaluate_features

ROOT = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def report():
    out = subprocess.run([sys.executable, "-m", "tempo_mega.doctor", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # stdout is only the JSON: import chatter goes to stderr


def test_json_report_matches_this_machine(report):
    assert set(report) == {"python", "packages", "cuda", "gpus", "features"}
    assert report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert report["packages"]["torch"]["version"] == torch.__version__ and report["packages"]["torch"]["importable"]
    assert set(report["features"]) == set(FEATURES)
    assert len(report["gpus"]) == (torch.cuda.device_count() if HAS_CUDA else 0)
    for key in ("megatron_core", "transformer_engine", "sglang", "triton", "apex", "nvidia_ml_py", "wandb",
                "transformers", "math_verify", "hydra"):
        assert key in report["packages"]
    for key, f in report["features"].items():
        assert f["ok"] == (not f["missing"]), key
    assert report["features"]["torch_backend"]["ok"]


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only report")
def test_cpu_machine_reports_no_gpu_and_what_is_missing(report):
    assert report["gpus"] == [] and report["cuda"]["nccl_version"] is None
    for key in ("triton_kernels", "sglang_rollouts", "te_layers", "fp8", "nccl", "apex_fused"):
        feature = report["features"][key]
        assert not feature["ok"] and any("GPU" in m for m in feature["missing"]), (key, feature)
    assert any("compute capability >= 8.9" in m for m in report["features"]["fp8"]["missing"])


@pytest.mark.slow
def test_text_report_through_the_script():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_env.py")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for name in ("python", "torch", "megatron-core", "transformer_engine", "sglang", "triton", "apex", "NCCL",
                 "nvidia-ml-py", "wandb", "transformers", "math-verify", "hydra-core"):
        assert f"\n  {name} " in text, name
    assert ("no CUDA GPU" in text) == (not HAS_CUDA)
    for key in FEATURES:
        assert f"\n  {key} " in text
    if not HAS_CUDA:
        assert "Triton kernels: needs a CUDA GPU" in text


def test_require_exits_1_for_a_missing_feature_and_2_for_an_unknown_one(report, capsys):
    want = 0 if report["features"]["triton_kernels"]["ok"] else 1
    assert doctor.main(["--require", "triton_kernels"]) == want
    if not HAS_CUDA:
        assert want == 1 and "required feature triton_kernels is unavailable" in capsys.readouterr().err
    capsys.readouterr()
    assert doctor.main(["--require", "torch_backend", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["features"]["torch_backend"]["ok"]
    assert doctor.main(["--require", "warp_drive"]) == 2
    assert "unknown feature(s) warp_drive" in capsys.readouterr().err


@pytest.mark.slow
def test_importing_the_module_pulls_nothing_heavy(tmp_path):
    code = ("import sys, tempo_mega.doctor; "
            "print([m for m in ('torch', 'megatron', 'transformer_engine', 'sglang', 'triton', 'pynvml', 'wandb') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


# ---- feature logic on synthetic environments ------------------------------------------------------

def ok(label: str, version: str = "1.0") -> PackageStatus:
    return PackageStatus(label=label, version=version, importable=True)


def absent(label: str) -> PackageStatus:
    return PackageStatus(label=label)


ALL_OK = {
    "torch": ok("torch"), "transformer_engine": ok("transformer_engine"), "megatron_core": ok("megatron-core"),
    "sglang": ok("sglang"), "triton": ok("triton"), "apex": ok("apex"), "nvidia_ml_py": ok("nvidia-ml-py"),
    "wandb": ok("wandb"), "transformers": ok("transformers"), "math_verify": ok("math-verify"), "hydra": ok("hydra-core"),
}


def gpus(*caps) -> CudaInfo:
    return CudaInfo(cuda_version="13.4", cudnn_version=92600, available=True, nccl_version="2.31.2", nccl_built=True,
                    gpus=[GpuInfo(i, f"GPU{i}", 80.0, cap) for i, cap in enumerate(caps)],
                    nvml_driver="595.1", nvml_gpu_count=len(caps))


def features(packages, cuda) -> dict:
    return {f.key: f for f in evaluate_features(packages, cuda)}


def test_everything_works_on_a_full_hopper_node():
    got = features(ALL_OK, gpus((9, 0), (9, 0)))
    assert all(f.ok for f in got.values()), {k: f.missing for k, f in got.items() if not f.ok}


def test_fp8_needs_compute_capability_8_9_on_every_gpu():
    assert features(ALL_OK, gpus((8, 9))).get("fp8").ok
    got = features(ALL_OK, gpus((9, 0), (8, 0)))
    assert not got["fp8"].ok and got["fp8"].missing == ["needs compute capability >= 8.9 (GPU 1 GPU1: 8.0)"]
    assert got["te_layers"].ok and got["triton_kernels"].ok  # an A100 runs TE in bf16 and the kernels


def test_a_broken_transformer_engine_is_reported_as_broken_not_absent():
    packages = {**ALL_OK, "transformer_engine": PackageStatus(
        "transformer_engine", version="2.19.0", error="RuntimeError: libcudnn.so.9 not found")}
    got = features(packages, gpus((9, 0)))
    assert got["fp8"].missing == ["needs transformer_engine (broken: RuntimeError: libcudnn.so.9 not found)"]
    assert got["megatron_backend"].ok


def test_cpu_only_environment():
    packages = {**ALL_OK, "sglang": absent("sglang"), "apex": absent("apex")}
    cpu = CudaInfo(cuda_version=None, nccl_built=False, nvml_error="NVMLError_LibraryNotFound: NVML Shared Library Not Found")
    got = features(packages, cpu)
    assert {k for k, f in got.items() if f.ok} == {"torch_backend", "hf_rollouts", "hydra_config", "math_rewards",
                                                   "megatron_backend", "wandb_logging"}
    assert got["triton_kernels"].missing == ["needs a CUDA GPU (no CUDA GPU: torch is a CPU build)"]
    assert got["sglang_rollouts"].missing[0] == "needs sglang (not installed)"
    assert got["nvml_telemetry"].missing == [
        "needs a GPU driver visible to NVML (NVMLError_LibraryNotFound: NVML Shared Library Not Found)"]


def test_probe_reports_a_package_whose_import_raises(monkeypatch):
    spec = doctor.PackageSpec("boom", "boom", "tempo_mega_doctor_test_boom", ("tempo-mega-doctor-test-boom",))

    def fail(name):
        raise RuntimeError("CUDA libraries are missing\nsecond line")

    monkeypatch.setattr(doctor.importlib, "import_module", fail)
    status, module = doctor.probe_package(spec)
    assert module is None and not status.importable
    assert status.error == "RuntimeError: CUDA libraries are missing"
    assert status.describe() == "broken (RuntimeError: CUDA libraries are missing)"
