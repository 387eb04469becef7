"""Tiny Shakespeare in GPT-2 BPE tokens (tiktoken's 'gpt2' encoding).

    python data/shakespeare/prepare.py [--input input.txt] [--out_dir DIR]

meta.json's vocab_size is 50304: GPT-2's 50257 tokens padded to a multiple of 64, which speeds up the
output layer's matmul; the extra ids never occur in the data.
"""

import os
import sys

import tiktoken

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import TINY_SHAKESPEARE_URL, fail, parse_args, read_text, split_text, write_dataset  # noqa: E402

PADDED_VOCAB_SIZE = 50304


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    args = parse_args(__doc__.splitlines()[0], here)
    try:
        encoding = tiktoken.get_encoding('gpt2')
    except Exception as error:  # tiktoken downloads the encoding on first use, raising whatever its HTTP library does
        fail(f"could not fetch tiktoken's GPT-2 encoding ({type(error).__name__}); set TIKTOKEN_CACHE_DIR to a folder "
             f"holding tiktoken's cache of it, or go online")
    text = read_text(args.input, TINY_SHAKESPEARE_URL, os.path.join(here, 'input.txt'))
    train_text, val_text = split_text(text)
    write_dataset(args.out_dir, encoding.encode_ordinary(train_text), encoding.encode_ordinary(val_text),
                  {'tokenizer': 'gpt2', 'vocab_size': PADDED_VOCAB_SIZE, 'tokenizer_vocab_size': encoding.n_vocab})


if __name__ == '__main__':
    main()
