#!/usr/bin/env bash
# The GPU path proven on one CUDA GPU, offline, within GPU_CHECK_SECONDS (470 by default: a lent GPU's 15 minutes
# less its start-up and a rerun's margin):
#   bash experiments/gpu_check.sh [REPORT_DIR]        # default experiments/results/gpu_check
# Each part runs under its own time limit, cut to what is left of the budget, and writes into REPORT_DIR as it
# goes: a timeout or an out-of-memory error loses that part only. What decides most goes first; the limits of the
# parts before "the rest" add up to the budget (tests/test_gpu_check.py holds the order and the limits):
# 1. tests_core: tests/test_cuda.py's no-synchronization steps, DDP over NCCL and CUDA resume.
# 2. resume_pair: a compiled pure-bf16 run under torchrun stopped at iteration 3 and resumed to 6, against the same
#    run trained straight to 6 (on a CPU the two are equal to the bit; here the gap is measured and must stay
#    under gpu_rank_check.py's PAIR_TOLERANCE).
# 3. rank_train, rank_resume: one rank of the authors' 8-GPU 1B run: torchrun with one process,
#    config/llama_1b_lns.py (pure bf16, compiled), the rank's 64 of the 512 sequences per step on synthetic
#    256-token rows; 6 steps with evaluations and saves, then a resume to step 9. rank_standin.txt: the losses
#    continue, ms/iter, peak memory, checkpoint copy and write times; rank_log.jsonl: the run's log.
# 4. bench.py rows, compiled, pure bf16: 350M at the 8-GPU run's micro-batch (64 of its 128 ceiling), then 1B at
#    ffn_hidden 5461 (the config's) and 5504 (a multiple of 64): ms/step, tokens/s, MFU, peak memory.
# 5. The rest, while time remains: two levers at 350M, not defaults until measured (compiled with
#    max-autotune-no-cudagraphs; the loss in chunks, no full float32 logits), rows for 130M and 71M, the other tests
#    of tests/test_cuda.py.
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
  ((status == 0 || status == 125)) || failed=1  # skipped: only the rest can be, after the budget's parts
  echo "$name: $outcome, $((SECONDS - start)) s" | tee -a "$report/parts.txt"
}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python experiments/gpu_rank_check.py data "$scratch/rows"

# 1. The GPU tests that decide most; -v names each test as it ends, so a timeout keeps the results before it.
core='synchronizes or ddp or resume'
part tests_core 110 python -m pytest -v -s tests/test_cuda.py -k "$core"

# 2. A compiled pure-bf16 run under torchrun, stopped and resumed, against the same run straight through.
pair=(torchrun --standalone --nproc_per_node=1 train.py config/llama_71m_lns.py --data_dir="$scratch/rows"
      --n_layer=4 --n_embd=256 --n_head=4 --ffn_hidden=688 --global_batch_size=16 --max_iters=6 --lr_decay_iters=6
      --eval_interval=3 --eval_tokens=20000 --eval_sequences=64 --log_interval=1 --keep_last_n=1)
part resume_pair 90 bash -c '"$@" --out_dir="$0/straight" && mkdir -p "$0/resumed" &&
  cp "$0/straight/ckpt-0000003.pt" "$0/resumed/ckpt.pt" && cp "$0/straight/log.jsonl" "$0/resumed/" &&
  "$@" --out_dir="$0/resumed" --init_from=resume &&
  python experiments/gpu_rank_check.py pair "$0/straight" "$0/resumed" --resumed_at=3 --last=6' \
  "$scratch/pair" "${pair[@]}"

# 3. The rank stand-in. Its 8 GB checkpoints go to the scratch folder, not into the report.
resumed_at=6 last=9 sequences=64  # 512 sequences per step over 8 GPUs
# lr_decay_iters pinned to the config's max_iters: both halves run the real run's first learning rates
rank=(torchrun --standalone --nproc_per_node=1 train.py config/llama_1b_lns.py --data_dir="$scratch/rows"
      --out_dir="$scratch/out" --global_batch_size="$sequences" --lr_decay_iters=100000 --eval_interval=3
      --eval_tokens=100000 --eval_sequences=128 --log_interval=1)
part rank_train 100 "${rank[@]}" --max_iters="$resumed_at"
part rank_resume 60 "${rank[@]}" --max_iters="$last" --init_from=resume
rm -f "$report/rank_log.jsonl"
cp "$scratch/out/log.jsonl" "$report/rank_log.jsonl" 2> /dev/null
rm -f "$report/rank_standin.txt"
if [ -f "$report/rank_train.txt" ]; then  # the stand-in ran, or began to: its log says how far it got
  python experiments/gpu_rank_check.py summary "$scratch/out/log.jsonl" --resumed_at="$resumed_at" --last="$last" \
    --sequences="$sequences" --startup="$report/rank_train.txt" > "$report/rank_standin.txt" 2>&1 || failed=1
fi

# 4. The bench rows that decide the 8-GPU run's speed.
# the bench rows' table, each row written as soon as it is measured
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
bench_row '350M (micro-batch 64)' bench_350m 40 config/llama_350m_lns.py --batch_size=64
bench_row '1B (ffn 5461)' bench_1b_ffn5461 35 config/llama_1b_lns.py
bench_row '1B (ffn 5504)' bench_1b_ffn5504 35 config/llama_1b_lns.py --ffn_hidden=5504

# 5. The rest, while time remains.
bench_row '350M (max-autotune-no-cudagraphs)' bench_350m_autotune 150 config/llama_350m_lns.py --batch_size=64 \
  --compile_mode=max-autotune-no-cudagraphs
bench_row '350M (loss in chunks of 8,192 tokens)' bench_350m_chunked_loss 60 config/llama_350m_lns.py --batch_size=64 \
  --loss_chunk_tokens=8192
bench_row 130M bench_130m 60 config/llama_130m_lns.py
bench_row 71M bench_71m 60 config/llama_71m_lns.py
part tests_rest 120 python -m pytest -v -s tests/test_cuda.py -k "not ($core)"

echo
echo "== GPU check: $(head -n 1 "$report/gpu.txt"), $SECONDS s"
cat "$report/parts.txt"
cat "$report/rank_standin.txt" 2> /dev/null
cat "$report/paper_bench.md"
# the tests' result lines, which -v prints after each test's name
cat "$report/resume_pair.txt" 2> /dev/null | grep '^resume pair'
grep -ohE '(resume on CUDA|compiled bf16|peak memory with|no GPU synchronization).*' "$report"/tests_*.txt 2> /dev/null
tail -qn 1 "$report"/tests_*.txt 2> /dev/null
exit "$failed"
