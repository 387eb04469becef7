"""
The prepared token data a run reads: data/<dataset>/{train,val}.bin (uint16 token ids) and meta.json, in the packed
layout (documents end to end) or the authors' rows layout; its checks, the batch sizes of a process count, the
batches of each step and evaluation, and the authors' evaluation estimator.
"""

import difflib
import hashlib
import json
import os
import shlex
from dataclasses import replace

import numpy as np
import torch

from configurator import UserError

CHECKED_TOKENS = 10_000_000  # of each split, for ids beyond the vocabulary
AUTHORS_EVAL_ORDER_SEED = 0  # the authors' evaluation rows' shuffled order: one order for every run


def resolve_data_dir(data_dir, dataset):
    """Where a run's data is: data_dir, or data/<dataset> beside this file when data_dir is empty."""
    return data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)


def check_data(data_dir, meta, block_size, vocab_size):
    """Refuses data the model cannot train on: rows of another length than block_size, a split cut short, too
    short for one sequence, or holding token ids beyond the vocabulary."""
    if meta['vocab_size'] > vocab_size:
        raise UserError(f"{data_dir} has {meta['vocab_size']} token ids but the model's vocab_size is {vocab_size}; "
                        f"raise vocab_size or leave it unset")
    rows = meta.get('layout', 'packed') == 'rows'
    if rows and block_size != meta['row_length']:
        raise UserError(f"{data_dir} holds rows of {meta['row_length']} tokens, one sequence each, but block_size is "
                        f"{block_size}; set block_size={meta['row_length']}")
    for split in ('train', 'val'):
        size = os.path.getsize(os.path.join(data_dir, f'{split}.bin'))
        if size % 2:
            raise UserError(f"{split}.bin in {data_dir} is {size:,} bytes, not whole 2-byte tokens (a copy cut "
                            f"short?); prepare the data again")
        tokens = open_tokens(data_dir, split)
        if rows and len(tokens) % meta['row_length']:
            raise UserError(f"{split}.bin in {data_dir} is not whole rows of {meta['row_length']} tokens; "
                            f"prepare the data again")
        if len(tokens) <= block_size:
            raise UserError(f"{split}.bin in {data_dir} has fewer tokens than block_size {block_size}; "
                            f"lower block_size or prepare more data")
        largest = int(tokens[:CHECKED_TOKENS].max())  # a prefix: enough to catch data from another tokenizer
        if largest >= vocab_size:
            raise UserError(f"{split}.bin in {data_dir} holds token id {largest}, beyond the model's vocab_size "
                            f"{vocab_size}; prepare the data again or raise vocab_size")


def check_same_data_on_every_rank(fingerprint, data_dir, dist):
    """Refuses, in every process, data that differs between the processes: each node reads its own copy, and a
    different one would draw an inconsistent batch."""
    if not dist.ddp:
        return
    found = [None] * dist.world_size
    torch.distributed.all_gather_object(found, fingerprint)
    others = [rank for rank, theirs in enumerate(found) if theirs != found[0]]
    if others:
        raise UserError(f"rank(s) {', '.join(map(str, others))} found other data in {data_dir} than rank 0 (meta.json, "
                        f"or the size or contents of train.bin or val.bin); give every node the same prepared data")


def read_meta(data_dir, dataset=None):
    """meta.json of a prepared data folder; UserError naming the file and the prepare command when the folder is not
    prepared (checked when the dataset is named: train.bin and val.bin too), meta.json is not JSON, or it lacks an
    int vocab_size (or, for a character tokenizer, its characters)."""
    path = os.path.join(data_dir, 'meta.json')
    prepare = prepare_command(data_dir, dataset)
    if dataset:
        paths = [path] + [os.path.join(data_dir, f'{split}.bin') for split in ('train', 'val')]
        missing = [p for p in paths if not os.path.isfile(p) or os.path.getsize(p) == 0]
        if missing:
            raise not_prepared(data_dir, dataset, f"{missing[0]} is missing or empty")
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); run {prepare} again") from None
    if not isinstance(meta, dict):
        meta = {}
    char_table = meta.get('tokenizer') != 'char' or isinstance(meta.get('chars'), str)
    missing = [key for key, present in (('vocab_size', isinstance(meta.get('vocab_size'), int)), ('chars', char_table))
               if not present]
    if missing:
        raise UserError(f"{path} has no {' or '.join(missing)}; run {prepare} again")
    return meta


DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
OUR_RECIPE_DATA = 'c4_gpt2'  # config/our_recipe.py's data_dir: C4 packed in GPT-2 tokens, read after a size config


