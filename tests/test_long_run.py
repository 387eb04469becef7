"""What a run of days depends on: where a non-finite loss stops it, resuming DDP checkpoints with the same and
another process count, gradient clipping and the logged gradient norm against direct computations, the float16
grad scaler across a resume, and saving only on improvement."""

import json
import math
import os
import re

import pytest
import torch

import train
from conftest import finish, launch, read_log, training_losses
from model import GPT, read_checkpoint

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_sequences=16',
        '--device=cpu', '--warmup_iters=2', '--learning_rate=3e-3']


def checkpoint_files(out_dir):
    return sorted(name for name in os.listdir(out_dir) if name.startswith('ckpt'))


def poison_weights_after_step(monkeypatch, step):
    """From the optimizer's `step`-th step in this process on (counted from 1), every weight is NaN, so the first
    non-finite loss is that of the iteration after it. Returns a list that grows by one per optimizer step."""
    steps = []
    configure_optimizer = GPT.configure_optimizer

    def configure_poisoned_optimizer(model, *args, **kwargs):
        optimizer = configure_optimizer(model, *args, **kwargs)

        def after_step(optimizer, args, kwargs):
            steps.append(len(steps) + 1)
            if len(steps) == step:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(math.nan)

        optimizer.register_step_post_hook(after_step)
        return optimizer

    monkeypatch.setattr(GPT, 'configure_optimizer', configure_poisoned_optimizer)
    return steps


# ----------------------------------------------------------------------------- non-finite losses

# the loss of the step that ends at iteration 6 (the model after 5 steps) is the first non-finite one, numbered as
# the log numbers training losses; the run must stop at the first log line (iteration 8 with log_interval 4) or
# evaluation (7) after it, whichever comes first, never later
@pytest.mark.parametrize('log_interval, eval_interval, stop', [(4, 100, 8), (10, 7, 7)])
def test_non_finite_training_loss_stops_at_the_next_log_or_evaluation_naming_its_iteration(
        tmp_path, char_data, capsys, monkeypatch, log_interval, eval_interval, stop):
    steps = poison_weights_after_step(monkeypatch, 5)
    code = train.main(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--max_iters=20',
                              f'--log_interval={log_interval}', f'--eval_interval={eval_interval}'])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith('error: training loss is') and err.count('\n') == 1, err
    assert re.search(r'at iteration 6\b', err), err
    assert 5 <= len(steps) <= stop  # with no training-loss guard the run goes on to iteration 20
    records = read_log(tmp_path)
    assert [r for r in records if 'diverged' in r] == [{'iter': 6, 'diverged': 'train'}]
    assert records[-1] == {'iter': 6, 'diverged': 'train'}
    assert all(math.isfinite(r['loss']) for r in records if 'loss' in r)
    assert checkpoint_files(tmp_path) == []


def test_non_finite_validation_loss_stops_and_leaves_the_last_good_checkpoint_byte_identical(
        tmp_path, char_data, capsys, monkeypatch):
    common = TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--eval_interval=3', '--log_interval=1']
    assert train.main(common + ['--max_iters=3']) == 0
    good = (tmp_path / 'ckpt.pt').read_bytes()
    poison_weights_after_step(monkeypatch, 3)  # resumed at 3: the model after iteration 6 is NaN
    capsys.readouterr()
    code = train.main(common + ['--max_iters=12', '--init_from=resume'])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith('error: validation loss is') and err.count('\n') == 1, err
    assert re.search(r'at iteration 6\b', err), err
    records = read_log(tmp_path)
    assert records[-1] == {'iter': 6, 'diverged': 'val'}
    assert [r['iter'] for r in records if 'loss' in r] == [1, 2, 3, 4, 5, 6]  # the training losses, all finite
    assert (tmp_path / 'ckpt.pt').read_bytes() == good and checkpoint_files(tmp_path) == ['ckpt.pt']


# ----------------------------------------------------------------------------- DDP checkpoints

