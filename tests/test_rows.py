"""The authors' data layout in the trainer: one document per row, right-padded; pads carry no loss, every row is
visited once per pass, resuming continues exactly, and both evaluation estimators equal hand computations."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dataloader
import train
from conftest import read_log
from model import GPT, read_checkpoint

ROW, PAD, EOS, VOCAB = 16, 0, 1, 24
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', f'--block_size={ROW}', '--batch_size=4', '--eval_sequences=8',
        '--device=cpu', '--warmup_iters=2', '--learning_rate=3e-3', '--arch=llama']


def write_rows(folder, n_train=24, n_val=40, seed=0, row_length=ROW, vocab=VOCAB, longest=20):
    """Documents of 1 to `longest` tokens (ids 2..vocab-1), each cut to row_length tokens with EOS kept last,
    right-padded."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (('train', n_train), ('val', n_val)):
        rows = np.full((count, row_length), PAD, dtype=np.uint16)
        for row in rows:
            document = list(rng.integers(2, vocab, rng.integers(1, longest + 1)))[:row_length - 1] + [EOS]
            row[:len(document)] = document
        rows.tofile(folder / f'{split}.bin')
    (folder / 'meta.json').write_text(json.dumps({'layout': 'rows', 'row_length': row_length, 'pad_id': PAD,
                                                  'eos_id': EOS, 'vocab_size': vocab, 'tokenizer': 'test'}))
    return folder


def rows_of(folder, split):
    return np.fromfile(folder / f'{split}.bin', dtype=np.uint16).reshape(-1, ROW).astype(np.int64)


def test_a_row_is_one_sequence_and_its_pads_carry_no_loss(tmp_path):
    folder = write_rows(tmp_path)
    data = dataloader.TokenData(str(folder), json.loads((folder / 'meta.json').read_text()), seed=0)
    rows = rows_of(folder, 'train')
    x, y = data.read('train', torch.tensor([3, 0, 5]), ROW, torch.device('cpu'))
    assert torch.equal(x, torch.from_numpy(rows[[3, 0, 5]]))
    for row, targets in zip(rows[[3, 0, 5]], y.tolist()):
        length = int((row != PAD).sum())  # the document with its EOS
        assert targets == list(row[1:length]) + [-1] * (ROW - length + 1)
    torch.manual_seed(0)
    model = GPT(train.model_config(train.parse_config(TINY), VOCAB))
    logits, loss = model(x, y)
    # by hand: the mean of -log p(next token) over the positions whose next token is a real one
    terms = [-F.log_softmax(logits[b, t], -1)[y[b, t]] for b in range(3) for t in range(ROW) if y[b, t] >= 0]
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_rows_are_visited_once_per_pass_in_a_new_order_each_pass(tmp_path):
    folder = write_rows(tmp_path, n_train=24)
    data = dataloader.TokenData(str(folder), json.loads((folder / 'meta.json').read_text()), seed=7)
    batches = [data.train_sequences(i, 8, ROW, train_generator=None).tolist() for i in range(6)]  # two passes of 3 steps
    first, second = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(first) == sorted(second) == list(range(24)) and first != second
    # a global batch that straddles two passes: the end of one order, then the start of the next
    assert data.train_sequences(2, 10, ROW, None).tolist() == first[20:] + second[:6]
    again = dataloader.TokenData(str(folder), json.loads((folder / 'meta.json').read_text()), seed=7)
    assert again.train_sequences(4, 8, ROW, None).tolist() == batches[4]  # from the iteration alone


def test_the_row_order_is_int32_and_numpy_s_permutation_so_older_runs_resume_on_the_same_rows(tmp_path):
    """int32 halves the order's memory (51M rows at 1B: 196 MiB instead of 391 per process); the order itself is
    numpy's permutation of the row count, as before."""
    folder = write_rows(tmp_path, n_train=24)
    data = dataloader.TokenData(str(folder), json.loads((folder / 'meta.json').read_text()), seed=7)
    order = data.row_order(1, 24)
    assert order.dtype == np.int32 and order.tolist() == np.random.default_rng([7, 1]).permutation(24).tolist()


def test_training_on_rows_resumes_exactly(tmp_path):
    folder = write_rows(tmp_path / 'data')
    common = TINY + [f'--data_dir={folder}', '--eval_interval=5', '--log_interval=1', '--dropout=0.1',
                     '--lr_decay_iters=10', '--gradient_accumulation_steps=2']
    whole, halves = tmp_path / 'whole', tmp_path / 'halves'
    assert train.main(common + [f'--out_dir={whole}', '--max_iters=10']) == 0
    assert train.main(common + [f'--out_dir={halves}', '--max_iters=5']) == 0
    assert train.main(common + [f'--out_dir={halves}', '--max_iters=10', '--init_from=resume']) == 0
    losses = lambda out: {r['iter']: r['loss'] for r in read_log(out) if 'loss' in r}  # noqa: E731
    assert len(losses(whole)) == 10 and losses(halves) == losses(whole)


