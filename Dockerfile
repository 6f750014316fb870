# tempo-mega on the NGC PyTorch container. The container's torch, CUDA, cuDNN, NCCL, Triton and
# Transformer Engine are used as shipped and never reinstalled; megatron-core, SGLang, wandb,
# nvidia-ml-py and this package are added under pip constraints that pin the container's torch stack.
#
#   docker build -t tempo-mega:ngc26.09 .
#   docker build --build-arg NGC_TAG=26.10 -t tempo-mega:ngc26.10 .      # another NGC release
#   enroot import -o tempo-mega.sqsh dockerd://tempo-mega:ngc26.09         # for srun --container-image
#
# NGC 26.09: Python 3.12, torch 2.14.0a0 (NVIDIA build), CUDA 13.4, cuDNN 9.26, NCCL 2.31.2,
# Transformer Engine 2.19.0, Triton 3.8. Chosen because SGLang 0.5.23 is built against torch 2.14
# (it pins torch==2.14.1, and its sglang-kernel extension is tied to that torch ABI): an older tag
# (25.xx ships torch 2.9/2.10) would leave SGLang's kernels mismatched with the container's torch.
ARG NGC_TAG=26.09
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}-py3
ARG NGC_TAG

# bash with pipefail: a failing `pip list | grep` must fail the build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TEMPO_MEGA_NGC_TAG=${NGC_TAG}
LABEL org.opencontainers.image.title="tempo-mega" \
      org.opencontainers.image.base.name="nvcr.io/nvidia/pytorch:${NGC_TAG}-py3"
WORKDIR /opt/tempo-mega

# NGC images since 25.03 carry /etc/pip/constraint.txt, which pip applies to every install here. If
# a build stops on a conflict between it and SGLang's pins (never torch or TE), name the packages to
# release from it: --build-arg NGC_UNPIN="numba sentencepiece" (NVIDIA documents editing that file).
ARG NGC_UNPIN=""
RUN if [ -n "${NGC_UNPIN}" ] && [ -f /etc/pip/constraint.txt ]; then \
      for p in ${NGC_UNPIN}; do sed -i -E "/^${p}([^A-Za-z0-9._-]|$)/Id" /etc/pip/constraint.txt; done; \
    fi

# 1. Pin the container's own stack as it is: torch, torchvision, Triton, Transformer Engine, apex and
#    flash-attn stay exactly as shipped; every later install runs under these pins. TE must import
#    here, from the container (a missing driver is fine: TE loads libcuda lazily).
COPY docker/constraints.txt docker/sglang_requirements.py docker/
RUN python -m pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|triton|pytorch-triton|transformer[-_]engine[-_a-z0-9]*|apex|flash[-_]attn[-_a-z0-9]*)==' \
      | sort > docker/container-pins.txt \
 && cat docker/container-pins.txt \
 && grep -qi '^torch==' docker/container-pins.txt \
 && python -c "import transformer_engine, transformer_engine.pytorch; print('transformer_engine', transformer_engine.__version__)" \
 && python -c "import importlib.util as u; print('apex:', 'present' if u.find_spec('apex') else 'absent (optional: torch fallbacks)')"

# 2. megatron-core, wandb, nvidia-ml-py: versions and why in docker/constraints.txt. Never
#    megatron-core[te]: that extra reinstalls Transformer Engine.
RUN python -m pip install -c docker/constraints.txt -c docker/container-pins.txt \
      megatron-core wandb nvidia-ml-py

# 3. SGLang without its torch pins. sglang 0.5.23 and three of its kernel packages require
#    torch==2.14.1 exactly, which pip would satisfy by replacing the NGC torch (2.14.0a0). Install them
#    with --no-deps, then everything else they need (read from their metadata, torch stack removed)
#    under the container's pins.
RUN python -m pip install --no-deps -c docker/constraints.txt sglang sglang-kernel sgl-deep-ep sgl-flash-mla \
 && python docker/sglang_requirements.py > docker/sglang-requirements.txt \
 && python -m pip install -c docker/constraints.txt -c docker/container-pins.txt -r docker/sglang-requirements.txt \
 && python -c "import sglang; print('sglang', sglang.__version__)"

# 4. This package, editable (bind-mount a newer checkout over /opt/tempo-mega to run it without a
#    rebuild); its remaining dependencies (hydra-core, math-verify) under the same pins.
COPY pyproject.toml README.md ./
COPY tempo_mega tempo_mega
COPY kernels kernels
COPY configs configs
COPY scripts scripts
RUN python -m pip install --no-build-isolation -c docker/constraints.txt -c docker/container-pins.txt \
      -e ".[megatron,wandb,nvml]"

# 5. Nothing above touched the container's stack, and the package works: a difference in the pinned
#    stack fails the build; the doctor lists versions (no GPU at build time, so GPU features show
#    as missing here and are checked with `python scripts/check_env.py` on a GPU node).
RUN python -m pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|triton|pytorch-triton|transformer[-_]engine[-_a-z0-9]*|apex|flash[-_]attn[-_a-z0-9]*)==' \
      | sort | diff -u docker/container-pins.txt - \
 && python scripts/check_env.py --require torch_backend,megatron_backend,hydra_config,math_rewards,wandb_logging \
 && tempo-mega selfcheck

CMD ["bash"]