def test_two_process_checkpoint_resumed_with_two_processes_continues_exactly(tmp_path, char_data):
    # dropout on: each process must get its own random state back, not rank 0's
    common = TINY + [f'--data_dir={char_data}', '--dropout=0.1', '--eval_interval=4', '--log_interval=1',
                     '--gradient_accumulation_steps=2', '--max_iters=8']
    whole, halves = tmp_path / 'whole', tmp_path / 'halves'
    code, _, err = finish(launch(common + [f'--out_dir={whole}', '--keep_last_n=1'], nproc=2))
    assert code == 0, err
    halves.mkdir()  # as if the run had stopped after its checkpoint at iteration 4
    (halves / 'ckpt.pt').write_bytes((whole / 'ckpt-0000004.pt').read_bytes())
    (halves / 'log.jsonl').write_text((whole / 'log.jsonl').read_text())
    code, _, err = finish(launch(common + [f'--out_dir={halves}', '--init_from=resume'], nproc=2))
    assert code == 0, err
    assert training_losses(halves) == training_losses(whole)
    expected, resumed = read_checkpoint(whole / 'ckpt.pt'), read_checkpoint(halves / 'ckpt.pt')
    assert resumed['iter_num'] == 8 and len(resumed['rng']) == 2
    assert all(torch.equal(expected['model'][k], resumed['model'][k]) for k in expected['model'])


def test_two_process_checkpoint_resumed_by_one_process_keeps_the_data_order(tmp_path, char_data):
    common = TINY + [f'--data_dir={char_data}', '--eval_interval=4', '--log_interval=1',
                     '--gradient_accumulation_steps=2', '--lr_decay_iters=8']
    code, _, err = finish(launch(common + [f'--out_dir={tmp_path / "two"}', '--max_iters=4'], nproc=2))
    assert code == 0, err
    assert train.main(common + [f'--out_dir={tmp_path / "two"}', '--max_iters=8', '--init_from=resume']) == 0
    assert train.main(common + [f'--out_dir={tmp_path / "one"}', '--max_iters=8']) == 0
    # one process with two micro-steps computes what two processes with one each do (see test_robustness)
    resumed, whole = training_losses(tmp_path / 'two'), training_losses(tmp_path / 'one')
    assert list(resumed) == list(range(1, 9)) and resumed == pytest.approx(whole, rel=1e-4)
    assert len(read_checkpoint(tmp_path / 'two' / 'ckpt.pt')['rng']) == 1


# ----------------------------------------------------------------------------- gradients

@pytest.fixture
def constant_data(tmp_path):
    """Every token is 3: every window of every batch is the same, so a step's gradient does not depend on which
    windows the sampler draws and can be computed here directly."""
    folder = tmp_path / 'constant'
    folder.mkdir()
    (folder / 'meta.json').write_text(json.dumps({'vocab_size': 8}))
    for split in ('train', 'val'):
        (folder / f'{split}.bin').write_bytes(torch.full((400,), 3, dtype=torch.int16).numpy().tobytes())
    return folder


def gradients_at(checkpoint, block_size, dtype=torch.float32, batch=1):
    """The model of a checkpoint, in dtype, and its gradients on `batch` windows of constant tokens."""
    model = GPT.from_checkpoint(checkpoint).to(dtype)
    x = torch.full((batch, block_size), 3)
    model(x, x)[1].backward()
    return model


@pytest.mark.parametrize('dtype', ['float32', 'pure_bfloat16'])
def test_logged_gradient_norm_is_the_norm_of_the_full_gradient_before_clipping(tmp_path, constant_data, dtype):
    """Under pure_bfloat16 the gradients are bf16 tensors; their norm is still accumulated in float32 (summed in
    bf16 it reads about 0.3% off at the 1B shape), so it matches the float64 norm of the same bf16 gradients."""
    common = TINY + [f'--data_dir={constant_data}', f'--out_dir={tmp_path / "o"}', '--decay_lr=False',
                     '--eval_interval=1', '--log_interval=1', '--grad_clip=0.01', f'--dtype={dtype}']
    assert train.main(common + ['--max_iters=1']) == 0
    before = read_checkpoint(tmp_path / 'o' / 'ckpt.pt')
    assert train.main(common + ['--max_iters=2', '--init_from=resume']) == 0
    model = gradients_at(before, 32, dtype=torch.bfloat16 if dtype == 'pure_bfloat16' else torch.float32,
                         batch=4)  # the step's own batch: bf16 sums round differently over another
    norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())).item()
    logged = [r['grad_norm'] for r in read_log(tmp_path / 'o') if r['iter'] == 2 and 'grad_norm' in r]
    assert norm > 1.0 and logged == [pytest.approx(norm, rel=1e-5)]


