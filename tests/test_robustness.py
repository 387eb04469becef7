"""Paper-scale training on CPU: DDP equals one process, compile with bf16 autocast, exact resume after SIGKILL,
and bad input that ends in one sentence with existing files untouched."""

import json
import os
import random
import shutil
import signal
import time

import numpy as np
import pytest
import torch

import configurator
import train
from conftest import ROOT, finish, launch, read_log, training_losses
from model import read_checkpoint

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_sequences=16',
        '--device=cpu', '--warmup_iters=2', '--learning_rate=3e-3']


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path, char_data):
    common = TINY + [f'--data_dir={char_data}', '--max_iters=6', '--eval_interval=6', '--log_interval=1',
                     '--gradient_accumulation_steps=4']
    code, _, err = finish(launch(common + [f'--out_dir={tmp_path / "one"}']))
    assert code == 0, err
    code, _, err = finish(launch(common + [f'--out_dir={tmp_path / "two"}'], nproc=2))
    assert code == 0, err
    one, two = (read_checkpoint(tmp_path / name / 'ckpt.pt') for name in ('one', 'two'))
    for key in one['model']:
        torch.testing.assert_close(two['model'][key], one['model'][key], rtol=1e-4, atol=1e-5, msg=key)
    assert training_losses(tmp_path / 'two') == pytest.approx(training_losses(tmp_path / 'one'), rel=1e-4)
    evals = [[r['val_loss'] for r in read_log(tmp_path / name) if 'val_loss' in r] for name in ('one', 'two')]
    assert evals[1] == pytest.approx(evals[0], rel=1e-4)
    assert len(two['rng']) == 2 and len(one['rng']) == 1


def test_global_batch_that_the_processes_cannot_share_is_refused(tmp_path, char_data):
    code, _, err = finish(launch(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}',
                                         '--gradient_accumulation_steps=3'], nproc=2))
    assert code != 0 and 'must be a multiple of the number of processes (2)' in err
    # each process reports its own error once: on a multi-node run the failing rank need not be rank 0
    assert err.count('error: ') == 2 and err.count('[rank 1] error: ') == 1 and not os.listdir(tmp_path)


def test_a_node_whose_data_differs_from_rank_0_s_is_refused_by_every_rank(tmp_path, char_data):
    """Each node reads its own copy of the data; rank 1 here is given a copy with one token changed, as a node
    holding other shards would be. Both ranks refuse before training, naming rank 1."""
    other = tmp_path / 'other'
    shutil.copytree(char_data, other)
    tokens = np.memmap(other / 'train.bin', dtype=np.uint16, mode='r+')
    tokens[len(tokens) // 2] = (tokens[len(tokens) // 2] + 1) % 65
    tokens.flush()
    script = tmp_path / 'train_on_other_data.py'  # train.py, but rank 1 reads the other copy
    script.write_text(f"import os, sys\nsys.path.insert(0, {ROOT!r})\nimport train\n"
                      f"local = train.resolve_data_dir\n"
                      f"train.resolve_data_dir = lambda *args: {str(other)!r} if os.environ['RANK'] == '1' "
                      f"else local(*args)\nsys.exit(train.main(sys.argv[1:]))\n")
    out = tmp_path / 'out'
    argv = TINY + [f'--data_dir={char_data}', f'--out_dir={out}', '--gradient_accumulation_steps=2']
    code, _, err = finish(launch(argv, nproc=2, script=script))
    assert code != 0 and err.count('rank(s) 1 found other data') == 2 and not out.exists()


def test_sigkill_at_a_random_moment_then_resume_matches_an_uninterrupted_run(tmp_path, char_data):
    common = TINY + [f'--data_dir={char_data}', '--max_iters=60', '--eval_interval=1', '--log_interval=1',
                     '--keep_last_n=2']
    code, _, err = finish(launch(common + [f'--out_dir={tmp_path / "whole"}']))
    assert code == 0, err
    killed = tmp_path / 'killed'
    process = launch(common + [f'--out_dir={killed}'])
    deadline = time.time() + 120
    while not (killed / 'ckpt.pt').exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))  # checkpoints are written every iteration: often mid-write
    process.send_signal(signal.SIGKILL)
    process.communicate()
    resumed_from = read_checkpoint(killed / 'ckpt.pt')['iter_num']
    code, out, err = finish(launch(common + [f'--out_dir={killed}', '--init_from=resume']))
    assert code == 0, err
    assert 'resuming from' in out and resumed_from < 60
    assert training_losses(killed) == training_losses(tmp_path / 'whole')
    assert sorted(os.listdir(killed)) == ['ckpt-0000058.pt', 'ckpt-0000059.pt', 'ckpt.pt', 'log.jsonl']


