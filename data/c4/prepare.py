"""C4 English (allenai/c4, the paper's pretraining data) in GPT-2 BPE tokens (tiktoken's 'gpt2' encoding).

    python data/c4/prepare.py [--shards N] [--val_shards M] [--input FILE ...] [--out_dir DIR] [--workers K]

Downloads the first N of the 1024 train shards and the first M of the 8 validation shards (json.gz, one JSON
document per line) into out_dir/downloads, tokenizes each into out_dir/tokens/<shard>.bin with the end-of-text
token after every document, then joins them in shard order into train.bin and val.bin (uint16). Shards already
downloaded or tokenized are reused, so an interrupted run picks up where it stopped; delete out_dir/tokens to
tokenize again. One train shard is roughly 356k documents (300 MB gzipped).

meta.json's vocab_size is 50304: GPT-2's 50257 tokens padded to a multiple of 64, which speeds up the
output layer's matmul; the extra ids never occur in the data.
"""

import argparse
import contextlib
import gzip
import http.client
import json
import multiprocessing
import os
import sys
import urllib.request
import zlib

import numpy as np
import tiktoken
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import fail, write_atomically  # noqa: E402

PADDED_VOCAB_SIZE = 50304
C4_URL = 'https://huggingface.co/datasets/allenai/c4/resolve/main/en/'
SPLIT_PREFIXES = {'train': 'c4-train', 'val': 'c4-validation'}
SHARD_COUNTS = {'train': 1024, 'val': 8}
DOCUMENTS_PER_TASK = 256
COPY_BYTES = 1 << 24  # even, so a chunk of a uint16 file never splits a token

_encoding = None


class ShardError(Exception):
    """What is wrong with a shard's contents; main turns it into one sentence naming the file."""


def parse_args(default_out_dir):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--shards', type=int, default=1, help='train shards to download, of 1024')
    parser.add_argument('--val_shards', type=int, default=1, help='validation shards to download, of 8')
    parser.add_argument('--input', nargs='+', help='local c4-train.*.json.gz / c4-validation.*.json.gz files '
                                                   'to use instead of downloading (--shards is then ignored)')
    parser.add_argument('--out_dir', default=default_out_dir, help='where train.bin, val.bin and meta.json go')
    parser.add_argument('--workers', type=int, default=os.cpu_count(), help='tokenizer processes')
    args = parser.parse_args()
    for name, count in (('shards', SHARD_COUNTS['train']), ('val_shards', SHARD_COUNTS['val'])):
        if not 1 <= getattr(args, name) <= count:
            fail(f"--{name} must be between 1 and {count}, the number of C4 shards in that split")
    if args.workers < 1:
        fail("--workers must be at least 1")
    return args


def gpt2():
    # loaded once per process: worker processes load their own copy on first use
    global _encoding
    if _encoding is None:
        _encoding = tiktoken.get_encoding('gpt2')
    return _encoding


def remote_sources(train_shards, val_shards):
    """The URLs of the first shards of each split, in shard order."""
    counts = {'train': train_shards, 'val': val_shards}
    return {split: [f"{C4_URL}{SPLIT_PREFIXES[split]}.{i:05d}-of-{SHARD_COUNTS[split]:05d}.json.gz"
                    for i in range(counts[split])] for split in SPLIT_PREFIXES}


def local_sources(paths):
    """The --input files grouped by split from their names, each split sorted by name, which is shard order."""
    sources = {split: [] for split in SPLIT_PREFIXES}
    for path in paths:
        name = os.path.basename(path)
        split = next((s for s, prefix in SPLIT_PREFIXES.items() if name.startswith(prefix)), None)
        if split is None or not name.endswith('.json.gz'):
            fail(f"--input {path} is not named like a C4 shard; expected c4-train.*.json.gz or c4-validation.*.json.gz")
        if not os.path.isfile(path):
            fail(f"--input {path} does not exist; pass existing c4-train.*.json.gz / c4-validation.*.json.gz files")
        sources[split].append(path)
    for split, split_paths in sources.items():
        names = sorted(os.path.basename(p) for p in split_paths)
        if not names:
            fail(f"--input has no {SPLIT_PREFIXES[split]}.*.json.gz file; give at least one shard of each split")
        twins = [a for a, b in zip(names, names[1:]) if a == b]
        if twins:
            fail(f"--input has two files named {twins[0]}; shards are cached by file name, so give each once")
    return {split: sorted(split_paths, key=os.path.basename) for split, split_paths in sources.items()}


def shard_name(source):
    return os.path.basename(source)[:-len('.json.gz')]


def download(url, path):
    """Fetches url to path through path.part, so a file at path is always a whole shard."""
    part = path + '.part'
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, 'wb') as f:
            size = int(response.headers.get('Content-Length') or 0) or None
            with tqdm(total=size, unit='B', unit_scale=True, desc=os.path.basename(path), disable=None) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            if size is not None and f.tell() != size:
                raise http.client.IncompleteRead(b'', size - f.tell())
    except (OSError, http.client.HTTPException) as error:
        fail(f"could not download {url} ({error}); pass --input with local copies of the .json.gz shards")
    os.replace(part, path)


