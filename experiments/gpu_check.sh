#!/usr/bin/env bash
# The GPU path proven on one CUDA GPU, offline, in at most 8 minutes on an H100/H200 (an estimate: not yet run):
#   bash experiments/gpu_check.sh [REPORT_DIR]        # default experiments/results/gpu_check
# Each part runs under its own time limit, cut to what is left of GPU_CHECK_SECONDS (470 by default: all of it within
# 8 minutes), and writes into REPORT_DIR as it goes: a timeout or an out-of-memory error loses that part only.
# Largest first:
# 1. One rank of the authors' 8-GPU 1B run: torchrun with one process, config/llama_1b_lns.py (pure bf16,
#    compiled), the rank's 64 of the 512 sequences per step (2 micro-steps of 32) on synthetic 256-token rows;
#    6 steps with evaluations and saves, then a resume to step 9. rank_standin.txt: the losses continue, ms/iter,
#    peak memory, checkpoint copy and write times; rank_log.jsonl: the run's log.
# 2. bench.py on each paper config, 1B first, one micro-step at its per-GPU micro-batch, compiled, pure bf16:
#    ms/step, tokens/s, MFU, peak memory. A row lands in paper_bench.md and paper_bench.jsonl as each finishes.
# 3. tests/test_cuda.py: resume on CUDA, compile + bf16 autocast + fused AdamW, DDP over NCCL, background saves of
#    GPU tensors, the memory that dropping the logits saves, training steps under sync debug mode 'error'.
# parts.txt: each part's outcome and seconds as it ends (NAME.txt: its output); the last lines printed are the report.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-470}))
report=${1:-experiments/results/gpu_check}
mkdir -p "$report"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: torch sees no CUDA GPU')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$report/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a "$report/gpu.txt"
: > "$report/parts.txt"
failed=0

# part NAME LIMIT COMMAND...: COMMAND for at most LIMIT seconds (fewer when the deadline is nearer), its output in
# REPORT_DIR/NAME.txt as it comes, its outcome and time appended to parts.txt
part() {
  local name=$1 limit=$2 start=$SECONDS status outcome
  shift 2
  rm -f "$report/$name.txt"  # a part that does not run leaves no output of an earlier check behind
  limit=$((limit < deadline - SECONDS ? limit : deadline - SECONDS))
  if ((limit < 20)); then
    status=125 outcome='skipped: no time left'
  else
    echo "== $name, at most $limit s: $*"
    # SIGTERM first: torchrun passes it on to its workers, which a SIGKILL would leave holding the GPU
    timeout --kill-after=30 "$limit" "$@" 2>&1 | tee "$report/$name.txt"
    status=${PIPESTATUS[0]}
    case $status in
      0) outcome=ok ;;
      124 | 137) outcome="timed out at $limit s" ;;
      *) outcome="failed, exit status $status" ;;
    esac
  fi
  ((status == 0)) || failed=1
  echo "$name: $outcome, $((SECONDS - start)) s" | tee -a "$report/parts.txt"
}

# 1. The rank stand-in. Its data and its 8 GB checkpoints go to a scratch folder, not into the report.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python experiments/gpu_rank_check.py data "$scratch/rows"
resumed_at=6 last=9 sequences=64  # 512 sequences per step over 8 GPUs
# lr_decay_iters pinned to the config's max_iters: both halves run the real run's first learning rates
rank=(torchrun --standalone --nproc_per_node=1 train.py config/llama_1b_lns.py --data_dir="$scratch/rows"
      --out_dir="$scratch/out" --global_batch_size="$sequences" --lr_decay_iters=100000 --eval_interval=3
      --eval_tokens=100000 --eval_sequences=128 --log_interval=1)
part rank_train 200 "${rank[@]}" --max_iters="$resumed_at"
part rank_resume 120 "${rank[@]}" --max_iters="$last" --init_from=resume
rm -f "$report/rank_log.jsonl"
cp "$scratch/out/log.jsonl" "$report/rank_log.jsonl" 2> /dev/null
part rank_standin 30 python experiments/gpu_rank_check.py summary "$scratch/out/log.jsonl" \
  --resumed_at="$resumed_at" --last="$last" --sequences="$sequences" --startup="$report/rank_train.txt"

# 2. The paper configs (bench.py's PAPER_CONFIGS), largest first, each row written as soon as it is measured.
printf '%s\n' '| config | parameters | micro-batch (tokens) | ms/step | tokens/s | MFU | peak memory | warm-up |' \
  '| --- | --- | --- | --- | --- | --- | --- | --- |' > "$report/paper_bench.md"
: > "$report/paper_bench.jsonl"
# bench_row LABEL NAME LIMIT ARGS...: bench.py on ARGS as one part, then its row (or why there is none)
bench_row() {
  local label=$1 name=$2 limit=$3
  shift 3
  part "$name" "$limit" python bench.py "$@" --global_batch_size=None --gradient_accumulation_steps=1 \
    --steps=10 --warmup=3
  python - "$label" "$report/$name.txt" "$report/paper_bench" << 'EOF'
import json, os, sys
label, output, table = sys.argv[1:]
results = [line for line in open(output) if line.startswith('{')] if os.path.exists(output) else []
if not results:  # bench.py prints its JSON line last, on success only
    why = f"no result: see {os.path.basename(output)}" if os.path.exists(output) else 'not run: no time left'
    row = f"| {label} | {why} | | | | | | |"
else:
    r = {'config': label, **json.loads(results[-1])}
    with open(table + '.jsonl', 'a') as f:
        f.write(json.dumps(r) + '\n')
    row = (f"| {label} | {r['parameters'] / 1e6:,.0f}M | {r['tokens_per_step']:,} | {r['ms_per_step']:.1f} | "
           f"{r['tokens_per_sec']:,.0f} | {r['mfu']:.1%} | {r['peak_memory_bytes'] / 2**30:.1f} GiB | "
           f"{r['warmup_seconds']:.0f} s |")
with open(table + '.md', 'a') as f:
    f.write(row + '\n')
EOF
}
bench_row '1B (ffn 5461)' bench_1b_ffn5461 120 config/llama_1b_lns.py
bench_row '1B (ffn 5504)' bench_1b_ffn5504 120 config/llama_1b_lns.py --ffn_hidden=5504
bench_row 350M bench_350m 75 config/llama_350m_lns.py
bench_row 130M bench_130m 60 config/llama_130m_lns.py
bench_row 71M bench_71m 60 config/llama_71m_lns.py

# 3. The GPU tests; -v names each test as it ends, so a timeout keeps the results before it.
part tests 240 python -m pytest -v -s tests/test_cuda.py

echo
echo "== GPU check: $(head -n 1 "$report/gpu.txt"), $SECONDS s"
cat "$report/parts.txt"
cat "$report/rank_standin.txt" 2> /dev/null
cat "$report/paper_bench.md"
# the tests' result lines, which -v prints after each test's name
grep -ohE '(resume on CUDA|compiled bf16|peak memory with|no GPU synchronization).*' "$report/tests.txt" 2> /dev/null
tail -n 1 "$report/tests.txt" 2> /dev/null
exit "$failed"
