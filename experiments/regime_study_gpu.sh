#!/usr/bin/env bash
# The regime study's GPU arms on one CUDA GPU, side by side: arm B (12 blocks, the whole mixed_char corpus, under one
# pass) at widths 256 and 512, each at 3e-4, 1e-3 and 3e-3 for Pre-LN and LNS with seeds 0-2 (36 runs), every run's
# layers measured as it finishes. Runs of these sizes leave a GPU almost idle, so they share it, each with one CPU
# thread to launch its kernels.
#   bash experiments/regime_study_gpu.sh [SECONDS]   # each part stops after SECONDS (default: no limit)
# It needs data/mixed_char prepared (python data/mixed_char/prepare.py; a lent device's call carries the folder).
# Finished runs are skipped, a run cut off starts again next time. Each part's output goes to
# experiments/runs/regime_study_gpu_<part>.out. Afterwards, on any machine:
#   python experiments/regime_study.py --no_train --arms A B C B256 B512
set -uo pipefail
cd "$(dirname "$0")/.."
limit=${1:-0} study="python experiments/regime_study.py" out=experiments/runs/regime_study_gpu data=data/mixed_char
source experiments/gpu_parts.sh
part width256 18 --arms B256
part width512 18 --arms B512
summarize