def not_prepared(data_dir, dataset, what):
    """The UserError for data_dir without dataset's files (what: the one missing): the command that prepares it; for a
    dataset without a data/<dataset>/prepare.py, the datasets that have one."""
    known = sorted(name for name in os.listdir(DATA) if os.path.isfile(os.path.join(DATA, name, 'prepare.py')))
    if dataset not in known:
        close = [f": did you mean --dataset={name}?" for name in difflib.get_close_matches(dataset, known, n=1)]
        return UserError(f"unknown dataset {dataset!r} (no data/{dataset}/prepare.py, and {what}); the datasets with "
                         f"a prepare script are {', '.join(known)}{''.join(close)}")
    if os.path.basename(os.path.normpath(data_dir)) == OUR_RECIPE_DATA and dataset != 'c4':
        return UserError(f"{data_dir}, config/our_recipe.py's C4, is not prepared ({what}), and our_recipe.py follows "
                         f"a size config, which sets the dataset: run {prepare_command(data_dir, 'c4')}, then python "
                         f"train.py config/llama_350m_lns.py config/our_recipe.py")
    return UserError(f"dataset {dataset!r} is not prepared ({what}); run: {prepare_command(data_dir, dataset)}")


def prepare_command(data_dir, dataset):
    """The command that writes dataset's files into data_dir as the configs read them: data/<dataset>/prepare.py,
    with --out_dir where data_dir is not data/<dataset>; for C4 the layout of the configs that read that folder
    (our_recipe.py's packed GPT-2 tokens in data/c4_gpt2, the paper configs' t5 rows anywhere else)."""
    if not dataset or not os.path.isfile(os.path.join(DATA, dataset, 'prepare.py')):
        return "the data's prepare.py"
    rows = dataset == 'c4' and os.path.basename(os.path.normpath(data_dir)) != OUR_RECIPE_DATA
    command = f"python data/{dataset}/prepare.py"
    if dataset == 'c4':
        command += " --layout rows --val_shards 2" if rows else " --layout packed --shards 8"
    if os.path.abspath(data_dir) != os.path.join(DATA, dataset):
        command += f" --out_dir {shlex.quote(data_dir)}"
    if rows:
        command += (" --shards N, N being the train shards of one pass that the config's header names (15 for 71M "
                    "to 144 for 1B)")
    return command


