"""More mistakes a new user made with eval_layers.py, sample.py, hf.py and bench.py: damaged or re-prepared data, an
offline tokenizer, a space inside --skip_layers, a Hugging Face folder given as a run, a file that is no checkpoint.
Each ends in one sentence that says what is wrong and what to do; a plot says what text its losses are on."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import bench
import eval_layers
import hf
import sample
from conftest import ROOT, play_text
from dataloader import data_fingerprint
from model import GPT, GPTConfig


def one_error(err):
    """The error sentence, after checking that it is the only one, the last thing written, and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and err.endswith(errors[0] + '\n') and 'Traceback' not in err, err
    return errors[0]


def save_run(folder, data_dir, meta, fingerprint=None, vocab_size=None):
    """A random 3-block model saved as train.py saves a run trained on data_dir, recording the data's fingerprint."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch='llama', norm_scheme='lns', n_layer=3, n_head=2, n_embd=16, block_size=32,
                          vocab_size=vocab_size or meta['vocab_size']))
    os.makedirs(folder)
    torch.save({'model': model.state_dict(), 'model_config': model.config.to_dict(), 'iter_num': 20,
                'data_meta': meta, 'train_config': {'data_dir': str(data_dir)}, 'data_fingerprint': fingerprint},
               folder / 'ckpt.pt')
    return folder


@pytest.fixture
def data(char_data, tmp_path):
    """A copy of the prepared play that a test may change."""
    return shutil.copytree(char_data, tmp_path / 'data')


@pytest.fixture
def run(data, tmp_path):
    with open(data / 'meta.json') as f:
        meta = json.load(f)
    return save_run(tmp_path / 'lns', data, meta, data_fingerprint(data))


def evaluate(argv):
    return eval_layers.main(argv + ['--tokens', '64', '--device', 'cpu'])


# ----------------------------------------------------------------------------- 1, 2: the data a run recorded

@pytest.mark.parametrize('given', ['--data', 'recorded by the run'])
def test_a_val_bin_of_odd_size_is_named_with_prepare_again(run, data, capsys, given):
    with open(data / 'val.bin', 'ab') as f:
        f.write(b'\0')  # half a token, as a copy cut short leaves
    if given == 'recorded by the run':  # a run recorded before train.py took fingerprints
        checkpoint = torch.load(run / 'ckpt.pt', weights_only=False)
        torch.save({**checkpoint, 'data_fingerprint': None}, run / 'ckpt.pt')
    assert evaluate([str(run)] + (['--data', str(data)] if given == '--data' else [])) == 1
    error = one_error(capsys.readouterr().err)
    assert str(data / 'val.bin') in error and 'not whole 2-byte tokens' in error and 'prepare the data again' in error


def prepare_again(data, tmp_path):
    """data prepared again, in place, from another play over the same characters."""
    (tmp_path / 'other.txt').write_text(play_text(seed=1))
    subprocess.run([sys.executable, os.path.join(ROOT, 'data', 'shakespeare_char', 'prepare.py'),
                    '--input', str(tmp_path / 'other.txt'), '--out_dir', str(data)], check=True, capture_output=True)


def test_the_recorded_data_prepared_again_from_other_text_is_refused_naming_the_folder(run, data, tmp_path, capsys):
    assert evaluate([str(run)]) == 0  # the data the run trained on: measured
    capsys.readouterr()
    prepare_again(data, tmp_path)
    assert evaluate([str(run)]) == 1
    error = one_error(capsys.readouterr().err)
    assert f"{data} was prepared again since lns trained on it" in error and 'trained on other data' in error, error
    assert f"pass --data {data} to measure on it anyway" in error, error
    assert evaluate([str(run), '--data', str(data)]) == 0  # the way the sentence gives


def test_recorded_data_prepared_again_with_other_characters_offers_only_text(run, data, tmp_path, capsys):
    """--data would be refused next (its ids are other characters), so the sentence offers --text alone."""
    (tmp_path / 'other.txt').write_text(play_text(seed=1).upper() + '~')
    subprocess.run([sys.executable, os.path.join(ROOT, 'data', 'shakespeare_char', 'prepare.py'),
                    '--input', str(tmp_path / 'other.txt'), '--out_dir', str(data)], check=True, capture_output=True)
    assert evaluate([str(run)]) == 1
    error = one_error(capsys.readouterr().err)
    assert 'its characters are not the run' in error and '--text FILE' in error and '--data' not in error, error


def test_recorded_data_without_train_bin_is_measured_with_a_note_that_it_cannot_be_checked(run, data, capsys):
    os.remove(data / 'train.bin')  # the fingerprint covers both splits
    assert evaluate([str(run)]) == 0
    assert f"note: {data} has no train.bin, so whether it is still the data lns trained on cannot be checked" in \
        capsys.readouterr().err


# ----------------------------------------------------------------------------- 3: GPT-2 BPE offline

def test_gpt2_bpe_offline_gives_each_script_its_own_way_around(data, tmp_path, capsys, monkeypatch):
    tiktoken = pytest.importorskip('tiktoken')

    def offline(name):
        raise ConnectionError('no network and no cache')
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    folder = save_run(tmp_path / 'bpe', data, {'tokenizer': 'gpt2', 'vocab_size': 50304})
    (tmp_path / 'text.txt').write_text('The residual stream grows with depth. ' * 20)

    assert sample.main([str(folder), '--start=Hello', '--device=cpu']) == 1
    error = one_error(capsys.readouterr().err)
    assert 'not available offline' in error and 'set TIKTOKEN_CACHE_DIR' in error, error
    assert '--data' not in error and '--start' not in error, error  # sample.py has no --data; the prompt is fine

    assert evaluate([str(folder), '--text', str(tmp_path / 'text.txt')]) == 1
    error = one_error(capsys.readouterr().err)
    assert 'set TIKTOKEN_CACHE_DIR' in error and 'or pass --data with a folder of its token ids' in error, error


def test_a_tokenizer_json_without_the_tokenizers_package_asks_for_the_package_only(run, tmp_path, capsys,
                                                                                   monkeypatch):
    checkpoint = torch.load(run / 'ckpt.pt', weights_only=False)
    model = GPT(GPTConfig(**checkpoint['model_config']))
    model.load_state_dict(checkpoint['model'])
    hf.to_hf(model, tmp_path / 'hf', checkpoint['data_meta'])
    spec = json.loads((tmp_path / 'hf' / 'tokenizer.json').read_text())
    spec['model']['merges'] = ['a b']  # a BPE of its own, which only the tokenizers package reads
    (tmp_path / 'hf' / 'tokenizer.json').write_text(json.dumps(spec))
    monkeypatch.setitem(sys.modules, 'tokenizers', None)  # import tokenizers fails
    for main in (sample.main, eval_layers.main):
        assert main([str(tmp_path / 'hf'), '--device=cpu']) == 1
        error = one_error(capsys.readouterr().err)
        assert 'pip install tokenizers' in error and '--data' not in error, error


# ----------------------------------------------------------------------------- 4: arguments typed differently

@pytest.mark.parametrize('argv', [['--skip_layers=2,', '3'], ['--skip_layers=2', '3'], ['3', '--skip_layers=2,']],
                         ids=['2, 3', '2 3', 'number first'])
def test_a_space_inside_skip_layers_says_so(run, capsys, argv):
    assert sample.main([str(run)] + argv + ['--device=cpu']) == 1
    error = one_error(capsys.readouterr().err)
    assert 'separated by commas without spaces' in error and '--skip_layers=2,3' in error, error
    assert "'3' is not a model" in error, error


@pytest.fixture
def export(run, tmp_path):
    checkpoint = torch.load(run / 'ckpt.pt', weights_only=False)
    model = GPT(GPTConfig(**checkpoint['model_config']))
    model.load_state_dict(checkpoint['model'])
    hf.to_hf(model, tmp_path / 'hf' / 'lns', checkpoint['data_meta'])
    return tmp_path / 'hf' / 'lns'


def test_a_hugging_face_folder_given_as_the_run_is_named_with_the_right_command(run, export, tmp_path, capsys):
    before = {name: (export / name).read_bytes() for name in os.listdir(export)}
    assert hf.main([str(export), str(tmp_path / 'out2')]) == 1
    error = one_error(capsys.readouterr().err)
    assert f"{export} is a Hugging Face folder (config.json), not a run of train.py" in error, error
    assert f"python hf.py RUN_FOLDER {export}" in error and 'sample.py' in error, error
    assert not os.path.exists(tmp_path / 'out2')

    assert hf.main([str(export), str(run)]) == 1  # the two arguments swapped
    error = one_error(capsys.readouterr().err)
    assert f"the two arguments are swapped; run python hf.py {run} {export}" in error, error
    assert {name: (export / name).read_bytes() for name in os.listdir(export)} == before
    assert sorted(os.listdir(run)) == ['ckpt.pt']


# ----------------------------------------------------------------------------- 6: what the losses are on

@pytest.mark.parametrize('source', ['--text', '--data'])
def test_the_layer_drop_axis_names_the_text_the_losses_are_on(run, data, char_text, tmp_path, monkeypatch, source):
    labels = {}
    save_figure = eval_layers.save_figure

    def recording(fig, folder, name, **kwargs):
        labels[name] = fig.axes[0].get_ylabel()
        return save_figure(fig, folder, name, **kwargs)
    monkeypatch.setattr(eval_layers, 'save_figure', recording)
    given = [source, char_text if source == '--text' else str(data)]
    assert evaluate([str(run), *given, '--plot', str(tmp_path / 'plots')]) == 0
    expected = 'input.txt' if source == '--text' else "data's validation split"
    assert labels['layer_drop.png'] == f'loss increase on {expected} (nats)'


# ----------------------------------------------------------------------------- 7: a file that is no checkpoint

@pytest.mark.parametrize('script', ['sample.py', 'eval_layers.py', 'hf.py'])
@pytest.mark.parametrize('kind', ['text', 'other pickle'])
def test_a_file_that_is_no_checkpoint_ends_in_one_sentence_without_torchs_advice(tmp_path, script, kind):
    model = tmp_path / ('notes.txt' if kind == 'text' else 'other.pt')
    if kind == 'text':
        model.write_text('hello, these are my notes\n')
    else:
        torch.save({'optimizer': torch.optim.SGD}, model)  # a class: more than tensors and plain values
    argv = [str(model)] + ([str(tmp_path / 'hf')] if script == 'hf.py' else ['--device=cpu'])
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 1, result.stderr
    error = one_error(result.stderr)
    assert str(model) in error and 'weights_only' not in error, error  # read_checkpoint's sentence, passed through
    assert not os.path.exists(tmp_path / 'hf')


@pytest.mark.parametrize('argv', [['--device=cpu', '--memory'], ['--memory', '--n_layer=2']])
def test_bench_memory_with_other_arguments_says_it_takes_none(capsys, argv):
    assert bench.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and '--memory takes no other argument' in err and 'python bench.py --memory' in err
