"""C4 English (allenai/c4, the paper's pretraining data) as uint16 token files, in one of two layouts.

    python data/c4/prepare.py [--layout packed|rows] [--shards N] [--val_shards M] [--input FILE ...]
                              [--out_dir DIR] [--workers K] [--delete_downloads]
                              [--tokenizer_file PATH] [--row_length L]

--layout packed (the default): GPT-2 BPE tokens (tiktoken's 'gpt2' encoding), documents end to end with the
end-of-text token after each. meta.json's vocab_size is 50304: GPT-2's 50257 tokens padded to a multiple of 64,
which speeds up the output layer's matmul; the extra ids never occur in the data.

--layout rows: the authors' data, one document per row. Each document is tokenized alone with the t5-base
tokenizer (the `tokenizers` library reading t5-base's tokenizer.json, downloaded once into out_dir/downloads, or
--tokenizer_file offline), truncated to --row_length tokens (256) with its end token </s> kept last, and
right-padded with <pad>. meta.json's vocab_size is 32000: T5's 100 sentinel tokens (<extra_id_N>, ids
32000-32099) belong to its span-corruption objective, so a document that tokenizes to one is refused.

Downloads the first N of the 1024 train shards and the first M of the 8 validation shards (json.gz, one JSON
document per line) into out_dir/downloads, tokenizes each into its own file under out_dir/tokens (packed) or
out_dir/rows<L>-<tokenizer hash> (rows), then joins them in shard order into train.bin and val.bin. Shards already
downloaded or tokenized are reused, so an interrupted run picks up where it stopped; delete those folders to
tokenize again. --delete_downloads removes each downloaded json.gz (~300 MB) once its tokens are written, since a
tokenized shard is never read again; --input files are never deleted.

One pass without repetition, at 512 sequences per step: a train shard holds about 356k documents (364,868,892 in
1,024 shards), so --layout rows needs steps x 512 / 356,317 shards; --layout packed needs steps x 131,072 tokens
at about 162M GPT-2 tokens per shard (estimated from ~1.3B tokens in 8 shards, not measured; each run prints every
shard's count).

    config   steps    rows layout: rows, shards    packed layout: tokens, shards
    71M      10,000    5.12M,  15                   1.31B,  about 9
    130M     20,000   10.24M,  29                   2.62B,  about 17
    250M     40,000   20.48M,  58                   5.24B,  about 33
    350M     60,000   30.72M,  87                   7.86B,  about 49
    1B      100,000   51.20M, 144                  13.11B,  about 81

The authors evaluate on 10M non-pad validation tokens; one validation shard (45.6k documents) holds at most 11.7M
tokens with the pads, so likely fewer than 10M without: take --val_shards 2. meta.json's non_pad_tokens says
what each split holds.
"""

import argparse
import contextlib
import functools
import gzip
import hashlib
import http.client
import json
import multiprocessing
import os
import re
import sys
import urllib.request
import zlib

import numpy as np
import tiktoken
from tokenizers import Tokenizer
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import check_out_dir, fail, write_atomically  # noqa: E402

PADDED_VOCAB_SIZE = 50304
C4_URL = 'https://huggingface.co/datasets/allenai/c4/resolve/main/en/'
T5_TOKENIZER_URL = 'https://huggingface.co/google-t5/t5-base/resolve/main/tokenizer.json'
T5_SENTINEL = re.compile(r'<extra_id_\d+>')
SPLIT_PREFIXES = {'train': 'c4-train', 'val': 'c4-validation'}
SHARD_COUNTS = {'train': 1024, 'val': 8}
DOCUMENTS_PER_TASK = 256
COPY_BYTES = 1 << 24  # even, so a chunk of a uint16 file never splits a token

_encoding = None
_t5_tokenizers = {}


class ShardError(Exception):
    """What is wrong with a shard's contents; main turns it into one sentence naming the file."""