def test_half_written_checkpoint_files_are_ignored_on_resume(tmp_path, char_data):
    common = TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--eval_interval=3', '--log_interval=1']
    assert train.main(common + ['--max_iters=3']) == 0
    good = (tmp_path / 'ckpt.pt').read_bytes()
    (tmp_path / 'ckpt.pt.tmp').write_bytes(good[:len(good) // 2])  # as if killed while writing iteration 6
    (tmp_path / 'ckpt-0000006.pt.tmp').write_bytes(good[:len(good) // 3])
    assert train.main(common + ['--max_iters=6', '--init_from=resume']) == 0
    assert read_checkpoint(tmp_path / 'ckpt.pt')['iter_num'] == 6
    assert not (tmp_path / 'ckpt.pt.tmp').exists()


def test_truncated_real_checkpoint_gives_one_sentence_and_stays(tmp_path, char_data, capsys):
    common = TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--eval_interval=2']
    assert train.main(common + ['--max_iters=2']) == 0
    truncated = (tmp_path / 'ckpt.pt').read_bytes()[:5000]
    (tmp_path / 'ckpt.pt').unlink()
    (tmp_path / 'ckpt.pt').write_bytes(truncated)
    capsys.readouterr()
    assert train.main(common + ['--max_iters=4', '--init_from=resume']) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'cut short or damaged' in err and err.count('\n') == 1
    assert (tmp_path / 'ckpt.pt').read_bytes() == truncated


def test_checkpoint_of_another_architecture_is_refused(tmp_path, char_data, capsys):
    common = TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--eval_interval=2']
    assert train.main(common + ['--max_iters=2']) == 0
    capsys.readouterr()
    assert train.main(common + ['--max_iters=4', '--init_from=resume', '--arch=gpt']) == 1
    assert "arch='llama' (asked: 'gpt')" in capsys.readouterr().err


def test_token_ids_beyond_the_model_vocabulary_are_refused(tmp_path, char_data, capsys):
    assert train.main(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path / "o"}', '--vocab_size=50']) == 1
    err = capsys.readouterr().err
    assert 'has 65 token ids' in err and "vocab_size is 50" in err and not (tmp_path / 'o').exists()


def test_token_ids_in_the_data_beyond_the_vocabulary_are_refused(tmp_path, capsys):
    (tmp_path / 'meta.json').write_text('{"vocab_size": 10}')  # claims 10 ids, holds 200
    for split in ('train', 'val'):
        (tmp_path / f'{split}.bin').write_bytes(bytes(range(200)) * 4)
    assert train.main(TINY + [f'--data_dir={tmp_path}', f'--out_dir={tmp_path / "o"}']) == 1
    err = capsys.readouterr().err
    assert 'holds token id' in err and 'vocab_size 10' in err and not (tmp_path / 'o').exists()


# compiling takes half a minute on a 2-core CPU, so the compiled run is in the slow set
@pytest.mark.parametrize('compile', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_bf16_autocast_training_on_cpu_learns_eager_and_compiled(tmp_path, char_data, compile):
    out_dir = tmp_path / 'o'
    assert train.main(TINY + [f'--data_dir={char_data}', f'--out_dir={out_dir}', f'--compile={compile}',
                              '--dtype=bfloat16', '--max_iters=20', '--eval_interval=20',
                              '--learning_rate=1e-2']) == 0
    evals = [r['val_loss'] for r in read_log(out_dir) if 'val_loss' in r]
    assert evals[-1] < evals[0] - 0.5
    assert not any(k.startswith('_orig_mod') for k in read_checkpoint(out_dir / 'ckpt.pt')['model'])


def test_activation_checkpointing_gives_the_same_training(tmp_path, char_data):
    common = TINY + [f'--data_dir={char_data}', '--max_iters=4', '--eval_interval=4', '--log_interval=1']
    assert train.main(common + [f'--out_dir={tmp_path / "plain"}']) == 0
    assert train.main(common + [f'--out_dir={tmp_path / "ckpt"}', '--activation_checkpointing=True']) == 0
    assert training_losses(tmp_path / 'ckpt') == pytest.approx(training_losses(tmp_path / 'plain'), rel=1e-5)


def test_log_records_carry_grad_norm_speed_and_mfu(tmp_path, char_data):
    assert train.main(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--max_iters=4',
                              '--log_interval=2', '--eval_interval=4']) == 0
    records = [r for r in read_log(tmp_path) if 'loss' in r]
    assert [r['iter'] for r in records] == [2, 4]
    for record in records:
        assert record['grad_norm'] > 0 and record['ms_per_iter'] > 0 and record['tokens_per_sec'] > 0
        assert record['mfu'] is None  # no known peak for a CPU


def test_peak_flops_table_knows_datacenter_gpus_and_says_unknown_otherwise(monkeypatch):
    names = {'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H100 PCIe': 756e12, 'NVIDIA A100-SXM4-80GB': 312e12,
             'NVIDIA A10G': None, 'NVIDIA L4': 121e12, 'NVIDIA L40': 181e12, 'NVIDIA H100 NVL': 835e12,
             'NVIDIA L40S': 362e12, 'NVIDIA H200': 989e12, 'NVIDIA GeForce GTX 1080': None}
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device, name=name: name)
        assert configurator.peak_flops(torch.device('cuda')) == (name, peak)
    assert configurator.peak_flops(torch.device('cpu')) == ('cpu', None)


def test_bench_reports_steady_state_speed_of_a_config(capsys):
    import bench
    assert bench.main(['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=2',
                       '--device=cpu', '--dataset=none', '--steps=2', '--warmup=1']) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['ms_per_step'] > 0 and 0 < result['mfu'] < 1 and result['peak_source'] == 'measured float32 matmul'
    assert result['tokens_per_step'] == 32 and result['parameters'] > 0 and result['peak_memory_bytes'] > 0
    assert bench.main(['--steps=0']) == 1 and 'positive int' in capsys.readouterr().err


