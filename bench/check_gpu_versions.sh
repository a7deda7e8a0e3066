#!/usr/bin/env bash
# The GPU machine's versions, checked on a CPU machine in one command:
#
#   bash bench/check_gpu_versions.sh [--dry-run]
#
# The GPU machine runs Python 3.12, torch 2.11, triton 3.6 and numpy 2.5 (../shared/gpu/README.md);
# CI runs torch 2.14.1 / triton 3.8.  This builds (once) a venv with the GPU machine's versions
# and checks, in order:
#   1. with numpy<2.4: the ahead-of-time builds for sm_80 and sm_90 (tests/test_aot_compile.py)
#      and the kernel tests through Triton's interpreter all pass;
#   2. with the GPU machine's numpy (2.5): the interpreter tests skip, naming the fix
#      (lora_kernels/_compat.py: triton < 3.7's interpreter cannot run with numpy >= 2.4),
#      and nothing fails;
#   3. with --dry-run: bench/gpu_session.sh --dry-run in that venv (open_clip from .whl/).
# The venv is left with numpy 2.5, like the GPU machine, for later dry runs.
#
# Not in CI: torch 2.11 from PyPI is a CUDA build (about 4 GB with its nvidia-* wheels), and
# step 1 alone takes minutes of interpreter time; CI's 15-minute budget has no room for it.
# GPU_CHECK_VENV picks the venv (default ~/.cache/clip-lora/venv-gpu); PYTHON312 the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${GPU_CHECK_VENV:-$HOME/.cache/clip-lora/venv-gpu}
py312=${PYTHON312:-python3.12}
gpu_numpy="numpy==2.5.*"
# test_compile_step: torch.compile's own arguments differ between the two torch releases.
tests=(tests/test_kernels.py tests/test_split_backward.py tests/test_flat_adapters.py tests/test_dropout.py tests/test_api.py tests/test_aot_compile.py tests/test_compile_step.py)

if [[ ! -x $venv/bin/python ]]; then
  echo "== creating $venv (torch 2.11.0, triton 3.6.0: several GB the first time)"
  "$py312" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "torch==2.11.0" "triton==3.6.0" "$gpu_numpy" pytest pytest-benchmark pytest-xdist \
    hypothesis safetensors timm tqdm matplotlib regex pillow
fi
py=$venv/bin/python
export PYTHONPATH=$PWD
"$py" -c "import torch, triton; assert (torch.__version__.split('+')[0], triton.__version__) == ('2.11.0', '3.6.0'), \
  f'{torch.__version__} / {triton.__version__}: not the GPU machine pair'"

echo "== 1. numpy<2.4: AOT builds and kernel tests must all pass"
"$venv/bin/python" -m pip install -q "numpy<2.4"
"$py" -m pytest -q -p no:cacheprovider -o addopts= -m "not slow" "${tests[@]}" -rs

echo "== 2. $gpu_numpy (the GPU machine's): interpreter tests skip naming the fix, none fails"
"$venv/bin/python" -m pip install -q "$gpu_numpy"
log=$(mktemp)
"$py" -m pytest -q -p no:cacheprovider -o addopts= -m "not slow" tests/test_kernels.py tests/test_dropout.py -rs | tee "$log"
grep -q 'pip install "numpy<2.4"' "$log" || { echo "expected interpreter tests skipped with the numpy fix"; exit 1; }
rm -f "$log"

if [[ ${1:-} == --dry-run ]]; then
  echo "== 3. bench/gpu_session.sh --dry-run"
  PYTHON=$py bash bench/gpu_session.sh --dry-run
fi
echo "== the GPU machine's versions: OK"