def read_texts(path):
    """The "text" of every line of a json.gz shard, in order; ShardError says what is wrong with the file."""
    line_number = 0
    try:
        with gzip.open(path, 'rt', encoding='utf-8') as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    yield document_text(line, line_number)
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise ShardError(f"line {line_number + 1} cannot be read as gzipped UTF-8 ({error})") from None


def document_text(line, line_number):
    try:
        text = json.loads(line)['text']
    except (ValueError, KeyError, TypeError):
        text = None
    if not isinstance(text, str):
        raise ShardError(f'line {line_number} is not a JSON object with a "text" string')
    return text


def batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_batch(texts):
    encoding = gpt2()
    ids = []
    for text in texts:
        ids.extend(encoding.encode_ordinary(text))
        ids.append(encoding.eot_token)
    return np.array(ids, dtype=np.uint16), len(texts)


def write_tokens(f, path, tokenize_map):
    # tokenize_map is map or Pool.imap: both keep the batches in order, so the output is the same either way
    with tqdm(unit='doc', unit_scale=True, desc=os.path.basename(path), disable=None) as bar:
        for ids, documents in tokenize_map(tokenize_batch, batches(read_texts(path), DOCUMENTS_PER_TASK)):
            f.write(ids.tobytes())
            bar.update(documents)


def shard_tokens(source, out_dir, tokenize_map):
    """The path of source's token file, downloading and tokenizing it only if it is not there yet."""
    tokens_path = os.path.join(out_dir, 'tokens', shard_name(source) + '.bin')
    if os.path.exists(tokens_path):
        return tokens_path
    path = source
    if source.startswith('https://'):
        path = os.path.join(out_dir, 'downloads', os.path.basename(source))
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            download(source, path)
    os.makedirs(os.path.dirname(tokens_path), exist_ok=True)
    try:
        write_atomically(tokens_path, lambda f: write_tokens(f, path, tokenize_map))
    except ShardError as error:
        os.remove(tokens_path + '.tmp')
        fail(f'cannot read {path}: {error}; a C4 shard is gzipped JSON lines, each with a "text" field')
    print(f"{tokens_path}: {os.path.getsize(tokens_path) // 2:,} tokens")
    return tokens_path


def join_shards(paths, out_path):
    """Concatenates uint16 token files into out_path (fsynced) and returns how many documents they hold."""
    eot = gpt2().eot_token
    documents = 0

    def copy(f):
        nonlocal documents
        for path in paths:
            with open(path, 'rb') as shard:
                while chunk := shard.read(COPY_BYTES):
                    documents += int(np.count_nonzero(np.frombuffer(chunk, dtype=np.uint16) == eot))
                    f.write(chunk)

    with open(out_path, 'wb') as f:
        copy(f)
        f.flush()
        os.fsync(f.fileno())
    return documents


def write_dataset(out_dir, token_paths):
    """train.bin and val.bin from the shards' token files, then meta.json last."""
    tmp = {split: os.path.join(out_dir, f'{split}.bin.tmp') for split in token_paths}
    documents = {split: join_shards(paths, tmp[split]) for split, paths in token_paths.items()}
    for split, count in documents.items():
        if count == 0:
            for path in tmp.values():
                os.remove(path)
            fail(f"the {split} split has no documents; give shards with at least one line of text")
    # meta.json goes first and comes back last, so a run cut short between the two renames never looks complete
    meta_path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for split, path in tmp.items():
        os.replace(path, os.path.join(out_dir, f'{split}.bin'))
        print(f"{split}.bin: {os.path.getsize(os.path.join(out_dir, f'{split}.bin')) // 2:,} tokens, "
              f"{documents[split]:,} documents")
    meta = {'tokenizer': 'gpt2', 'vocab_size': PADDED_VOCAB_SIZE, 'tokenizer_vocab_size': gpt2().n_vocab,
            'documents': documents}
    meta_bytes = (json.dumps(meta, indent=1) + '\n').encode()
    write_atomically(meta_path, lambda f: f.write(meta_bytes))
    print(f"wrote {out_dir} (vocab_size {PADDED_VOCAB_SIZE})")


def main():
    args = parse_args(os.path.dirname(os.path.abspath(__file__)))
    sources = local_sources(args.input) if args.input else remote_sources(args.shards, args.val_shards)
    try:
        gpt2()
    except Exception as error:  # tiktoken downloads the encoding on first use
        fail(f"cannot load tiktoken's gpt2 encoding ({error}); set TIKTOKEN_CACHE_DIR to a folder that has it")
    os.makedirs(args.out_dir, exist_ok=True)
    pool = multiprocessing.Pool(args.workers) if args.workers > 1 else contextlib.nullcontext()
    with pool:
        tokenize_map = pool.imap if args.workers > 1 else map
        token_paths = {split: [shard_tokens(source, args.out_dir, tokenize_map) for source in split_sources]
                       for split, split_sources in sources.items()}
    write_dataset(args.out_dir, token_paths)


if __name__ == '__main__':
    main()
