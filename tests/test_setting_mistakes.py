"""The mistakes a new user makes with settings, devices and data folders: each ends in one sentence that says what is
wrong and the command or flag that fixes it, a non-zero exit, no traceback, and nothing written or lost."""

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import bench
import sample
import train
from configurator import UserError, read_config_file, resolve_device
from conftest import ROOT

PAPER_CONFIG = os.path.join(ROOT, 'config', 'llama_71m_pre.py')
OUR_RECIPE = os.path.join(ROOT, 'config', 'our_recipe.py')


def one_error(err):
    assert err.count('\n') == 1 and err.startswith('error: ') and 'Traceback' not in err, err
    return err


def train_error(argv, capsys):
    assert train.main(argv) == 1
    return one_error(capsys.readouterr().err)


def prepare(script, *args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'data', script, 'prepare.py'), *args],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def suggested_prepare(err):
    """The arguments of the `python data/<dataset>/prepare.py ...` command an error suggests, as a shell reads them."""
    command = re.search(r"python data/(\w+)/prepare\.py((?: (?:'[^']*'|[^\s,']+))*)", err)
    assert command, err
    return command[1], shlex.split(command[2])


# ----------------------------------------------------------------------------- devices

@pytest.mark.parametrize('device', ['mps', 'cuda', 'cuda:1', 'foo'])
def test_a_device_this_machine_lacks_is_named_with_what_is_there(device, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    out_dir = tmp_path / 'run'
    err = train_error([f'--device={device}', f'--out_dir={out_dir}'], capsys)
    assert f"device {device!r} is not available" in err and 'only cpu' in err and '--device=cpu' in err, err
    assert not out_dir.exists()
    assert bench.main([f'--device={device}', '--steps=1', '--warmup=1']) == 1  # sample.py: test_tool_errors.py
    assert f"device {device!r} is not available" in one_error(capsys.readouterr().err)


def test_with_gpus_the_sentence_names_them_and_refuses_one_beyond(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert resolve_device('cuda:1') == torch.device('cuda:1') and resolve_device('auto') == torch.device('cuda')
    for device in ('mps', 'cuda:2'):
        with pytest.raises(UserError) as error:
            resolve_device(device)
        assert all(words in str(error.value) for words in (f"{device!r}", 'cuda:0 to cuda:1', '--device=cuda'))


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize('main, argv, words', [
    (train.main, ['--learning_rat=1e-3'], "unknown setting 'learning_rat' in --learning_rat; did you mean learning_rate?"),
    (bench.main, ['--n_layers=2'], "unknown setting 'n_layers' in --n_layers; did you mean n_layer?"),
    (sample.main, ['out/run', '--temperatur=0.5'], "'temperatur' in --temperatur; did you mean temperature?"),
    (train.main, ['--xyzzy=1'], "unknown setting 'xyzzy' in --xyzzy; run with --help to see the known settings"),
])
def test_an_unknown_setting_names_the_near_one(main, argv, words, capsys):
    assert main(argv) == 1
    err = one_error(capsys.readouterr().err)
    assert words in err and 'max_iters' not in err, err  # the near name, not the list of every setting


def test_an_unknown_setting_in_a_config_file_names_the_near_one(tmp_path, capsys):
    config = tmp_path / 'mine.py'
    config.write_text("learning_rat = 1e-3\n")
    err = train_error([str(config)], capsys)
    assert f"unknown setting 'learning_rat' in {config}; did you mean learning_rate?" in err, err


# ----------------------------------------------------------------------------- unprepared data

def test_a_misspelled_dataset_is_unknown_and_the_near_one_named(tmp_path, capsys):
    err = train_error(['--dataset=shakespear_char', '--device=cpu', f'--out_dir={tmp_path / "run"}'], capsys)
    assert "unknown dataset 'shakespear_char'" in err and 'did you mean --dataset=shakespeare_char?' in err, err
    assert 'python data/shakespear_char' not in err and not os.path.exists(tmp_path / 'run' / 'ckpt.pt')


def test_an_unknown_dataset_lists_those_with_a_prepare_script(capsys):
    err = train_error(['--dataset=wikitext', '--device=cpu'], capsys)
    assert "unknown dataset 'wikitext'" in err and 'did you mean' not in err, err
    assert 'c4, mixed_char, shakespeare, shakespeare_char' in err, err


def test_the_prepare_command_for_a_data_dir_writes_that_folder(tmp_path, capsys, char_text):
    folder = tmp_path / 'my data'
    err = train_error(['--dataset=shakespeare_char', f'--data_dir={folder}', '--device=cpu'], capsys)
    dataset, args = suggested_prepare(err)
    assert (dataset, args) == ('shakespeare_char', ['--out_dir', str(folder)]), err
    assert prepare(dataset, *args, '--input', char_text).returncode == 0
    assert (folder / 'meta.json').exists()


def test_the_prepare_command_for_the_default_folder_has_no_out_dir(capsys):
    if os.path.exists(os.path.join(ROOT, 'data', 'shakespeare', 'meta.json')):
        pytest.skip("data/shakespeare is prepared here")
    err = train_error(['--dataset=shakespeare', '--device=cpu'], capsys)
    assert suggested_prepare(err) == ('shakespeare', []), err


def test_an_unprepared_paper_config_suggests_the_authors_rows_it_reads(tmp_path, capsys):
    folder = tmp_path / 'c4'
    err = train_error([PAPER_CONFIG, f'--data_dir={folder}', '--device=cpu'], capsys)
    dataset, args = suggested_prepare(err)
    assert dataset == 'c4' and args == ['--layout', 'rows', '--val_shards', '2', '--out_dir', str(folder),
                                        '--shards', 'N'], err
    assert '15 for 71M' in err, err
    # c4's prepare.py accepts those flags: it gets as far as the tokenizer file, offline, before any download
    result = prepare('c4', *args[:-1], '15', '--tokenizer_file', str(tmp_path / 'absent.json'))
    assert result.returncode == 1 and 'absent.json does not exist' in result.stderr, result.stderr
    assert read_config_file(PAPER_CONFIG)['block_size'] == 256  # prepare.py's default --row_length


def test_our_recipe_after_a_size_config_suggests_packed_gpt2_c4(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # our_recipe.py's data_dir is relative: data/c4_gpt2
    err = train_error([PAPER_CONFIG, OUR_RECIPE, '--device=cpu'], capsys)
    assert suggested_prepare(err) == ('c4', ['--layout', 'packed', '--shards', '8', '--out_dir', 'data/c4_gpt2']), err


def test_our_recipe_alone_says_it_follows_a_size_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = train_error([OUR_RECIPE, '--device=cpu'], capsys)
    assert 'python train.py config/llama_350m_lns.py config/our_recipe.py' in err and 'shakespeare' not in err, err
    assert suggested_prepare(err) == ('c4', ['--layout', 'packed', '--shards', '8', '--out_dir', 'data/c4_gpt2']), err


# ----------------------------------------------------------------------------- the prepare scripts

@pytest.mark.parametrize('script', ['shakespeare_char', 'shakespeare', 'mixed_char', 'c4'])
def test_an_out_dir_that_is_a_file_is_refused_and_left_alone(script, tmp_path, char_text):
    existing = tmp_path / 'notes.txt'
    existing.write_text('my notes\n')
    source = [] if script == 'c4' else ['--input', char_text]  # C4 is downloaded: refused before that
    result = prepare(script, *source, '--out_dir', str(existing))
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    assert f"--out_dir {existing} is a file, not a folder" in one_error(result.stderr)
    assert existing.read_text() == 'my notes\n' and os.listdir(tmp_path) == ['notes.txt']


def test_bpe_prepare_offline_without_the_tiktoken_cache_says_where_it_looks(tmp_path, char_text):
    pytest.importorskip('tiktoken')
    cache, out = tmp_path / 'empty_cache', tmp_path / 'out'
    cache.mkdir()
    # an unreachable proxy: offline even on a machine with a network
    env = {**os.environ, 'TIKTOKEN_CACHE_DIR': str(cache), 'HTTPS_PROXY': 'http://127.0.0.1:9',
           'https_proxy': 'http://127.0.0.1:9', 'NO_PROXY': '', 'no_proxy': ''}
    result = prepare('shakespeare', '--input', char_text, '--out_dir', str(out), env=env)
    assert result.returncode == 1, result.stderr
    err = one_error(result.stderr)
    assert "could not fetch tiktoken's GPT-2 encoding" in err and 'set TIKTOKEN_CACHE_DIR' in err, err
    assert not out.exists()