def test_evaluation_reports_the_token_weighted_loss_and_the_authors_estimator(tmp_path):
    folder = write_rows(tmp_path / 'data', n_val=40)
    out = tmp_path / 'run'
    eval_tokens = 60
    assert train.main(TINY + [f'--data_dir={folder}', f'--out_dir={out}', '--max_iters=3', '--eval_interval=3',
                              f'--eval_tokens={eval_tokens}', '--seed=5']) == 0
    record = [r for r in read_log(out) if 'val_loss' in r][-1]
    model = GPT.from_checkpoint(read_checkpoint(out / 'ckpt.pt')).eval()
    # by hand: validation rows in the one fixed order (numpy seed 0, whatever the run's seed), batch after batch
    # until more than eval_tokens non-pad tokens have gone in
    rows = rows_of(folder, 'val')
    order = np.random.default_rng(0).permutation(len(rows))
    batches, seen = [], 0
    while seen <= eval_tokens:
        batch = rows[order[4 * len(batches):4 * len(batches) + 4]]
        seen += int((batch != PAD).sum())
        batches.append(batch)
    token_losses, batch_means = [], []
    with torch.no_grad():
        for batch in batches:
            x = torch.from_numpy(batch)
            logits, _ = model(x)
            losses = [-F.log_softmax(logits[b, t], -1)[x[b, t + 1]] for b in range(len(batch))
                      for t in range(ROW - 1) if x[b, t + 1] != PAD]
            token_losses += losses
            batch_means.append(torch.stack(losses).mean())
    assert 1 < len(batches) < 10
    assert record['val_loss'] == pytest.approx(torch.stack(token_losses).mean().item(), rel=1e-5)
    assert record['val_loss_authors'] == pytest.approx(sum(batch_means).item() / (len(batches) + 1), rel=1e-5)
    assert record['val_ppl'] == pytest.approx(math.exp(record['val_loss']))
    assert record['val_loss_authors'] < record['val_loss']  # the estimator reads low


def test_the_authors_estimator_is_computed_as_their_four_gpus_computed_it(tmp_path):
    """Their evaluation on 4 GPUs: the validation rows dealt out in turn, each GPU reading batches of its own
    until its non-pad tokens x 4 pass eval_tokens, its loss the sum of its batch means over (its batches + 1), and
    the reported loss the plain mean over the 4 GPUs; our processes (here 1) only share the work."""
    folder = write_rows(tmp_path / 'data', n_val=80)
    out = tmp_path / 'run'
    eval_tokens, gpus, batch_size = 150, 4, 3
    assert train.main(TINY + [f'--data_dir={folder}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2',
                              f'--eval_tokens={eval_tokens}', f'--authors_eval_gpus={gpus}',
                              f'--authors_eval_batch_size={batch_size}', '--seed=3']) == 0
    record = [r for r in read_log(out) if 'val_loss' in r][-1]
    model = GPT.from_checkpoint(read_checkpoint(out / 'ckpt.pt')).eval()
    rows = rows_of(folder, 'val')
    order = np.random.default_rng(0).permutation(len(rows))
    gpu_losses, all_token_losses = [], []
    for gpu in range(gpus):
        share, seen, batch_means = order[gpu::gpus], 0, []
        while seen * gpus <= eval_tokens:
            batch = rows[share[batch_size * len(batch_means):batch_size * (len(batch_means) + 1)]]
            seen += int((batch != PAD).sum())
            with torch.no_grad():
                logits, _ = model(torch.from_numpy(batch))
            losses = [-F.log_softmax(logits[b, t], -1)[batch[b, t + 1]] for b in range(batch_size)
                      for t in range(ROW - 1) if batch[b, t + 1] != PAD]
            all_token_losses += losses
            batch_means.append(torch.stack(losses).mean().item())
        assert 1 <= len(batch_means) < 6
        gpu_losses.append(sum(batch_means) / (len(batch_means) + 1))
    assert record['val_loss_authors'] == pytest.approx(sum(gpu_losses) / gpus, rel=1e-5)
    assert record['val_loss'] == pytest.approx(torch.stack(all_token_losses).mean().item(), rel=1e-5)


def test_rows_layout_demands_one_row_per_sequence(tmp_path, capsys):
    folder = write_rows(tmp_path / 'data')
    assert train.main(TINY[:3] + ['--block_size=8', *TINY[4:], f'--data_dir={folder}',
                                  f'--out_dir={tmp_path / "o"}']) == 1
    assert 'set block_size=16' in capsys.readouterr().err
    assert train.main(TINY + [f'--data_dir={folder}', f'--out_dir={tmp_path / "o"}', '--eval_tokens=100000']) == 1
    assert 'lower eval_tokens or prepare more validation data' in capsys.readouterr().err