def parse_args(default_out_dir):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--layout', choices=('packed', 'rows'), default='packed',
                        help='packed: GPT-2 BPE, documents end to end; rows: t5-base, one padded document per row')
    parser.add_argument('--shards', type=int, default=1, help='train shards to download, of 1024')
    parser.add_argument('--val_shards', type=int, default=1, help='validation shards to download, of 8')
    parser.add_argument('--input', nargs='+', help='local c4-train.*.json.gz / c4-validation.*.json.gz files '
                                                   'to use instead of downloading (--shards is then ignored)')
    parser.add_argument('--out_dir', default=default_out_dir, help='where train.bin, val.bin and meta.json go')
    parser.add_argument('--workers', type=int, default=os.cpu_count(), help='tokenizer processes')
    parser.add_argument('--delete_downloads', action='store_true',
                        help='delete each downloaded json.gz once it is tokenized')
    parser.add_argument('--tokenizer_file', help="rows layout: a local copy of t5-base's tokenizer.json")
    parser.add_argument('--row_length', type=int, default=256, help='rows layout: tokens per row')
    args = parser.parse_args()
    for name, count in (('shards', SHARD_COUNTS['train']), ('val_shards', SHARD_COUNTS['val'])):
        if not 1 <= getattr(args, name) <= count:
            fail(f"--{name} must be between 1 and {count}, the number of C4 shards in that split")
    if args.workers < 1:
        fail("--workers must be at least 1")
    if args.row_length < 2:
        fail("--row_length must be at least 2, room for one token and </s>")
    if args.layout == 'packed' and args.tokenizer_file:
        fail("--tokenizer_file is for --layout rows; the packed layout uses tiktoken's gpt2 encoding")
    check_out_dir(args.out_dir)
    return args


def gpt2():
    # loaded once per process: worker processes load their own copy on first use
    global _encoding
    if _encoding is None:
        _encoding = tiktoken.get_encoding('gpt2')
    return _encoding


def t5(tokenizer_path, row_length):
    """The tokenizer of tokenizer_path, truncating to row_length; loaded once per process, like gpt2()."""
    key = (tokenizer_path, row_length)
    if key not in _t5_tokenizers:
        tokenizer = Tokenizer.from_file(tokenizer_path)
        tokenizer.no_padding()
        # truncation leaves room for the tokens the post-processor adds, so </s> stays the last token, as in
        # the authors' Hugging Face tokenizer call with truncation=True
        tokenizer.enable_truncation(row_length)
        _t5_tokenizers[key] = tokenizer
    return _t5_tokenizers[key]


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


def download(url, path, offline_advice='pass --input with local copies of the .json.gz shards'):
    """Fetches url to path through path.part, so a file at path is always a whole file."""
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
        fail(f"could not download {url} ({error}); {offline_advice}")
    os.replace(part, path)


def t5_tokenizer_file(out_dir):
    """The path of t5-base's tokenizer.json in out_dir/downloads, downloaded there if it is not there yet."""
    path = os.path.join(out_dir, 'downloads', 't5-base-tokenizer.json')
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        download(T5_TOKENIZER_URL, path, "pass --tokenizer_file with a local copy of t5-base's tokenizer.json")
    return path


