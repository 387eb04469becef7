"""Tiny Shakespeare as characters: one token per distinct character (65 of them).

    python data/shakespeare_char/prepare.py [--input input.txt] [--out_dir DIR]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import TINY_SHAKESPEARE_URL, parse_args, read_text, split_text, write_dataset  # noqa: E402


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    args = parse_args(__doc__.splitlines()[0], here)
    text = read_text(args.input, TINY_SHAKESPEARE_URL, os.path.join(here, 'input.txt'))
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    train_text, val_text = split_text(text)
    write_dataset(args.out_dir, [index[c] for c in train_text], [index[c] for c in val_text],
                  {'tokenizer': 'char', 'vocab_size': len(chars), 'chars': ''.join(chars)})


if __name__ == '__main__':
    main()
