"""
How far train.py's fixed evaluation set (eval_sequences windows evenly spaced over val.bin) can be from the whole
validation split, for one run's loss and for the gap between two runs scored on it.

    python experiments/eval_noise.py RUN_A RUN_B [--data data/mixed_char] [--sizes 640 2048]

Each run's checkpoint scores every window of block_size + 1 tokens that starts at a multiple of block_size (the
whole split, each target once) and the fixed sets of the given sizes. Printed per run and for the gap RUN_B - RUN_A:
the whole split's loss, each set's and its difference from the whole, and the standard error a set of that size
would have as a random sample of the split's windows (their standard deviation over the square root of the size).
"""

import argparse
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataloader import TokenData, evenly_spaced, read_meta  # noqa: E402
from model import GPT, read_checkpoint  # noqa: E402


@torch.no_grad()
def window_losses(model, data, starts, block_size, batch=256):
    """The mean loss of each window starting at `starts`."""
    losses = []
    for chunk in starts.split(batch):
        x, y = data.read('val', chunk, block_size, torch.device('cpu'))
        logits, _ = model(x)
        losses += F.cross_entropy(logits.transpose(1, 2), y, reduction='none').mean(1).tolist()
    return losses


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs=2, help='two run folders holding ckpt.pt, trained on the same data')
    parser.add_argument('--data', default=os.path.join('data', 'mixed_char'))
    parser.add_argument('--sizes', type=int, nargs='+', default=[640, 2048])
    args = parser.parse_args(argv)
    data = TokenData(args.data, read_meta(args.data), seed=0)
    tokens = len(data.tokens('val'))
    scored = {}
    for run in args.runs:
        checkpoint = read_checkpoint(os.path.join(run, 'ckpt.pt'))
        model = GPT.from_checkpoint(checkpoint).eval()
        block_size = model.config.block_size
        whole = torch.arange(0, tokens - block_size - 1, block_size)
        scored[run] = {'whole': window_losses(model, data, whole, block_size)}
        for size in args.sizes:
            scored[run][size] = window_losses(model, data, evenly_spaced(size, tokens - block_size - 1), block_size)
    first, second = args.runs
    gap = {key: [b - a for a, b in zip(scored[first][key], scored[second][key])] for key in scored[first]}
    print(f"{args.data}: {tokens:,} validation tokens, {len(gap['whole']):,} windows of {block_size} in the whole "
          f"split")
    for name, by_key in [*scored.items(), (f'{second} - {first}', gap)]:
        whole = statistics.mean(by_key['whole'])
        spread = statistics.stdev(by_key['whole'])
        sets = ', '.join(f"{size} windows {statistics.mean(by_key[size]):+.4f} "
                         f"({statistics.mean(by_key[size]) - whole:+.4f} from the whole; standard error of a random "
                         f"{size}: {spread / math.sqrt(size):.4f})" for size in args.sizes)
        print(f"{name}: whole split {whole:+.4f}; {sets}")


if __name__ == '__main__':
    main(sys.argv[1:])
