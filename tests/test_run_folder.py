"""A run's folder is safe from the user's mistakes: never overwritten, never resumed onto another course or other
data without a word, readable after a kill; and every mistake on the way ends in one sentence."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import configurator
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
    kept = next(line for line in out.out.splitlines() if line.startswith("note: config files do not change"))
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
    find_spec = configurator.importlib.util.find_spec
    monkeypatch.setattr(configurator.importlib.util, 'find_spec', lambda name: None if name == 'wandb' else find_spec(name))
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


# ----------------------------------------------------------------------------- resume is one command

def test_resume_takes_the_model_data_and_cadence_from_the_checkpoint(finished_run, tmp_path, capsys, char_data):
    """`--init_from=resume --out_dir=X --max_iters=6` alone: the run's model flags, data folder, evaluation and
    log intervals all come from its checkpoint, and it continues as the uninterrupted run does."""
    folder, argv = finished_run
    whole = tmp_path / 'whole'
    assert run([a for a in argv if not a.startswith(('--out_dir', '--max_iters'))]
               + [f'--out_dir={whole}', '--max_iters=6'])[0] == 0
    capsys.readouterr()
    code, out = run(['--init_from=resume', f'--out_dir={folder}', '--max_iters=6', '--device=cpu'], capsys)
    assert code == 0, out.err
    assert "changed from the run's settings: max_iters 4 -> 6" in out.out and 'note:' not in out.out
    assert training_losses(folder) == training_losses(whole)  # log_interval 1 kept: iterations 5 and 6 logged
    assert [r['iter'] for r in read_log(folder) if 'val_loss' in r] == [0, 2, 4, 6]  # eval_interval 2 kept


def test_resume_that_names_another_model_is_refused_finished_or_not(finished_run, capsys):
    folder, argv = finished_run
    before = files(folder)
    for extra in ([], ['--max_iters=6']):
        code, out = run(argv + ['--init_from=resume', '--n_layer=3', *extra], capsys)
        assert code == 1 and one_sentence(out) and 'n_layer=2 (asked: 3)' in out.err
        assert files(folder) == before


@pytest.mark.parametrize('extra, words', [('--overwrite=True', 'give one of them'),
                                          ('--seed=1', 'resume without --seed')])
def test_resume_with_overwrite_or_another_seed_is_refused(finished_run, capsys, extra, words):
    folder, argv = finished_run
    before = files(folder)
    code, out = run(argv + ['--init_from=resume', extra, '--max_iters=6'], capsys)
    assert code == 1 and one_sentence(out) and words in out.err
    assert files(folder) == before


def test_a_checkpoint_with_bytes_changed_on_disk_is_refused_naming_the_earlier_ones(tmp_path, capsys, char_data):
    folder = tmp_path / 'run'
    argv = TINY + [f'--data_dir={char_data}', f'--out_dir={folder}', '--eval_interval=2', '--keep_last_n=1']
    assert run(argv + ['--max_iters=4'])[0] == 0
    data = bytearray((folder / 'ckpt.pt').read_bytes())
    data[len(data) // 2:len(data) // 2 + 5000] = bytes(5000)  # zeroed in the middle: the weights, not the index
    (folder / 'ckpt.pt').write_bytes(bytes(data))  # ckpt-0000004.pt is the same file (a second name)
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    capsys.readouterr()
    code, out = run(argv + ['--max_iters=6', '--init_from=resume'], capsys)
    assert code == 1 and one_sentence(out) and 'is damaged' in out.err and 'nothing was loaded' in out.err
    assert 'earlier checkpoints remain (ckpt-0000002.pt)' in out.err
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    with pytest.raises(ValueError, match='is damaged'):  # every tool loads through it
        read_checkpoint(str(folder / 'ckpt.pt'))


def test_any_file_that_is_not_a_checkpoint_is_named_without_torch_s_advice(tmp_path):
    import torch
    torch.save({'model': torch.nn.Linear(2, 2)}, tmp_path / 'module.pt')  # a pickled object, not plain values
    (tmp_path / 'notes.txt').write_text('not a model')
    for name, words in (('module.pt', 'holds more than tensors'), ('notes.txt', 'not a checkpoint')):
        with pytest.raises(ValueError, match=words) as error:
            read_checkpoint(str(tmp_path / name))
        assert 'weights_only' not in str(error.value)


def test_two_trainings_into_one_out_dir_are_refused_and_a_killed_one_leaves_no_lock(tmp_path, capsys, char_data):
    argv = TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path / "run"}', '--max_iters=100000',
                   '--eval_interval=1000', '--log_interval=1']
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *argv], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'})
    try:
        for line in first.stdout:
            if line.startswith('iter 2 of'):
                break
        code, out = run(argv + ['--overwrite=True'], capsys)
        assert code == 1 and one_sentence(out) and 'another training is writing to' in out.err
    finally:
        first.kill()
        first.wait()
    assert run(argv[:-3] + ['--max_iters=2', '--overwrite=True'])[0] == 0  # the killed run's lock went with it


def test_a_start_stopped_before_its_first_save_is_not_a_run_to_keep(tmp_path, capsys, char_data):
    folder = tmp_path / 'run'
    folder.mkdir()
    (folder / 'log.jsonl').write_text('{"iter": 0, "train_loss": 4.17, "val_loss": 4.17}\n')  # Ctrl-C's leftover
    argv = TINY + [f'--data_dir={char_data}', f'--out_dir={folder}', '--max_iters=2']
    code, out = run(argv + ['--init_from=resume'], capsys)
    assert code == 1 and one_sentence(out) and 'stopped before its first save' in out.err
    assert run(argv)[0] == 0  # from scratch, without --overwrite
    assert max(r['iter'] for r in read_log(folder)) == 2


def test_a_refused_run_leaves_no_folder_behind(tmp_path, capsys):
    code, out = run(TINY + [f'--data_dir={tmp_path / "missing"}', f'--out_dir={tmp_path / "run"}'], capsys)
    assert code == 1 and one_sentence(out)
    assert not (tmp_path / 'run').exists()


def test_settings_that_would_quietly_differ_from_what_was_asked_are_announced(tmp_path, capsys, char_data):
    code, out = run(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path / "a"}', '--max_iters=3',
                            '--warmup_iters=100', '--learning_rate=2e-3', '--dtype=float16', '--eval_interval=3'],
                    capsys)
    assert code == 0
    peak = train.get_lr(2, train.replace(train.TrainConfig(), warmup_iters=100, learning_rate=2e-3, max_iters=3))
    assert f'never passes {peak:.2e} of its 2.00e-03 peak' in out.out
    assert 'float16 on a CPU is computed in software' in out.out


def test_each_log_line_says_how_far_the_run_is_and_the_time_left(tmp_path, capsys, char_data):
    code, out = run(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--max_iters=4',
                            '--log_interval=2', '--eval_interval=4'], capsys)
    assert code == 0
    assert 'evaluating iteration 0 (32 sequences per split), then training' in out.out
    line = next(line for line in out.out.splitlines() if line.startswith('iter 4 of 4:'))
    assert line.endswith('0m 00s of training left')


@pytest.mark.parametrize('scheme, exported', [('lns', True), ('post', False)])
def test_the_closing_hint_offers_hf_export_only_for_schemes_it_can_export(tmp_path, capsys, char_data, scheme,
                                                                           exported):
    code, out = run(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--max_iters=1',
                            f'--norm_scheme={scheme}'], capsys)
    assert code == 0 and ('python hf.py' in out.out) == exported


def test_the_log_is_strict_json_and_a_full_disk_cuts_no_line(tmp_path):
    from checkpoint import append_log
    path = tmp_path / 'log.jsonl'
    append_log(str(path), {'iter': 1, 'loss': 2.0, 'grad_norm': float('nan'), 'mfu': float('inf')})
    record = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f'bare {name} in the log'))
    assert record == {'iter': 1, 'loss': 2.0, 'grad_norm': None, 'mfu': None}
    with pytest.raises(train.UserError, match='No space left on device'):
        append_log('/dev/full', {'iter': 2, 'loss': 1.0})


def test_a_checkpoint_that_cannot_be_written_ends_in_one_sentence_and_keeps_the_last_one(
        finished_run, capsys, monkeypatch):
    import checkpoint
    folder, argv = finished_run
    before = files(folder)

    def full_disk(state, f):
        f.write(b'PK partial')
        raise RuntimeError('[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 10: file write failed')
    monkeypatch.setattr(checkpoint.torch, 'save', full_disk)
    capsys.readouterr()
    code, out = run(argv + ['--init_from=resume', '--max_iters=6'], capsys)
    assert code == 1 and one_sentence(out) and 'file write failed' in out.err and 'enforce' not in out.err
    assert 'free space' in out.err and (folder / 'ckpt.pt').read_bytes() == before['ckpt.pt']
    assert not [name for name in os.listdir(folder) if name.endswith('.tmp')]


def test_ckpt_pt_shares_its_file_with_no_numbered_checkpoint_so_copying_one_over_it_changes_nothing_else(
        tmp_path, char_data):
    folder = tmp_path / 'run'
    argv = TINY + [f'--data_dir={char_data}', f'--out_dir={folder}', '--eval_interval=2', '--keep_last_n=2']
    assert run(argv + ['--max_iters=6'])[0] == 0
    assert sorted(name for name in os.listdir(folder) if name.startswith('ckpt')) == [
        'ckpt-0000002.pt', 'ckpt-0000004.pt', 'ckpt.pt']
    earlier = {name: (folder / name).read_bytes() for name in ('ckpt-0000002.pt', 'ckpt-0000004.pt')}
    shutil.copyfile(folder / 'ckpt-0000002.pt', folder / 'ckpt.pt')  # a rollback, as the damage message advises
    assert {name: (folder / name).read_bytes() for name in earlier} == earlier
    assert read_checkpoint(str(folder / 'ckpt.pt'))['iter_num'] == 2


def test_resume_on_a_data_folder_prepared_again_names_the_data_not_the_model(finished_run, tmp_path, capsys,
                                                                             char_data):
    """Other text means another vocabulary too: the sentence says the data changed, not that a model was asked."""
    folder, argv = finished_run
    copy = other_data(char_data, tmp_path / 'data', lambda copy: None)
    subprocess.run([sys.executable, os.path.join(ROOT, 'data', 'shakespeare_char', 'prepare.py'), '--input',
                    os.path.join(ROOT, 'README.md'), '--out_dir', str(copy)], check=True, capture_output=True)
    code, out = run(['--init_from=resume', f'--out_dir={folder}', '--max_iters=6', f'--data_dir={copy}',
                     '--device=cpu'], capsys)
    assert code == 1 and one_sentence(out) and 'holds other data than the run' in out.err
    assert 'asked' not in out.err