def test_gradient_clipping_scales_the_gradient_to_grad_clip_before_the_step(tmp_path, constant_data):
    grad_clip, learning_rate = 0.01, 3e-3
    common = TINY + [f'--data_dir={constant_data}', f'--out_dir={tmp_path / "o"}', '--decay_lr=False',
                     f'--learning_rate={learning_rate}', '--eval_interval=1', f'--grad_clip={grad_clip}']
    assert train.main(common + ['--max_iters=1']) == 0
    before = read_checkpoint(tmp_path / 'o' / 'ckpt.pt')
    assert train.main(common + ['--max_iters=2', '--init_from=resume']) == 0
    after = read_checkpoint(tmp_path / 'o' / 'ckpt.pt')
    assert after['iter_num'] == 2

    def weights_after_a_step(clip):
        model = gradients_at(before, 32)
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
        for p in model.parameters():
            p.grad.mul_(min(1.0, clip / norm.item()))
        optimizer = model.configure_optimizer(0.1, learning_rate, (0.9, 0.95), 'cpu')
        optimizer.load_state_dict(before['optimizer'])
        optimizer.step()
        return model.state_dict()

    clipped, unclipped = weights_after_a_step(grad_clip), weights_after_a_step(math.inf)
    for key, value in after['model'].items():
        torch.testing.assert_close(value, clipped[key], rtol=1e-5, atol=1e-6, msg=key)
    # a run that did not clip would be far from the clipped step
    assert max((after['model'][k] - unclipped[k]).abs().max().item() for k in unclipped) > 1e-4


# ----------------------------------------------------------------------------- float16 and saving

def test_float16_grad_scaler_state_is_saved_and_restored(tmp_path, char_data):
    common = TINY + [f'--data_dir={char_data}', '--dtype=float16', '--eval_interval=2', '--log_interval=1',
                     '--eval_sequences=4', '--lr_decay_iters=4']
    assert train.main(common + [f'--out_dir={tmp_path / "whole"}', '--max_iters=4']) == 0
    halves = tmp_path / 'halves'
    assert train.main(common + [f'--out_dir={halves}', '--max_iters=2']) == 0
    halfway = read_checkpoint(halves / 'ckpt.pt')['scaler']
    assert train.main(common + [f'--out_dir={halves}', '--max_iters=4', '--init_from=resume']) == 0
    whole, resumed = (read_checkpoint(tmp_path / name / 'ckpt.pt')['scaler'] for name in ('whole', 'halves'))
    # GradScaler counts the steps since its scale last changed (none overflow here), starting from 2**16
    assert halfway['scale'] == 2.0 ** 16 and halfway['_growth_tracker'] == 2
    assert resumed == whole and whole['_growth_tracker'] == 4
    assert training_losses(halves) == training_losses(tmp_path / 'whole')


def test_without_always_save_checkpoint_only_improvements_are_saved(tmp_path, char_data):
    # two steps, then a learning rate of 0: the validation loss improves at iteration 2, and 4 and 6 only equal it
    common = TINY + [f'--data_dir={char_data}', '--learning_rate=1e-2', '--warmup_iters=0', '--lr_decay_iters=2',
                     '--min_lr=0', '--eval_interval=2', '--max_iters=6', '--keep_last_n=5']
    assert train.main(common + [f'--out_dir={tmp_path / "improved"}', '--always_save_checkpoint=False']) == 0
    assert checkpoint_files(tmp_path / 'improved') == ['ckpt.pt']  # nothing earlier: the one save replaced none
    assert read_checkpoint(tmp_path / 'improved' / 'ckpt.pt')['iter_num'] == 2
    evals = [r['val_loss'] for r in read_log(tmp_path / 'improved') if 'val_loss' in r]
    assert evals[1] < evals[0] and evals[1] == evals[2] == evals[3]
    assert train.main(common + [f'--out_dir={tmp_path / "always"}']) == 0
    assert checkpoint_files(tmp_path / 'always') == ['ckpt-0000002.pt', 'ckpt-0000004.pt', 'ckpt.pt']
