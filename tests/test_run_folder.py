"""A run's folder is safe from the user's mistakes: never overwritten, never resumed onto another course or other
data without a word, readable after a kill; and every mistake on the way ends in one sentence."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import train
from conftest import ROOT, read_log, training_losses
from model import read_checkpoint
from test_train import TINY, run


def files(folder):
    """{name: bytes} of the run files in folder."""
    return {name: (folder / name).read_bytes() for name in ('ckpt.pt', 'log.jsonl')}


def one_sentence(out):
    return out.err.count('\n') == 1 and 'Traceback' not in out.err


@pytest.fixture
def finished_run(tmp_path, char_data):
    """A 4-iteration run in tmp_path/run, and the arguments that made it."""
    argv = TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path / "run"}', '--max_iters=4', '--eval_interval=2',
                   '--log_interval=1', '--warmup_iters=1', '--lr_decay_iters=6', '--learning_rate=1e-3']
    assert run(argv)[0] == 0
    return tmp_path / 'run', argv


# ----------------------------------------------------------------------------- a run is never overwritten

def test_a_fresh_run_into_a_folder_that_holds_a_run_is_refused_and_leaves_it_whole(finished_run, capsys):
    folder, argv = finished_run
    before = files(folder)
    code, out = run(argv + ['--n_embd=48'], capsys)
    assert code == 1 and one_sentence(out)
    assert 'already holds a run' in out.err and 'to iteration 4' in out.err
    assert '--init_from=resume' in out.err and '--overwrite=True' in out.err
    assert files(folder) == before


def test_a_deliberate_fresh_start_leaves_only_the_new_run(finished_run):
    folder, argv = finished_run
    (folder / 'ckpt-0000002.pt').write_bytes(b'an earlier checkpoint')
    assert run(argv + ['--n_embd=48', '--max_iters=2', '--overwrite=True'])[0] == 0
    records = read_log(folder)
    assert [r['iter'] for r in records if 'val_loss' in r] == [0, 2]  # one run's evaluations, not two
    assert max(r['iter'] for r in records) == 2
    assert not (folder / 'ckpt-0000002.pt').exists()
    assert read_checkpoint(str(folder / 'ckpt.pt'))['model_config']['n_embd'] == 48


# ----------------------------------------------------------------------------- resume continues the run

def test_resume_keeps_the_runs_course_whatever_a_config_file_says(finished_run, tmp_path, capsys, char_data):
    folder, argv = finished_run
    whole = tmp_path / 'whole'
    assert run([a for a in argv if not a.startswith(('--out_dir', '--max_iters'))]
               + [f'--out_dir={whole}', '--max_iters=6'])[0] == 0
    other = tmp_path / 'other_course.py'
    other.write_text("seed = 7\nbeta2 = 0.999\nweight_decay = 0.0\ngrad_clip = 0.5\nmax_iters = 1200\n")
    capsys.readouterr()
    code, out = run([str(other)] + argv + ['--init_from=resume', '--max_iters=6'], capsys)
    assert code == 0
    kept = next(line for line in out.out.splitlines() if line.startswith("kept the run's own"))
    for setting in ('seed=1337', 'beta2=0.95', 'weight_decay=0.1', 'grad_clip=1.0'):
        assert setting in kept
    assert "changed from the run's settings: max_iters 4 -> 6" in out.out
    assert training_losses(folder) == training_losses(whole)


def test_a_change_given_on_the_command_line_is_made_and_announced(finished_run, capsys):
    folder, argv = finished_run
    capsys.readouterr()
    code, out = run(argv + ['--init_from=resume', '--max_iters=6', '--learning_rate=0.05'], capsys)
    assert code == 0
    line = next(line for line in out.out.splitlines() if line.startswith("changed from the run's settings"))
    assert 'learning_rate 0.001 -> 0.05' in line
    cfg = train.parse_config(argv)
    before, after = train.get_lr(4, cfg), train.get_lr(4, train.replace(cfg, learning_rate=0.05, max_iters=6))
    assert f'goes from {before:.2e} to {after:.2e}' in line
    assert [r['lr'] for r in read_log(folder) if r.get('iter') == 5 and 'lr' in r] == [pytest.approx(
        train.get_lr(4, train.replace(cfg, learning_rate=0.05, max_iters=6)))]


def test_resuming_a_finished_run_says_so_and_changes_nothing(finished_run, capsys):
    folder, argv = finished_run
    before = files(folder)
    capsys.readouterr()
    code, out = run(argv + ['--init_from=resume'], capsys)
    assert code == 0 and 'holds a finished run: iteration 4 of max_iters 4' in out.out
    assert files(folder) == before


def other_data(source, folder, edit):
    """A copy of the prepared folder `source` in `folder`, with edit(path of the copy) applied."""
    shutil.copytree(source, folder)
    edit(folder)
    return folder


def test_resume_on_data_with_other_characters_is_refused(finished_run, tmp_path, capsys, char_data):
    folder, argv = finished_run

    def swap_a_character(copy):
        meta = json.loads((copy / 'meta.json').read_text())
        meta['chars'] = meta['chars'][:-1] + '~'  # the same vocabulary size, one character another
        (copy / 'meta.json').write_text(json.dumps(meta))
    copy = other_data(char_data, tmp_path / 'data', swap_a_character)
    before = files(folder)
    code, out = run(argv + ['--init_from=resume', '--max_iters=6', f'--data_dir={copy}'], capsys)
    assert code == 1 and one_sentence(out) and 'other data' in out.err and 'chars' in out.err
    assert files(folder) == before


def test_resume_on_other_tokens_of_the_same_vocabulary_is_refused(finished_run, tmp_path, capsys, char_data):
    folder, argv = finished_run

    def reverse_the_text(copy):
        tokens = (copy / 'train.bin').read_bytes()
        (copy / 'train.bin').write_bytes(b''.join(tokens[i:i + 2] for i in range(len(tokens) - 2, -1, -2)))
    copy = other_data(char_data, tmp_path / 'data', reverse_the_text)
    before = files(folder)
    code, out = run(argv + ['--init_from=resume', '--max_iters=6', f'--data_dir={copy}'], capsys)
    assert code == 1 and one_sentence(out) and 'differ from the data the run' in out.err
    assert files(folder) == before


def test_resume_survives_a_log_line_cut_short_by_a_kill(finished_run, capsys):
    folder, argv = finished_run
    with open(folder / 'log.jsonl', 'a') as f:
        f.write('{"iter": 5, "loss": 3.1')  # what a kill mid-write leaves
    capsys.readouterr()
    code, out = run(argv + ['--init_from=resume', '--max_iters=6'], capsys)
    assert code == 0 and 'cut short' in out.out
    assert max(r['iter'] for r in read_log(folder)) == 6  # every line parses


def test_a_damaged_log_line_before_the_last_is_named(finished_run, capsys):
    folder, argv = finished_run
    lines = (folder / 'log.jsonl').read_text().splitlines()
    lines[1] = lines[1][:10]
    (folder / 'log.jsonl').write_text('\n'.join(lines) + '\n')
    before = files(folder)
    code, out = run(argv + ['--init_from=resume', '--max_iters=6'], capsys)
    assert code == 1 and one_sentence(out) and 'line 2 of' in out.err
    assert files(folder) == before


def test_ctrl_c_says_where_the_last_checkpoint_is(tmp_path, char_data):
    argv = TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--max_iters=100000', '--eval_interval=2',
                   '--eval_sequences=4', '--log_interval=1']
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *argv], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'})
    for line in process.stdout:
        if line.startswith('saved ckpt.pt at iteration 4'):
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.count('\n') == 1 and 'Traceback' not in err
    saved = read_checkpoint(str(tmp_path / 'ckpt.pt'))['iter_num']
    assert f'ckpt.pt holds iteration {saved}; go on with --init_from=resume' in err and saved >= 4


# ----------------------------------------------------------------------------- one sentence, not a traceback

def test_an_empty_out_dir_is_refused(capsys):
    code, out = run(TINY + ['--out_dir='], capsys)
    assert code == 1 and one_sentence(out) and 'out_dir is empty' in out.err


@pytest.mark.parametrize('meta, words', [('{"vocab_size": 6', 'is not valid JSON'), ('{"chars": 3}', 'no vocab_size')])
def test_a_damaged_meta_json_is_named(tmp_path, capsys, char_data, meta, words):
    copy = other_data(char_data, tmp_path / 'data', lambda copy: (copy / 'meta.json').write_text(meta))
    code, out = run(TINY + [f'--data_dir={copy}', f'--out_dir={tmp_path / "run"}'], capsys)
    assert code == 1 and one_sentence(out) and 'meta.json' in out.err and words in out.err


def test_a_token_file_of_odd_size_is_named(tmp_path, capsys, char_data):
    copy = other_data(char_data, tmp_path / 'data',
                      lambda copy: open(copy / 'val.bin', 'ab').write(b'\x00'))
    code, out = run(TINY + [f'--data_dir={copy}', f'--out_dir={tmp_path / "run"}'], capsys)
    assert code == 1 and one_sentence(out) and 'val.bin' in out.err and 'not whole 2-byte tokens' in out.err


def test_wandb_log_without_wandb_is_refused_before_anything_runs(tmp_path, capsys, char_data, monkeypatch):
    find_spec = train.importlib.util.find_spec
    monkeypatch.setattr(train.importlib.util, 'find_spec', lambda name: None if name == 'wandb' else find_spec(name))
    code, out = run(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--wandb_log=True'], capsys)
    assert code == 1 and one_sentence(out) and 'pip install wandb' in out.err and out.out == ''
    assert not os.listdir(tmp_path)


def test_help_prints_every_setting_and_exits_zero():
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--help'], capture_output=True,
                            text=True)
    assert result.returncode == 0 and result.stderr == ''
    for setting in ('init_from', 'overwrite', 'global_batch_size', 'norm_scheme', 'lns_mode'):
        assert setting in result.stdout


def test_a_config_file_that_overrides_an_earlier_argument_is_announced(tmp_path, capsys):
    config_file = tmp_path / 'other.py'
    config_file.write_text("out_dir = 'out-other'\nmax_iters = 7\n")
    cfg = train.parse_config(['--out_dir=mine', '--max_iters=7', str(config_file)])
    out = capsys.readouterr().out
    assert cfg.out_dir == 'out-other'  # in order, as documented, but not in silence
    assert f"{config_file} sets out_dir='out-other' over the earlier --out_dir" in out
    assert 'max_iters' not in out  # the same value: nothing to say


def test_the_end_of_a_run_names_its_folder_best_loss_and_next_commands(finished_run, capsys):
    folder, argv = finished_run
    assert run(argv + ['--overwrite=True'])[0] == 0  # run again to capture its output from the start
    lines = capsys.readouterr().out.splitlines()
    best = min(r['val_loss'] for r in read_log(folder) if 'val_loss' in r)
    end = next(i for i, line in enumerate(lines) if line.startswith('finished: '))
    assert lines[end].startswith(f'finished: {folder}, iteration 4, best validation loss {best:.4f}')
    assert any(line.strip().startswith(f'python eval_layers.py {folder}') for line in lines[end:])
    settings = lines[next(i for i, line in enumerate(lines) if line.startswith('settings: ')):]
    block = settings[:next(i for i, line in enumerate(settings[1:], 1) if not line.startswith('    '))]
    assert len(block) > 1 and all(len(line) <= 116 or ', ' not in line for line in block)
    assert f'out_dir={folder}' in ' '.join(block) and 'seed=1337' in ' '.join(block)
