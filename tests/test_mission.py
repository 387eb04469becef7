"""The command this project exists for, run whole as README gives it:
    torchrun --standalone --nproc_per_node=8 train.py config/llama_350m_lns.py
on the CPU, with the config file as it ships and only shrinking overrides, on a rows dataset of t5-base's shape
(32,000 ids, 256-token right-padded rows): it trains, evaluates with both estimators, saves and resumes, and its
losses are those of one process on the same global batch."""

import math
import os

import pytest

import train
from conftest import ROOT, finish, launch, read_log, training_losses
from model import read_checkpoint
from test_rows import write_rows

# what 2 CPU cores cannot afford of the shipped config, shrunk: the model (2 blocks of width 16), the steps (the
# schedule pinned to 2, so that a run stopped after 1 and resumed follows it), the evaluation (100 tokens; one
# batch for the training loss; the authors' 4 GPUs read 1 row a batch) and the global batch: 8 sequences a step
# instead of 512, since one step of 512 x 256 tokens through a 32,000-way head in bf16 takes minutes here. As in
# the 8-GPU run, each process's share fits the config's per-GPU ceiling, so each runs one micro-step.
SHRINK = ['--device=cpu', '--n_layer=2', '--n_head=2', '--n_embd=16', '--ffn_hidden=32', '--global_batch_size=8',
          '--warmup_iters=1', '--lr_decay_iters=2', '--eval_sequences=4', '--eval_tokens=100',
          '--authors_eval_batch_size=1', '--log_interval=1']


def evaluations(out_dir):
    return {r['iter']: r for r in read_log(out_dir) if 'val_loss' in r}


@pytest.mark.parametrize('config, compiled', [
    ('llama_350m_lns.py', False),
    pytest.param('llama_350m_lns.py', True, marks=pytest.mark.slow),  # 8 processes compiling: minutes on 2 cores
    pytest.param('llama_250m_lns.py', False, marks=pytest.mark.slow),
])
def test_the_headline_command_trains_evaluates_saves_and_resumes_on_8_processes(tmp_path, config, compiled):
    data = write_rows(tmp_path / 'data', n_train=64, n_val=64, row_length=256, vocab=32000, longest=300)
    command = [os.path.join(ROOT, 'config', config), *SHRINK, f'--data_dir={data}', f'--compile={compiled}']
    eight = tmp_path / 'eight'
    code, out, err = finish(launch(command + [f'--out_dir={eight}', '--max_iters=1'], nproc=8), timeout=600)
    assert code == 0, err
    assert '8 process(es), DDP over gloo' in out
    assert '8 sequences per step = 8 process(es) x 1 micro-step(s) x 1 sequences' in out
    assert "the authors' estimator as 4 GPU(s) x 1 rows read it" in out
    code, out, err = finish(launch(command + [f'--out_dir={eight}', '--max_iters=2', '--init_from=resume'], nproc=8),
                            timeout=600)
    assert code == 0, err
    assert 'resuming from' in out and read_checkpoint(eight / 'ckpt.pt')['iter_num'] == 2

    one = tmp_path / 'one'
    assert train.main(command + [f'--out_dir={one}', '--max_iters=2']) == 0
    # pure bf16: DDP averages bf16 gradients over the processes where one process computes the batch's mean in
    # one pass, so the two may differ by bf16 rounding
    assert sorted(training_losses(eight)) == [1, 2]
    assert training_losses(eight) == pytest.approx(training_losses(one), rel=1e-3)
    assert sorted(evaluations(eight)) == [0, 1, 2] and sorted(evaluations(one)) == [0, 2]
    for key in ('val_loss', 'val_loss_authors', 'train_loss'):
        assert evaluations(eight)[2][key] == pytest.approx(evaluations(one)[2][key], rel=1e-3)
    final = evaluations(eight)[2]
    assert math.isfinite(final['val_loss']) and final['val_loss_authors'] < final['val_loss']