def rows_meta(tokenizer_path, row_length):
    """meta.json's fields for the rows layout, after checking that the tokenizer file is a T5-like tokenizer."""
    advice = "pass --tokenizer_file with t5-base's tokenizer.json (from huggingface.co/google-t5/t5-base)"
    if not os.path.isfile(tokenizer_path):
        fail(f"--tokenizer_file {tokenizer_path} does not exist; {advice}")
    try:
        tokenizer = t5(tokenizer_path, row_length)
    except Exception as error:  # the Rust library raises a bare Exception for any file it cannot parse
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fail(f"cannot load {tokenizer_path} as a tokenizers file ({first_line}); {advice}")
    pad_id, eos_id = tokenizer.token_to_id('<pad>'), tokenizer.token_to_id('</s>')
    if pad_id is None or eos_id is None:
        fail(f"{tokenizer_path} has no <pad> or no </s> token; {advice}")
    if tokenizer.encode('a').ids[-1:] != [eos_id]:
        fail(f"{tokenizer_path} does not end each document with </s>; {advice}")
    sentinels = [token for token in tokenizer.get_vocab(with_added_tokens=True) if T5_SENTINEL.fullmatch(token)]
    # the sentinels are the highest ids, so the ids below them are the vocabulary that text can produce
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True) - len(sentinels)
    if vocab_size > 2 ** 16:
        fail(f"{tokenizer_path} has {vocab_size} ids, more than uint16 token files hold; {advice}")
    with open(tokenizer_path, 'rb') as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    return {'layout': 'rows', 'row_length': row_length, 'pad_id': pad_id, 'eos_id': eos_id, 'tokenizer': 't5-base',
            'vocab_size': vocab_size, 'tokenizer_vocab_size': tokenizer.get_vocab_size(with_added_tokens=True),
            'tokenizer_sha256': sha256}


def read_texts(path):
    """The "text" of every line of a json.gz shard, in order; ShardError says what is wrong with the file."""
    line_number = 0
    try:
        with gzip.open(path, 'rt', encoding='utf-8') as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    yield document_text(line, line_number)
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise ShardError(f"line {line_number + 1} cannot be read as gzipped UTF-8 ({error}); "
                         f"a C4 shard is gzipped JSON lines, each with a \"text\" field") from None


def document_text(line, line_number):
    try:
        text = json.loads(line)['text']
    except (ValueError, KeyError, TypeError):
        text = None
    if not isinstance(text, str):
        raise ShardError(f'line {line_number} is not a JSON object with a "text" string; '
                         f'a C4 shard is gzipped JSON lines, each with a "text" field')
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


def tokenize_packed(texts):
    encoding = gpt2()
    ids = []
    for text in texts:
        ids.extend(encoding.encode_ordinary(text))
        ids.append(encoding.eot_token)
    return np.array(ids, dtype=np.int32), len(texts)


def tokenize_rows(tokenizer_path, row_length, pad_id, texts):
    rows = np.full((len(texts), row_length), pad_id, dtype=np.int32)
    for row, encoding in zip(rows, t5(tokenizer_path, row_length).encode_batch(texts)):
        row[:len(encoding.ids)] = encoding.ids
    return rows.ravel(), len(texts)


def write_tokens(f, path, tokenize, tokenize_map, vocab_size):
    # tokenize_map is map or Pool.imap: both keep the batches in order, so the output is the same either way
    documents = 0
    with tqdm(unit='doc', unit_scale=True, desc=os.path.basename(path), disable=None) as bar:
        for ids, count in tokenize_map(tokenize, batches(read_texts(path), DOCUMENTS_PER_TASK)):
            if ids.size and ids.max() >= vocab_size:
                raise ShardError(f"one of its documents {documents + 1}-{documents + count} tokenizes to id "
                                 f"{ids.max()}, beyond the vocabulary of {vocab_size}: T5's sentinel tokens "
                                 f"(<extra_id_0> to <extra_id_99>) must not occur in the text; drop that document")
            f.write(ids.astype(np.uint16).tobytes())
            documents += count
            bar.update(count)


def shard_tokens(source, tokens_dir, downloads_dir, tokenize, tokenize_map, vocab_size, delete_download):
    """The path of source's token file, downloading and tokenizing it only if it is not there yet."""
    tokens_path = os.path.join(tokens_dir, shard_name(source) + '.bin')
    downloaded = source.startswith('https://')
    path = os.path.join(downloads_dir, os.path.basename(source)) if downloaded else source
    if not os.path.exists(tokens_path):
        if downloaded and not os.path.exists(path):
            os.makedirs(downloads_dir, exist_ok=True)
            download(source, path)
        os.makedirs(tokens_dir, exist_ok=True)
        try:
            write_atomically(tokens_path, lambda f: write_tokens(f, path, tokenize, tokenize_map, vocab_size))
        except ShardError as error:
            os.remove(tokens_path + '.tmp')
            fail(f'cannot use {path}: {error}')
        print(f"{tokens_path}: {os.path.getsize(tokens_path) // 2:,} tokens")
    # the token file is complete (written through a rename), and nothing reads the shard again
    if delete_download and downloaded and os.path.exists(path):
        os.remove(path)
    return tokens_path


