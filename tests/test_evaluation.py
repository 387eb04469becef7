"""The evaluation set: every run is scored on the same tokens, eval_sequences windows evenly spaced over each split,
whatever its seed, process count and micro-batch, so two runs' losses differ only by their weights."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from conftest import finish, launch, read_log
from model import GPT, read_checkpoint

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--device=cpu', '--warmup_iters=1',
        '--learning_rate=3e-3', '--log_interval=1']
SEQUENCES = 20


def hand_scored(model, tokens, block_size, count):
    """The mean next-token loss over `count` windows of block_size + 1 tokens whose starts run evenly from 0 to the
    last possible start, rounded to the nearest token, computed one window at a time."""
    last = len(tokens) - block_size - 1
    losses = []
    with torch.no_grad():
        for i in range(count):
            start = round(i * last / (count - 1))
            window = torch.from_numpy(tokens[start:start + block_size + 1].astype(np.int64))
            logits, _ = model(window[None, :-1])
            losses.append(F.cross_entropy(logits[0], window[1:], reduction='sum'))
    return (torch.stack(losses).sum() / (count * block_size)).item()


def test_runs_of_any_seed_are_scored_on_the_evenly_spaced_windows_of_each_split(tmp_path, char_data):
    for seed in (0, 1):
        out = tmp_path / f'seed{seed}'
        assert train.main(TINY + [f'--data_dir={char_data}', f'--out_dir={out}', '--batch_size=4', '--max_iters=2',
                                  '--eval_interval=2', f'--eval_sequences={SEQUENCES}', f'--seed={seed}']) == 0
        record = [r for r in read_log(out) if 'val_loss' in r][-1]
        model = GPT.from_checkpoint(read_checkpoint(out / 'ckpt.pt')).eval()
        for split in ('train', 'val'):
            tokens = np.fromfile(os.path.join(char_data, f'{split}.bin'), dtype=np.uint16)
            assert record[f'{split}_loss'] == pytest.approx(hand_scored(model, tokens, 32, SEQUENCES), rel=1e-5)


def test_one_and_two_processes_at_any_micro_batch_report_the_same_losses_for_the_same_weights(tmp_path, char_data):
    """Iteration 0's evaluation (every process count builds the same initial weights from the seed): one process
    scoring in micro-batches of 8, two processes in micro-batches of 2 that split the set between them."""
    common = TINY + [f'--data_dir={char_data}', '--global_batch_size=8', '--max_iters=1', '--eval_interval=1',
                     f'--eval_sequences={SEQUENCES}']
    assert train.main(common + [f'--out_dir={tmp_path / "one"}', '--batch_size=8']) == 0
    code, _, err = finish(launch(common + [f'--out_dir={tmp_path / "two"}', '--batch_size=2'], nproc=2))
    assert code == 0, err
    first = {name: [r for r in read_log(tmp_path / name) if 'val_loss' in r][0] for name in ('one', 'two')}
    assert first['one']['iter'] == first['two']['iter'] == 0
    for key in ('train_loss', 'val_loss'):
        assert first['two'][key] == pytest.approx(first['one'][key], rel=1e-6, abs=0)
