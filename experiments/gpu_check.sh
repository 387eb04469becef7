#!/usr/bin/env bash
# The GPU path proven on one CUDA GPU, offline, in about 5 minutes on an H100/H200 (an estimate: not yet run):
#   bash experiments/gpu_check.sh [REPORT_DIR]        # default experiments/results/gpu_check
# 1. tests/test_cuda.py: resume on CUDA (exact in float32, within 2% in bf16), compile + bf16 autocast + fused
#    AdamW, DDP over NCCL under torchrun with one process, background saves of GPU tensors, the memory that
#    dropping the logits saves. The tests prepare their own small corpus (tiny Shakespeare from ../shared when it
#    is there).
# 2. bench.py --paper: the 71M, 130M, 350M and 1B configs (the 1B with FFN 5461 and 5504) at their per-GPU
#    micro-batch, compiled, bf16: ms/step, tokens/s, MFU, peak memory.
# Everything lands in REPORT_DIR (tests.txt, paper_bench.md, paper_bench.json); the last lines printed are the report.
set -uo pipefail
cd "$(dirname "$0")/.."
report=${1:-experiments/results/gpu_check}
mkdir -p "$report"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: torch sees no CUDA GPU')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$report/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a "$report/gpu.txt"

start=$SECONDS
timeout 180 python -m pytest -q -rA -s tests/test_cuda.py 2>&1 | tee "$report/tests.txt"
tests_status=${PIPESTATUS[0]}
timeout 240 python bench.py --paper --json "$report/paper_bench.json" | tee "$report/paper_bench.md"
bench_status=${PIPESTATUS[0]}

echo
echo "== GPU check: $(head -n 1 "$report/gpu.txt"), $((SECONDS - start)) s"
grep -E '^(resume on CUDA|compiled bf16|peak memory with)' "$report/tests.txt"
tail -n 1 "$report/tests.txt"
cat "$report/paper_bench.md"
echo "tests exit status $tests_status, benchmark exit status $bench_status (124: timed out)"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
