"""The Python pieces of experiments/gpu_check.sh: a synthetic dataset in the authors' rows layout, the summary of the
stand-in for one rank of their 8-GPU 1B run (its log.jsonl: the losses continue across its resume), and the
comparison of a run stopped and resumed with the same run trained straight through.

    python experiments/gpu_rank_check.py data FOLDER     # 4,096 train and 1,024 val rows of 256 tokens
    python experiments/gpu_rank_check.py summary LOG --resumed_at 6 --last 9 --sequences 64 [--startup OUTPUT]
    python experiments/gpu_rank_check.py pair STRAIGHT RESUMED --resumed_at 3 --last 6
"""

import argparse
import json
import math
import os
import statistics
import sys

import numpy as np

# config/llama_1b_lns.py's data: t5-base's vocabulary, one document per 256-token row (data/c4/prepare.py --layout rows)
ROW_LENGTH, PAD_ID, EOS_ID, VOCAB_SIZE = 256, 0, 1, 32000


def write_rows(folder, train_rows=4096, val_rows=1024, seed=0):
    """Documents of random ids 2..31999, each with its EOS last and right-padded with PAD_ID; lengths drawn up to
    twice a row, so that about half the rows are cut full, as C4's longer documents are."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for split, count in (('train', train_rows), ('val', val_rows)):
        lengths = rng.integers(2, 2 * ROW_LENGTH, count).clip(max=ROW_LENGTH)  # tokens with the EOS
        rows = rng.integers(2, VOCAB_SIZE, (count, ROW_LENGTH), dtype=np.uint16)
        rows[np.arange(ROW_LENGTH) >= lengths[:, None]] = PAD_ID
        rows[np.arange(count), lengths - 1] = EOS_ID
        rows.tofile(os.path.join(folder, f'{split}.bin'))
    with open(os.path.join(folder, 'meta.json'), 'w') as f:
        json.dump({'layout': 'rows', 'row_length': ROW_LENGTH, 'pad_id': PAD_ID, 'eos_id': EOS_ID,
                   'vocab_size': VOCAB_SIZE, 'tokenizer': 'synthetic'}, f)


def summary(log_path, resumed_at, last, sequences, startup=None):
    """(lines, problems): the stand-in's speed, peak memory, checkpoint times and losses from its log.jsonl, and
    what is wrong with them (empty when the run did a rank's work, saved, resumed and continued)."""
    if not os.path.exists(log_path):
        return [], [f"no log at {log_path}: the training run failed before its first record"]
    with open(log_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    steps = {r['iter']: r for r in records if 'loss' in r}
    saves = [r for r in records if 'checkpoint_copy_seconds' in r]
    evals = [r for r in records if 'val_loss' in r]
    lines = []
    if startup and os.path.exists(startup):  # the trainer's own account of the processes and the micro-steps
        with open(startup) as f:
            lines += [line.strip() for line in f if 'process(es)' in line]
    lines.append('training loss by iteration: ' + ', '.join(f"{i} {steps[i]['loss']:.4f}" for i in sorted(steps)))
    lines.append('validation loss by iteration: ' + ', '.join(f"{r['iter']} {r['val_loss']:.4f}" for r in evals))
    for name, iterations in (('first run', range(1, resumed_at + 1)), ('resumed run', range(resumed_at + 1, last + 1))):
        timed = [steps[i] for i in iterations if i in steps and steps[i]['ms_per_iter'] is not None]
        if timed:  # the first step of each process (compilation) is not timed
            mfu = [r['mfu'] for r in timed if r['mfu'] is not None]
            lines.append(f"{name}: {statistics.median(r['ms_per_iter'] for r in timed):.0f} ms/iter, "
                         f"{statistics.median(r['tokens_per_sec'] for r in timed):,.0f} tokens/s, MFU "
                         + (f"{statistics.median(mfu):.1%}" if mfu else 'unknown') + f" (median of {len(timed)})")
    peaks = [r['peak_memory_gib'] for r in steps.values() if r.get('peak_memory_gib') is not None]
    if peaks:
        lines.append(f"peak memory {max(peaks):.1f} GiB (torch.cuda.max_memory_allocated since the start, "
                     f"the evaluations and saves among it)")
    for r in saves:
        lines.append(f"checkpoint at iteration {r['iter']}: {r['checkpoint_copy_seconds']:.1f} s copying to CPU "
                     f"memory (training waits), {r['checkpoint_write_seconds']:.1f} s writing in the background")

    problems = []
    if sorted(steps) != list(range(1, last + 1)):
        problems.append(f"training records for iterations {sorted(steps)}, not 1 to {last}")
    timed = [r for r in steps.values() if r['ms_per_iter'] is not None]
    if timed:  # tokens per step from the log's own speed: the micro-batch times the micro-steps of this process
        per_step = timed[0]['tokens_per_sec'] * timed[0]['ms_per_iter'] / 1000 / ROW_LENGTH
        if round(per_step) != sequences:
            problems.append(f"{per_step:.0f} sequences per step, not a rank's {sequences}")
    if not peaks:
        problems.append("no peak_memory_gib in the training records (not run on a GPU?)")
    if resumed_at not in {r['iter'] for r in saves}:
        problems.append(f"no checkpoint saved at iteration {resumed_at}")
    before, after = steps.get(resumed_at, {}).get('loss'), steps.get(resumed_at + 1, {}).get('loss')
    if before is not None and after is not None:
        # a sanity check (the exact one is tests/test_cuda.py's resume test): a state that did not come back shows
        # as a non-finite loss or a jump, where one more step at the warmup's learning rate moves it by far less
        if not (math.isfinite(after) and abs(after - before) <= 0.2 * abs(before)):
            problems.append(f"the loss jumps across the resume: {before:.4f} at {resumed_at}, {after:.4f} at "
                            f"{resumed_at + 1}")
        else:
            lines.insert(0, f"losses continue across the resume: {before:.4f} at iteration {resumed_at}, "
                            f"{after:.4f} at {resumed_at + 1}")
    return lines, problems


PAIR_TOLERANCE = 1e-3  # relative, on each training loss and weight: a bf16 spacing is 2^-8, about 4e-3


def pair(straight, resumed, resumed_at, last):
    """(lines, problems): how far the run resumed at resumed_at ends from the one trained straight to last, in
    its training losses after the resume and its final weights (on a CPU the two are equal to the bit)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from model import read_checkpoint
    losses = []
    for folder in (straight, resumed):
        path = os.path.join(folder, 'log.jsonl')
        if not os.path.exists(path):
            return [], [f"no log at {path}: that run failed before its first record"]
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        losses.append({r['iter']: r['loss'] for r in records if 'loss' in r and r['iter'] > resumed_at})
    if sorted(losses[0]) != sorted(losses[1]) or sorted(losses[1]) != list(range(resumed_at + 1, last + 1)):
        return [], [f"training records after the resume: {sorted(losses[0])} straight, {sorted(losses[1])} resumed"]
    loss_gap = max(abs(losses[1][i] - losses[0][i]) / abs(losses[0][i]) for i in losses[0])
    weights = [read_checkpoint(os.path.join(folder, 'ckpt.pt'))['model'] for folder in (straight, resumed)]
    weight_gap = max(((weights[1][k].float() - weights[0][k].float()).abs().max()
                      / weights[0][k].float().abs().max().clamp(min=1e-12)).item() for k in weights[0])
    lines = [f"iterations {resumed_at + 1}-{last} after a stop at {resumed_at}: training losses within "
             f"{loss_gap:.1e} (relative) of the straight run's, final weights within {weight_gap:.1e}"]
    problems = [f"the resumed run leaves the straight one by {gap:.1e} in its {what}, more than {PAIR_TOLERANCE}"
                for what, gap in (('losses', loss_gap), ('weights', weight_gap)) if gap > PAIR_TOLERANCE]
    return lines, problems


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    commands.add_parser('data', help='write the synthetic rows dataset').add_argument('folder')
    summarize = commands.add_parser('summary', help="summarize and check the stand-in's log.jsonl")
    summarize.add_argument('log')
    summarize.add_argument('--resumed_at', type=int, required=True, help='the first run\'s last iteration')
    summarize.add_argument('--last', type=int, required=True, help="the resumed run's last iteration")
    summarize.add_argument('--sequences', type=int, required=True, help='sequences per step of this process')
    summarize.add_argument('--startup', help="the first run's output, for the trainer's start-up lines")
    compare = commands.add_parser('pair', help='compare a resumed run with the same run trained straight through')
    compare.add_argument('straight')
    compare.add_argument('resumed')
    compare.add_argument('--resumed_at', type=int, required=True)
    compare.add_argument('--last', type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == 'data':
        write_rows(args.folder)
        print(f"wrote synthetic rows to {args.folder}")
        return 0
    if args.command == 'pair':
        name, (lines, problems) = 'resume pair', pair(args.straight, args.resumed, args.resumed_at, args.last)
    else:
        name, (lines, problems) = 'rank stand-in', summary(args.log, args.resumed_at, args.last, args.sequences,
                                                           args.startup)
    print('\n'.join(f"{name}: {line}" for line in lines))
    print(f'{name}: ' + ('FAILED: ' + '; '.join(problems) if problems else 'ok'))
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
