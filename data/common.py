"""What every prepare.py here shares: reading the source text, and writing train.bin / val.bin / meta.json
(uint16 token ids, the format train.py memory-maps) so that a failed run never leaves a half-written dataset."""

import argparse
import json
import os
import sys
import urllib.request

import numpy as np

TINY_SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def parse_args(description, default_out_dir):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--input', help='a local copy of the text instead of downloading it')
    parser.add_argument('--out_dir', default=default_out_dir, help='where train.bin, val.bin and meta.json go')
    args = parser.parse_args()
    check_out_dir(args.out_dir)  # before any download or tokenizing
    return args


def check_out_dir(out_dir):
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--out_dir {out_dir} is a file, not a folder; pass --out_dir with a folder for train.bin, val.bin and "
             f"meta.json (new, or holding a dataset to replace)")


def read_text(input_path, url, cache_path):
    """The text of input_path, else of cache_path (an earlier download), else downloaded from url to cache_path."""
    path = input_path or cache_path
    if input_path is None and not os.path.exists(cache_path):
        print(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as error:
            fail(f"could not download {url} ({error}); pass --input FILE with a local copy of the text")
        write_atomically(cache_path, lambda f: f.write(data))
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as error:
        fail(f"cannot read {path} as UTF-8 text ({error}); pass --input with a readable text file")
    if not text.strip():
        fail(f"{path} is empty; pass --input with a non-empty text file")
    return text


def split_text(text, train_fraction=0.9):
    cut = int(len(text) * train_fraction)
    return text[:cut], text[cut:]


def write_atomically(path, write):
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_dataset(out_dir, train_ids, val_ids, meta):
    """Writes train.bin, val.bin (uint16) and meta.json, each atomically, after checking the ids fit."""
    for split, ids in (('train', train_ids), ('val', val_ids)):
        if len(ids) < 2:
            fail(f"the {split} split has {len(ids)} tokens; give a longer text")
        if max(ids) >= 2 ** 16 or max(ids) >= meta['vocab_size']:
            fail(f"token id {max(ids)} does not fit the vocabulary of {meta['vocab_size']} (uint16 files)")
    check_out_dir(out_dir)  # again, for a prepare.py with its own parse_args (mixed_char's)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:  # a file on its path, or no permission
        fail(f"cannot make the folder --out_dir {out_dir} ({error.strerror}); pass --out_dir with a folder you can "
             f"write")
    for split, ids in (('train', train_ids), ('val', val_ids)):
        array = np.asarray(ids, dtype=np.uint16)
        write_atomically(os.path.join(out_dir, f'{split}.bin'), lambda f: f.write(array.tobytes()))
        print(f"{split}.bin: {len(array):,} tokens")
    meta_bytes = (json.dumps(meta, indent=1) + '\n').encode()
    write_atomically(os.path.join(out_dir, 'meta.json'), lambda f: f.write(meta_bytes))
    print(f"wrote {out_dir} (vocab_size {meta['vocab_size']})")
