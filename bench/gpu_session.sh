#!/usr/bin/env bash
# One GPU session's measurements in one command, for the offline GPU machine
# (../shared/gpu/README.md): the CUDA correctness tests at real shapes, the benchmark
# suite at full size, and the report.  Everything lands in $OUT (default
# bench/results/<gpu>-<date>/), ready to commit under bench/results/.
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && bash bench/gpu_session.sh
set -uo pipefail
name=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")-$(date -u +%Y%m%d)
OUT=${OUT:-bench/results/$name}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# Correctness first: a kernel that fails here must not be timed.
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_dropout.py tests/test_api.py \
  2>&1 | tee "$OUT/cuda-tests.log"
status=${PIPESTATUS[0]}
python3 -m pytest bench/ --benchmark-only -q -p no:cacheprovider --benchmark-json "$OUT/$name.json" \
  2>&1 | tee "$OUT/bench.log"
python3 -m bench.report "$OUT/$name.json" --out "$OUT/report" 2>&1 | tee -a "$OUT/bench.log"
exit "$status"
