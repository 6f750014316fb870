"""The Dockerfile (no Docker engine here, so it is parsed): one FROM on the NGC PyTorch image through
the NGC_TAG build argument; no pip install that could replace the container's torch stack; every
pip install pinned or under docker/constraints.txt; and the SGLang requirements helper it runs."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
SGLANG_REQS = ROOT / "docker" / "sglang_requirements.py"
# The container's; a pip install naming one of these could replace the NGC build.
CONTAINER_STACK = {"torch", "torchvision", "torchaudio", "triton", "pytorch-triton", "transformer-engine",
                   "transformer_engine", "apex", "flash-attn", "flash_attn"}


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def pip_installs() -> list[list[str]]:
    """Argument lists of every `pip install` command in the RUN instructions."""
    cmds = []
    for keyword, args in instructions():
        if keyword != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "|", "&"):
                for i in range(len(command) - 1):
                    if command[i] in ("pip", "pip3") and command[i + 1] == "install":
                        cmds.append(command[i + 2:])
                command = []
            else:
                command.append(token)
    return cmds


def pinned_constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
        assert m, f"docker/constraints.txt: {line!r} is not NAME==VERSION"
        pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def package_name(token: str) -> str:
    return re.split(r"[\[=<>!~;@ ]", token, maxsplit=1)[0].lower().replace("_", "-")


def test_one_from_on_the_ngc_pytorch_image_through_the_tag_argument():
    inst = instructions()
    froms = [args for kw, args in inst if kw == "FROM"]
    assert froms == ["nvcr.io/nvidia/pytorch:${NGC_TAG}-py3"]
    first_from = next(i for i, (kw, _) in enumerate(inst) if kw == "FROM")
    tag_args = [args for kw, args in inst[:first_from] if kw == "ARG" and args.startswith("NGC_TAG=")]
    assert len(tag_args) == 1 and re.fullmatch(r"NGC_TAG=\d\d\.\d\d", tag_args[0]), tag_args
    # the tag is named once: nowhere else a literal NGC release
    text = DOCKERFILE.read_text()
    tag = tag_args[0].split("=", 1)[1]
    assert not re.search(r"nvcr\.io/nvidia/pytorch:\d", text)
    assert sum(f"NGC_TAG={tag}" in line for line in text.splitlines() if not line.startswith("#")) == 1


def test_no_install_can_replace_the_container_torch_stack():
    cmds = pip_installs()
    assert cmds, "no pip install found: the parser is broken"
    for args in cmds:
        for flag in ("-U", "--upgrade", "--force-reinstall", "--ignore-installed", "-I"):
            assert flag not in args, f"pip install {' '.join(args)}: {flag} could replace the container's packages"
        names = {package_name(a) for a in args if not a.startswith("-") and not a.startswith(".")}
        assert not names & CONTAINER_STACK, f"pip install {' '.join(args)} names {names & CONTAINER_STACK}"
        assert not any("megatron-core[" in a and "te" in a for a in args), "megatron-core[te] reinstalls TE"
    text = DOCKERFILE.read_text()
    assert not re.search(r"pip3? install[^\n]*\btorch\b(?![-_])", text)


def test_every_pip_install_is_pinned_or_constrained():
    pins = pinned_constraints()
    for args in pip_installs():
        constrained = any(a == "-c" and args[i + 1] == "docker/constraints.txt" for i, a in enumerate(args[:-1]))
        skip_next = False
        for a in args:
            if skip_next:
                skip_next = False
                continue
            if a in ("-c", "-r", "--constraint", "--requirement"):
                skip_next = True
                continue
            if a.startswith("-") or a.startswith("."):  # options; the local package (-e ".[extras]")
                continue
            name = package_name(a)
            assert "==" in a or (constrained and name in pins), (
                f"pip install {' '.join(args)}: {a} is neither pinned (==) nor pinned in docker/constraints.txt")
        if "--no-deps" not in args:  # anything that resolves dependencies runs under the container's pins
            assert constrained and "docker/container-pins.txt" in args, args


def test_container_pins_are_generated_from_the_image_and_checked_at_the_end():
    runs = [args for kw, args in instructions() if kw == "RUN"]
    generate = [r for r in runs if "> docker/container-pins.txt" in r]
    assert len(generate) == 1 and "pip list --format=freeze" in generate[0] and "^(torch|" in generate[0]
    assert "import transformer_engine" in generate[0], "TE must be verified to import at build time"
    assert any("diff -u docker/container-pins.txt -" in r for r in runs), "no check that the torch stack is intact"
    assert any("--no-deps" in r and "sglang" in r for r in runs)


def test_constraints_pin_what_the_code_is_tested_against():
    pins = pinned_constraints()
    assert pins["megatron-core"].startswith("0.19.")  # 0.17+ needs the container's Python 3.12
    assert pins["sglang"] == "0.5.23"  # the HTTP API the rollout client targets
    for name in ("wandb", "nvidia-ml-py", "sglang-kernel"):
        assert name in pins
    assert not set(pins) & CONTAINER_STACK


@pytest.mark.slow
def test_run_commands_are_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("needs bash")
    for keyword, args in instructions():
        if keyword == "RUN":
            out = subprocess.run([bash, "-n", "-c", args], capture_output=True, text=True)
            assert out.returncode == 0, f"RUN {args}\n{out.stderr}"


def fake_dist(site: Path, name: str, version: str, requires: list[str]) -> None:
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (d / "METADATA").write_text("\n".join(lines) + "\n")


def run_helper(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SGLANG_REQS)], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})


def sglang_site(tmp_path: Path, kernel_version: str = "0.4.10") -> Path:
    site = tmp_path / "site"
    fake_dist(site, "sglang", "0.5.23", [
        "aiohttp", "torch==2.14.1", "torchaudio==2.11.0", "torchvision", 'torchcodec==0.17.0; sys_platform != "linux"',
        "sglang-kernel==0.4.10", "sgl-deep-ep==0.1.2.post1", "sgl-flash-mla==1.0.0", "transformers==5.19.0",
        "flashinfer_python[cu13]==0.7.2", 'av==16.1.0; sys_platform == "nosuchplatform"',
        'pytest; extra == "test"', "nvidia-ml-py",
    ])
    fake_dist(site, "sglang-kernel", kernel_version, ["torch==2.14.1"])
    fake_dist(site, "sgl-deep-ep", "0.1.2.post1", ["nvidia-ml-py", "torch==2.14.1"])
    fake_dist(site, "sgl-flash-mla", "1.0.0", ["torch>=2.14.1", "einops"])
    return site


@pytest.mark.slow
def test_sglang_requirements_drop_the_torch_stack_and_the_no_deps_packages(tmp_path):
    pytest.importorskip("packaging")
    out = run_helper(sglang_site(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["aiohttp", "einops", "flashinfer_python[cu13]==0.7.2", "nvidia-ml-py",
                                  "transformers==5.19.0"]


@pytest.mark.slow
def test_sglang_requirements_refuse_kernels_sglang_did_not_ask_for(tmp_path):
    pytest.importorskip("packaging")
    out = run_helper(sglang_site(tmp_path, kernel_version="0.4.9"))
    assert out.returncode == 1
    assert "sglang-kernel==0.4.10" in out.stderr and "docker/constraints.txt" in out.stderr