def data_fingerprint(data_dir, pieces=64, piece_bytes=1 << 16):
    """A digest of a prepared dataset that is quick to take on tens of GB: meta.json, each split's size, and
    `pieces` evenly spread pieces of each split."""
    digest = hashlib.sha256()
    with open(os.path.join(data_dir, 'meta.json'), 'rb') as f:
        digest.update(f.read())
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f'{split}.bin')
        size = os.path.getsize(path)
        digest.update(str(size).encode())
        with open(path, 'rb') as f:
            for piece in range(pieces):
                f.seek(piece * max(0, size - piece_bytes) // (pieces - 1))
                digest.update(f.read(piece_bytes))
    return digest.hexdigest()


def open_tokens(data_dir, split):
    # a fresh memmap on every call: a long-lived one keeps pages resident and grows memory (nanoGPT's lesson)
    return np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')


class TokenData:
    """A prepared dataset in one of the two layouts its meta.json names (data/c4/prepare.py writes both):
    - 'packed': documents end to end; a sequence is a window at a random offset, drawn with replacement;
    - 'rows': the authors' layout, one document per row of row_length tokens, right-padded; a sequence is a whole
      row, with no loss where the target is a pad, and the rows are visited in a shuffled order without
      replacement, a new order for each pass (like the authors' one-pass stream)."""

    def __init__(self, data_dir, meta, seed):
        self.dir, self.seed = data_dir, seed
        self.layout = meta.get('layout', 'packed')
        self.row_length, self.pad_id = meta.get('row_length'), meta.get('pad_id')
        self._order = (None, None)  # (pass, its row order): the pass in use

    def tokens(self, split):
        tokens = open_tokens(self.dir, split)
        return tokens.reshape(-1, self.row_length) if self.layout == 'rows' else tokens

    def train_sequences(self, iter_num, count, block_size, train_generator):
        """Where the `count` sequences of iteration iter_num's global batch start: token offsets drawn from the
        train_generator (packed), or row numbers that follow from iter_num alone (rows), so resuming needs no state."""
        if self.layout == 'packed':
            return torch.randint(len(self.tokens('train')) - block_size, (count,), generator=train_generator)
        n_rows = len(self.tokens('train'))
        positions = iter_num * count + np.arange(count)
        rows = np.empty(count, dtype=np.int64)
        for data_pass in np.unique(positions // n_rows):
            here = positions // n_rows == data_pass
            rows[here] = self.row_order(data_pass, n_rows)[positions[here] % n_rows]
        return torch.from_numpy(rows)

    def row_order(self, data_pass, n_rows):
        if self._order[0] != data_pass:  # int32: half the memory of numpy's default at 51M rows, the same order
            rows = np.arange(n_rows, dtype=np.int32)
            self._order = (data_pass, np.random.default_rng([self.seed, int(data_pass)]).permutation(rows))
        return self._order[1]

    def eval_batches(self, split, cfg):
        """The evaluation batches of split, as (sequences, GPU) pairs, the same for every seed, process count and
        micro-batch (two runs differ in their losses only by their weights): eval_sequences windows (packed) or rows,
        evenly spaced from the split's start to its end, as one batch (GPU 0); for the rows layout's validation
        split with eval_tokens set, the authors' evaluation set as their run read it: the rows in a fixed shuffled
        order dealt out in turn to authors_eval_gpus GPUs, each reading batches of authors_eval_batch_size rows
        until its non-pad tokens times the GPU count exceed eval_tokens."""
        tokens = self.tokens(split)
        if self.layout == 'packed' or split != 'val' or not cfg.eval_tokens:
            last = len(tokens) - cfg.block_size - 1 if self.layout == 'packed' else len(tokens) - 1
            return [(evenly_spaced(cfg.eval_sequences, last), 0)]
        order = np.random.default_rng(AUTHORS_EVAL_ORDER_SEED).permutation(len(tokens))
        gpus, size = cfg.authors_eval_gpus, cfg.authors_eval_batch_size
        batches = []
        for gpu in range(gpus):
            share, counted = order[gpu::gpus], 0
            for start in range(0, len(share) - size + 1, size):
                if counted * gpus > cfg.eval_tokens:
                    break
                batch = share[start:start + size]
                counted += int((tokens[np.sort(batch)] != self.pad_id).sum())
                batches.append((torch.from_numpy(batch), gpu))
            if counted * gpus <= cfg.eval_tokens:
                raise UserError(f"val.bin in {self.dir} holds too few rows for eval_tokens={cfg.eval_tokens:,} as "
                                f"{gpus} GPU(s) read it in batches of {size} ({counted * gpus:,} non-pad tokens on "
                                f"GPU {gpu}); lower eval_tokens or prepare more validation data")
        return batches

    def read(self, split, starts, block_size, device):
        """Inputs and targets (batch, sequence) int64 on the device (pinned and copied without waiting on a GPU)."""
        tokens = self.tokens(split)
        if self.layout == 'packed':
            windows = np.stack([tokens[i:i + block_size + 1] for i in starts.numpy()])
            windows = torch.from_numpy(windows.astype(np.int64))
            x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        else:
            x = torch.from_numpy(tokens[starts.numpy()].astype(np.int64))
            y = torch.full_like(x, -1)
            y[:, :-1] = x[:, 1:]
            y[y == self.pad_id] = -1  # pads carry no loss; the row's last position has no next token
        return to_device(x, device), to_device(y, device)


def authors_estimate(loss_sums, tokens, gpus):
    """The loss the authors' evaluation reports, from each of eval_batches' batches: its loss sum, its target count
    and the GPU that read it. Per GPU, the sum of its batches' mean losses divided by (its batches + 1), their
    counter starting at 1; then the plain mean over the GPUs. It reads low by about 1/(batches per GPU + 1)."""
    means = loss_sums / tokens.clamp(min=1)
    gpus = torch.tensor(gpus)
    return torch.stack([means[gpus == gpu].sum() / ((gpus == gpu).sum() + 1) for gpu in gpus.unique()]).mean().item()


def evenly_spaced(count, last):
    """count positions from 0 to last, evenly spaced (repeated where count exceeds last + 1)."""
    return torch.from_numpy(np.linspace(0, last, count).round().astype(np.int64))


def to_device(x, device):
    if device.type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def resolve_batch(cfg, world_size):
    """cfg for world_size processes: batch_size the micro-batch, gradient_accumulation_steps the micro-steps of all
    processes together (their product the global batch), authors_eval_batch_size set. With global_batch_size, each
    process's share of it runs in the largest micro-batch that divides the share and fits the batch_size ceiling."""
    cfg = replace(cfg, authors_eval_batch_size=cfg.authors_eval_batch_size or cfg.batch_size)
    if cfg.global_batch_size is None:
        if cfg.gradient_accumulation_steps % world_size:
            raise UserError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple of "
                            f"the number of processes ({world_size}) to keep the global batch; change one of them")
        return cfg
    total = cfg.global_batch_size
    if total % world_size:
        counts = [n for n in range(1, total + 1) if total % n == 0]
        raise UserError(f"global_batch_size {total} cannot be shared evenly by {world_size} processes; run "
                        f"{', '.join(map(str, counts))} processes, or change global_batch_size")
    share = total // world_size
    micro_batch = max(b for b in range(1, min(cfg.batch_size, share) + 1) if share % b == 0)
    return replace(cfg, batch_size=micro_batch, gradient_accumulation_steps=share // micro_batch * world_size)


def train_batches(iter_num, train_generator, data, device, cfg, dist):
    """This process's micro-batches of iteration iter_num, read as they are needed: every process draws the
    sequences of the whole global batch and takes its own share of the micro-steps."""
    micro_steps = cfg.gradient_accumulation_steps // dist.world_size
    starts = data.train_sequences(iter_num, cfg.gradient_accumulation_steps * cfg.batch_size, cfg.block_size,
                                  train_generator)
    mine = starts.view(-1, cfg.batch_size)[dist.rank * micro_steps:(dist.rank + 1) * micro_steps]
    return (data.read('train', batch, cfg.block_size, device) for batch in mine)