def join_shards(paths, out_path, counted_id):
    """Concatenates uint16 token files into out_path (fsynced); returns its token count and how many are counted_id."""
    tokens = counted = 0
    with open(out_path, 'wb') as f:
        for path in paths:
            with open(path, 'rb') as shard:
                while chunk := shard.read(COPY_BYTES):
                    ids = np.frombuffer(chunk, dtype=np.uint16)
                    tokens += len(ids)
                    counted += int(np.count_nonzero(ids == counted_id))
                    f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return tokens, counted


def write_dataset(out_dir, token_paths, meta):
    """train.bin and val.bin from the shards' token files, then meta.json last."""
    tmp = {split: os.path.join(out_dir, f'{split}.bin.tmp') for split in token_paths}
    meta = dict(meta, documents={})
    for split, paths in token_paths.items():
        if meta['layout'] == 'rows':
            tokens, pads = join_shards(paths, tmp[split], meta['pad_id'])
            meta['documents'][split] = tokens // meta['row_length']
            meta.setdefault('non_pad_tokens', {})[split] = tokens - pads
        else:
            meta['documents'][split] = join_shards(paths, tmp[split], gpt2().eot_token)[1]
    for split, count in meta['documents'].items():
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
              f"{meta['documents'][split]:,} documents")
    meta_bytes = (json.dumps(meta, indent=1) + '\n').encode()
    write_atomically(meta_path, lambda f: f.write(meta_bytes))
    print(f"wrote {out_dir} ({meta['layout']} layout, vocab_size {meta['vocab_size']})")


def main():
    args = parse_args(os.path.dirname(os.path.abspath(__file__)))
    sources = local_sources(args.input) if args.input else remote_sources(args.shards, args.val_shards)
    if args.layout == 'rows':
        if args.workers > 1:
            # one thread per worker process: the library's own threads do not survive the fork
            os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
        tokenizer_path = os.path.abspath(args.tokenizer_file or t5_tokenizer_file(args.out_dir))
        meta = rows_meta(tokenizer_path, args.row_length)
        tokenize = functools.partial(tokenize_rows, tokenizer_path, args.row_length, meta['pad_id'])
        # named by the tokenizer's hash, so a changed tokenizer file never reuses rows made by another
        tokens_dir = os.path.join(args.out_dir, f"rows{args.row_length}-{meta['tokenizer_sha256'][:12]}")
    else:
        try:
            gpt2()
        except Exception as error:  # tiktoken downloads the encoding on first use
            fail(f"cannot load tiktoken's gpt2 encoding ({error}); set TIKTOKEN_CACHE_DIR to a folder that has it")
        meta = {'layout': 'packed', 'tokenizer': 'gpt2', 'vocab_size': PADDED_VOCAB_SIZE,
                'tokenizer_vocab_size': gpt2().n_vocab}
        tokenize = tokenize_packed
        tokens_dir = os.path.join(args.out_dir, 'tokens')
    os.makedirs(args.out_dir, exist_ok=True)
    downloads_dir = os.path.join(args.out_dir, 'downloads')
    pool = multiprocessing.Pool(args.workers) if args.workers > 1 else contextlib.nullcontext()
    with pool:
        tokenize_map = pool.imap if args.workers > 1 else map
        token_paths = {split: [shard_tokens(source, tokens_dir, downloads_dir, tokenize, tokenize_map,
                                            meta['vocab_size'], args.delete_downloads)
                               for source in split_sources]
                       for split, split_sources in sources.items()}
    write_dataset(args.out_dir, token_paths, meta)


if __name__ == '__main__':
    main()
