# What the studies' GPU scripts share; they set `study` (the study's command line), `out` (the prefix of each
# part's output file) and, where it is not data/shakespeare_char, `data` (the prepared data the study reads), then
# source this file from the repository root.
#   part NAME JOBS ARGS...   one restricted study in the background, stopped after $limit seconds (0: no limit)
#   summarize                waits for every part, counts each one's ended and failed runs; fails if a run failed
limit=${limit:-0}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: torch sees no CUDA GPU')" || exit 1
data=${data:-data/shakespeare_char}
python -c "import os, sys; sys.exit(0 if os.path.exists('$data/val.bin') else
'error: no prepared data in $data; run its prepare.py (see the study script)')" || exit 1
export TORCHINDUCTOR_COMPILE_THREADS=1  # a dozen or more compiling processes already fill the CPU

part() {
    local name=$1 jobs=$2
    shift 2
    timeout "$limit" $study --device cuda --threads 1 --jobs "$jobs" "$@" > "${out}_$name.out" 2>&1 &
}

summarize() {
    wait
    local failed=0
    for file in "${out}"_*.out; do
        local failures=$(grep -c '^failed' "$file")
        echo "== $file: $(grep -c '^finished\|^diverged' "$file") run(s) ended, $failures failed"
        if [ "$failures" -gt 0 ]; then
            grep '^failed' "$file" | head -n 3
            failed=1
        fi
    done
    return $failed
}
