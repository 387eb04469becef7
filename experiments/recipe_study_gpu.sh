#!/usr/bin/env bash
# The recipe study's costly parts on one CUDA GPU, all at once: a run of these sizes leaves a GPU almost idle, so
# about sixteen share it (each with one CPU thread to launch its kernels).
#   bash experiments/recipe_study_gpu.sh [SECONDS]      # each part stops after SECONDS (default: no limit)
# Parts, each an experiments/recipe_study.py restricted to it (finished runs are skipped, interrupted ones start
# again next time):
#   - the authors' pure bf16, alone and with embedding std 0.632, at 12 blocks (too slow on a CPU: bf16 matmuls
#     there run about ten times slower than float32);
#   - a device control: our recipe at 12 blocks and lr 1e-2 on this GPU, 3 seeds, in runs/recipe_study_gpu/, to
#     compare with the same cell run on a CPU (the study's GPU runs are full float32, TF32 off, like a CPU's);
#   - width 256; 24 blocks; 48 blocks.
# Each part's output goes to experiments/runs/recipe_study_gpu_<part>.out. Afterwards, on any machine:
#   python experiments/recipe_study.py --no_train
set -uo pipefail
cd "$(dirname "$0")/.."
limit=${1:-0} study="python experiments/recipe_study.py" out=experiments/runs/recipe_study_gpu
source experiments/gpu_parts.sh
part pure_bf16 4 --depths 12 --widths --factors pure_bf16 pure_bf16_embedding_std_0.632
part control 2 --depths 12 --learning_rates 1e-2 --widths --factors --runs experiments/runs/recipe_study_gpu \
    --results experiments/results/recipe_study_gpu --figures experiments/figures/recipe_study_gpu
part width 2 --depths 12 --widths 64 128 256 --factors
part depth24 4 --depths 12 24 --widths --factors
part depth48 4 --depths 48 --widths --factors
summarize
