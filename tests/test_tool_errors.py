"""The mistakes a user makes with eval_layers.py, sample.py and hf.py: each ends in one sentence that says what is
wrong and what to do, a non-zero exit, and nothing written or lost; where a mistake is harmless, a note says so."""

import json
import os
import shutil
import sys
import types

import pytest
import torch

import bench
import eval_layers
import hf
import sample
import tasks
from model import GPT, GPTConfig

TASK = {'activity_label': 'Baking', 'ctx_a': 'A woman puts a tray into the oven.', 'ctx_b': 'she', 'label': 1,
        'endings': ['flies away.', 'waits for the cookies to bake.', 'eats the oven.', 'reads a map of the sea.']}


@pytest.fixture(scope='module')
def run(tmp_path_factory, char_data):
    """A random 3-block char model saved as train.py saves a run trained on char_data, with its log.jsonl."""
    with open(os.path.join(char_data, 'meta.json')) as f:
        meta = json.load(f)
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch='llama', norm_scheme='lns', n_layer=3, n_head=2, n_embd=16, block_size=32,
                          vocab_size=meta['vocab_size']))
    folder = tmp_path_factory.mktemp('runs') / 'lns'
    os.makedirs(folder)
    torch.save({'model': model.state_dict(), 'model_config': model.config.to_dict(), 'iter_num': 20,
                'data_meta': meta, 'train_config': {'data_dir': char_data}}, folder / 'ckpt.pt')
    records = [{'iter': i, 'block_variance': [1.0 + i, 2.0 + i, 3.0 + i]} for i in (0, 10, 20)]
    (folder / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    return folder


@pytest.fixture(scope='module')
def export(run, tmp_path_factory):
    """The run exported by hf.py, with its character tokenizer."""
    checkpoint = torch.load(run / 'ckpt.pt', weights_only=False)
    model = GPT(GPTConfig(**checkpoint['model_config']))
    model.load_state_dict(checkpoint['model'])
    folder = tmp_path_factory.mktemp('hf') / 'lns'
    hf.to_hf(model, folder, checkpoint['data_meta'])
    return folder


def one_error(err):
    """The error sentence, after checking that it is the only one and the last thing written."""
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and err.endswith(errors[0] + '\n'), err
    return errors[0]


def evaluate(argv):
    return eval_layers.main(argv + ['--tokens', '64', '--device', 'cpu'])


def copy_of_data(char_data, folder, **meta_changes):
    """A data folder with char_data's val.bin and its meta.json changed (a value of None removes the key)."""
    os.makedirs(folder)
    shutil.copyfile(os.path.join(char_data, 'val.bin'), folder / 'val.bin')
    with open(os.path.join(char_data, 'meta.json')) as f:
        meta = json.load(f)
    meta.update(meta_changes)
    (folder / 'meta.json').write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    return folder


# ----------------------------------------------------------------------------- unseen characters

def old_export(export, folder):
    """The export as hf.py wrote it before its tokenizer refused unseen characters: no unknown token at all."""
    shutil.copytree(export, folder)
    spec = json.loads((folder / 'tokenizer.json').read_text())
    spec['model']['unk_token'] = None
    (folder / 'tokenizer.json').write_text(json.dumps(spec))
    return folder


@pytest.mark.parametrize('exported', ['new', 'old'])
def test_an_export_refuses_characters_it_never_saw_in_the_words_of_its_run(run, export, tmp_path, capsys, exported):
    model = export if exported == 'new' else old_export(export, tmp_path / 'old')
    text = tmp_path / 'text.txt'
    text.write_text('ROMEO: 1234 (hi)\n' * 20)
    errors = []
    for folder in (run, model):
        assert evaluate([str(folder), '--text', str(text)]) == 1
        errors.append(one_error(capsys.readouterr().err).replace(str(folder.name), 'MODEL'))
    assert errors[0] == errors[1]
    assert "5 distinct characters '()124' that MODEL never saw in training" in errors[1], errors[1]
    assert sample.main([str(model), '--start=ROMEO: 1234 (hi)', '--device=cpu']) == 1
    error = one_error(capsys.readouterr().err)
    assert "'()124'" in error and 'never saw in training' in error, error


def test_the_exported_tokenizer_file_itself_fails_on_an_unseen_character(export):
    tokenizers = pytest.importorskip('tokenizers')
    tokenizer = tokenizers.Tokenizer.from_file(str(export / 'tokenizer.json'))
    assert tokenizer.decode(tokenizer.encode('ROMEO: 3 hi').ids) == 'ROMEO: 3 hi'
    with pytest.raises(Exception, match='never saw in training'):
        tokenizer.encode('ROMEO: 1234 (hi)')


# ----------------------------------------------------------------------------- the same characters as the data

def test_an_export_is_measured_on_its_runs_data_like_the_run(run, export, char_data, tmp_path):
    losses = []
    for model in (run, export):
        assert evaluate([str(model), '--data', char_data, '--json', str(tmp_path / 'layers.json')]) == 0
        losses.append(json.loads((tmp_path / 'layers.json').read_text())['models'][0]['base_loss'])
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


@pytest.mark.parametrize('model', ['run', 'export'])
def test_data_of_other_characters_is_refused_naming_the_difference(run, export, char_data, tmp_path, capsys, model):
    with open(os.path.join(char_data, 'meta.json')) as f:
        chars = json.load(f)['chars']
    other = copy_of_data(char_data, tmp_path / 'other', chars=chars.replace('z', '~'))
    assert evaluate([str(run if model == 'run' else export), '--data', str(other)]) == 1
    error = one_error(capsys.readouterr().err)
    assert "1 only in the data ('~'), 1 only in the model ('z')" in error, error


# ----------------------------------------------------------------------------- devices

@pytest.mark.parametrize('device, words', [('cuda', ["'cuda' is not available", 'no CUDA GPU', '--device=cpu']),
                                           ('gpu', ["'gpu' is not available", 'only cpu', '--device=cpu'])])
def test_a_gpu_that_is_not_there_ends_in_train_pys_sentence(run, monkeypatch, capsys, device, words):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert eval_layers.main([str(run), f'--device={device}']) == 1
    assert sample.main([str(run), f'--device={device}']) == 1
    err = capsys.readouterr().err
    assert err.count('error: ') == 2 and all(err.count(w) == 2 for w in words), err


# ----------------------------------------------------------------------------- files that cannot be read

@pytest.mark.parametrize('recorded', [False, True], ids=['--data', 'recorded by the run'])
@pytest.mark.parametrize('meta', ['{"tokenizer": "char", "vocab_size": 65,', '{"tokenizer": "char", "chars": "ab"}',
                                  '{"tokenizer": "char", "vocab_size": 65}', '[]'],
                         ids=['cut short', 'no vocab_size', 'no chars', 'not an object'])
def test_a_corrupt_meta_json_is_named(run, char_data, tmp_path, capsys, meta, recorded):
    data = copy_of_data(char_data, tmp_path / 'data')
    (data / 'meta.json').write_text(meta)
    if recorded:
        checkpoint = torch.load(run / 'ckpt.pt', weights_only=False)
        checkpoint['train_config'] = {'data_dir': str(data)}
        os.makedirs(tmp_path / 'run')
        torch.save(checkpoint, tmp_path / 'run' / 'ckpt.pt')
        argv = [str(tmp_path / 'run')]
    else:
        argv = [str(run), '--data', str(data)]
    assert evaluate(argv) == 1
    error = one_error(capsys.readouterr().err)
    assert str(data / 'meta.json') in error and "prepare.py again" in error, error



def test_data_whose_meta_json_names_no_tokenizer_is_read_as_train_py_reads_it(run, char_data, tmp_path):
    """train.py needs only vocab_size in meta.json; eval_layers reads the same folder (with a run that records no
    tokenizer either) rather than asking for keys train.py never needed."""
    data = copy_of_data(char_data, tmp_path / 'data')
    (data / 'meta.json').write_text('{"vocab_size": 65}')
    checkpoint = torch.load(run / 'ckpt.pt', weights_only=False)
    checkpoint['data_meta'] = {'vocab_size': 65}
    os.makedirs(tmp_path / 'run')
    torch.save(checkpoint, tmp_path / 'run' / 'ckpt.pt')
    assert evaluate([str(tmp_path / 'run'), '--data', str(data)]) == 0

def run_with_log(run, folder, lines):
    os.makedirs(folder)
    os.symlink(run / 'ckpt.pt', folder / 'ckpt.pt')
    (folder / 'log.jsonl').write_text(lines)
    return folder


def test_a_log_cut_short_on_its_last_line_is_read_up_to_it_with_a_note(run, tmp_path, capsys):
    log = (run / 'log.jsonl').read_text() + '{"iter": 30, "block_vari'
    folder = run_with_log(run, tmp_path / 'killed', log)
    assert evaluate([str(folder), '--json', str(tmp_path / 'layers.json')]) == 0
    assert capsys.readouterr().err.count('cut short') == 1
    logged = json.loads((tmp_path / 'layers.json').read_text())['models'][0]['variance_during_training']
    assert [r['iter'] for r in logged] == [0, 10, 20] and logged[2]['block_variance'] == [21.0, 22.0, 23.0]


def test_a_corrupt_line_inside_a_log_is_refused_naming_it_before_anything_is_measured(run, tmp_path, capsys,
                                                                                       monkeypatch):
    lines = (run / 'log.jsonl').read_text().splitlines(keepends=True)
    folder = run_with_log(run, tmp_path / 'corrupt', lines[0] + '{"iter": 5, "bl\n' + ''.join(lines[1:]))
    monkeypatch.setattr(eval_layers, 'analyze', lambda *args, **kwargs: pytest.fail('measured before refusing'))
    assert evaluate([str(folder)]) == 1
    error = one_error(capsys.readouterr().err)
    assert f"line 2 of {folder / 'log.jsonl'} is not JSON" in error, error


# ----------------------------------------------------------------------------- outputs, checked first

@pytest.mark.parametrize('output, words', [
    (lambda tmp: ['--plot', str(tmp / 'figure.png')], ['--plot', 'is a file']),
    (lambda tmp: ['--plot', str(tmp / 'figure.png' / 'plots')], ['--plot', 'is a file']),
    (lambda tmp: ['--json', str(tmp / 'missing' / 'layers.json')], ['--json', 'not an existing folder']),
    (lambda tmp: ['--json', str(tmp)], ['--json', 'is a folder']),
], ids=['plot folder is a file', 'plot folder inside a file', 'json folder missing', 'json is a folder'])
def test_an_output_that_cannot_be_written_is_refused_before_anything_is_measured(run, tmp_path, capsys, monkeypatch,
                                                                                 output, words):
    (tmp_path / 'figure.png').write_bytes(b'an earlier figure')
    monkeypatch.setattr(eval_layers, 'analyze', lambda *args, **kwargs: pytest.fail('measured before refusing'))
    assert evaluate([str(run)] + output(tmp_path)) == 1
    error = one_error(capsys.readouterr().err)
    assert all(w in error for w in words), error
    assert sorted(os.listdir(tmp_path)) == ['figure.png'] and (tmp_path / 'figure.png').read_bytes() == \
        b'an earlier figure'


# ----------------------------------------------------------------------------- local paths and hub ids

def test_a_missing_local_path_is_no_such_folder_not_a_hub_id(tmp_path, capsys, monkeypatch):
    asked = []

    def offline_hub(spec, **kwargs):
        asked.append(spec)
        raise OSError('offline')

    hub = types.ModuleType('huggingface_hub')
    hub.snapshot_download = offline_hub
    monkeypatch.setitem(sys.modules, 'huggingface_hub', hub)
    monkeypatch.chdir(tmp_path)
    os.makedirs('out/lns')
    for spec in ('out/doesnotexist', './lns', 'lns.pt', 'runs/ckpt.pt', '~/out/lns'):
        assert eval_layers.main([spec, '--device', 'cpu']) == 1
        error = one_error(capsys.readouterr().err)
        assert error.startswith(f'error: {spec} does not exist (no such folder or file)'), error
    assert asked == []
    assert eval_layers.main(['someone/model', '--device', 'cpu']) == 1  # an owner/name with no such owner here
    assert asked == ['someone/model'] and 'could not download someone/model' in capsys.readouterr().err


# ----------------------------------------------------------------------------- --help

@pytest.mark.parametrize('script, options', [
    (sample, ['--start', '--num_samples', '--max_new_tokens', '--temperature', '--skip_layers', '--device']),
    (hf, ['RUN_OR_CHECKPOINT', 'HF_FOLDER', 'so they cannot be exported.']),  # the description whole
    (eval_layers, ['--data', '--text', '--tokens', '--last_k', '--task', '--task_file', '--json', '--plot']),
    (bench, ['--steps', '--warmup', '--memory']),
], ids=['sample.py', 'hf.py', 'eval_layers.py', 'bench.py'])
def test_every_script_answers_help_with_its_options(capsys, script, options):
    """`python SCRIPT --help` exits with main's status (argparse's exit 0 where argparse answers)."""
    try:
        status = script.main(['--help'])
    except SystemExit as exit:
        status = exit.code
    out = capsys.readouterr().out
    assert status == 0 and 'usage:' in out and all(option in out for option in options), out


# ----------------------------------------------------------------------------- what is measured, said

def test_last_k_is_printed_and_a_clamp_is_announced(run, tmp_path, capsys):
    assert evaluate([str(run), '--last_k', '5', '--json', str(tmp_path / 'layers.json')]) == 0
    captured = capsys.readouterr()
    drops = json.loads((tmp_path / 'layers.json').read_text())['models'][0]['cumulative_drop']
    assert [d['last_k'] for d in drops] == [1, 2, 3]
    assert "--last_k 5 exceeds lns's 3 blocks" in captured.err
    table = captured.out.split('drop: loss increase with the last k blocks removed together\n')[1].splitlines()
    assert [row.split()[0] for row in table[2:5]] == ['1', '2', '3']
    assert [float(row.split()[-1]) for row in table[2:5]] == [round(d['loss_drop'], 4) for d in drops]


def test_a_task_alone_says_the_loss_analyses_are_not_run(run, tmp_path, capsys):
    (tmp_path / 'task.jsonl').write_text(json.dumps(TASK) + '\n')
    assert evaluate([str(run), '--task', 'hellaswag', '--task_file', str(tmp_path / 'task.jsonl')]) == 0
    err = capsys.readouterr().err
    assert 'the loss analyses (layer drop, angular distance, variance) are not run' in err and '--data' in err


# ----------------------------------------------------------------------------- downloads and exports

def test_a_failed_download_leaves_no_partial_file_and_names_where_to_put_it(run, tmp_path, capsys, monkeypatch):
    def offline(url, timeout):
        raise OSError('network is unreachable')

    monkeypatch.setattr(tasks, 'TASK_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(tasks.urllib.request, 'urlopen', offline)
    assert evaluate([str(run), '--task', 'arc_easy']) == 1
    error = one_error(capsys.readouterr().err)
    assert os.listdir(tmp_path / 'cache') == []
    assert tasks.TASKS['arc_easy'].url in error and 'ARC-Easy-Test.jsonl' in error, error
    assert f"at {tmp_path / 'cache' / 'arc_easy_test.jsonl'}, or pass --task_file" in error, error


@pytest.mark.parametrize('umask', [0o022, 0o002], ids=['umask 022', 'umask 002'])
def test_an_export_follows_the_umask_like_any_other_output(tmp_path, umask):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=5))
    before = os.umask(umask)
    try:
        hf.to_hf(model, tmp_path / 'hf', {'tokenizer': 'char', 'vocab_size': 5, 'chars': 'abcde'})
    finally:
        os.umask(before)
    assert os.stat(tmp_path / 'hf').st_mode & 0o777 == 0o777 & ~umask
    for name in os.listdir(tmp_path / 'hf'):
        assert os.stat(tmp_path / 'hf' / name).st_mode & 0o777 == 0o666 & ~umask, name
