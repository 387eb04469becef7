#!/usr/bin/env bash
# The tuned study's costly cells on one CUDA GPU, side by side: runs of these sizes leave a GPU almost idle, so
# about twenty share it, each with one CPU thread to launch its kernels.
#   bash experiments/tuned_study_gpu.sh [SECONDS]   # each part stops after SECONDS (default: no limit)
# Parts, each an experiments/tuned_study.py restricted to it (finished runs are skipped, a run cut off starts again
# next time):
#   - 24 blocks: the study's rule as on a CPU (screen, seeds, reruns), into runs/tuned_study/;
#   - 48 blocks at 1e-2 and 3e-2 (grown past an edge where a best sits on it), into runs/tuned_study/;
#   - width 256 at 12 blocks, 3e-4 to 3e-3, into runs/tuned_study_w256/.
# The runs are full float32 with TF32 off, like a CPU's. Each part's output goes to
# experiments/runs/tuned_study_gpu_<part>.out. Afterwards, on any machine:
#   python experiments/tuned_study.py --no_train --depths 6 12 24 48
#   python experiments/tuned_study.py --no_train --width 256 --depths 12
set -uo pipefail
cd "$(dirname "$0")/.."
limit=${1:-0} study="python experiments/tuned_study.py" out=experiments/runs/tuned_study_gpu
source experiments/gpu_parts.sh
part depth24 8 --depths 24
part depth48 6 --depths 48 --learning_rates 0.01 0.03
part width256 6 --depths 12 --width 256 --learning_rates 0.0003 0.001 0.003
summarize
