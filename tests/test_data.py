"""The prepare scripts: what they write, and that bad input writes nothing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import CHARACTERS, ROOT, SHARED

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20


def prepare(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'data', script, 'prepare.py'), *args],
                          capture_output=True, text=True, timeout=120)


def read_split(folder, split):
    return np.fromfile(os.path.join(folder, f'{split}.bin'), dtype=np.uint16)


def test_char_prepare_round_trips_the_text_with_a_90_10_split(tmp_path):
    source = tmp_path / 'input.txt'
    source.write_text(TEXT)
    result = prepare('shakespeare_char', '--input', str(source), '--out_dir', str(tmp_path / 'out'))
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / 'out' / 'meta.json').read_text())
    assert meta['chars'] == ''.join(sorted(set(TEXT))) and meta['vocab_size'] == len(set(TEXT))
    train, val = read_split(tmp_path / 'out', 'train'), read_split(tmp_path / 'out', 'val')
    assert len(train) == int(0.9 * len(TEXT)) and len(train) + len(val) == len(TEXT)
    assert ''.join(meta['chars'][i] for i in np.concatenate([train, val])) == TEXT


def test_bpe_prepare_writes_gpt2_tokens_and_padded_vocab(tmp_path):
    tiktoken = pytest.importorskip('tiktoken')
    try:
        encoding = tiktoken.get_encoding('gpt2')
    except Exception as error:  # offline without TIKTOKEN_CACHE_DIR
        pytest.skip(f"tiktoken's gpt2 encoding is not available: {error}")
    source = tmp_path / 'input.txt'
    source.write_text(TEXT)
    result = prepare('shakespeare', '--input', str(source), '--out_dir', str(tmp_path / 'out'))
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / 'out' / 'meta.json').read_text())
    assert meta['vocab_size'] == 50304 and meta['vocab_size'] % 64 == 0 and meta['tokenizer'] == 'gpt2'
    cut = int(0.9 * len(TEXT))
    assert read_split(tmp_path / 'out', 'train').tolist() == encoding.encode_ordinary(TEXT[:cut])
    assert encoding.decode(read_split(tmp_path / 'out', 'val').tolist()) == TEXT[cut:]


@pytest.mark.parametrize('content', ['', '   \n'])
def test_empty_input_fails_in_one_sentence_and_keeps_the_old_dataset(tmp_path, content):
    good = tmp_path / 'good.txt'
    good.write_text(TEXT)
    out = tmp_path / 'out'
    assert prepare('shakespeare_char', '--input', str(good), '--out_dir', str(out)).returncode == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    bad = tmp_path / 'bad.txt'
    bad.write_text(content)
    result = prepare('shakespeare_char', '--input', str(bad), '--out_dir', str(out))
    assert result.returncode != 0
    assert result.stderr.startswith('error: ') and 'empty' in result.stderr and 'Traceback' not in result.stderr
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_missing_input_file_fails_in_one_sentence(tmp_path):
    result = prepare('shakespeare_char', '--input', str(tmp_path / 'nope.txt'), '--out_dir', str(tmp_path / 'out'))
    assert result.returncode != 0 and 'Traceback' not in result.stderr and 'nope.txt' in result.stderr
    assert not (tmp_path / 'out').exists()


def test_generated_play_holds_exactly_tiny_shakespeares_characters(char_data):
    # the training tests count on it: 65 ids, an initial loss of log(65), text of tiny Shakespeare tokenizable
    meta = json.loads(open(os.path.join(char_data, 'meta.json')).read())
    assert meta['chars'] == CHARACTERS and meta['vocab_size'] == 65
    assert len(read_split(char_data, 'val')) > 4096  # enough for eval_layers' windows


def test_char_prepare_of_tiny_shakespeare_gives_its_65_characters(tmp_path, shakespeare_text_path):
    result = prepare('shakespeare_char', '--input', shakespeare_text_path, '--out_dir', str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / 'meta.json').read_text())['chars'] == CHARACTERS
    assert len(read_split(tmp_path, 'train')) == int(0.9 * 1115394)  # the file's characters, split 90/10


# ----------------------------------------------------------------------------- several texts as one corpus

def decode(folder, split):
    meta = json.loads((folder / 'meta.json').read_text())
    return ''.join(meta['chars'][i] for i in read_split(folder, split))


def test_mixed_corpus_holds_out_the_last_tenth_of_every_source(tmp_path):
    """Files and folders of .txt files; each source split 90/10 by characters, the parts joined in name order by a
    newline, the vocabulary every character of every source."""
    texts = {'b.txt': 'bbbbbbbbbB' * 30, 'nested/a.txt': 'aaaaaaaaaA' * 50, 'c.txt': 'ccccccccc\u00e9' * 10}
    (tmp_path / 'texts' / 'nested').mkdir(parents=True)
    for name in ('b.txt', 'nested/a.txt'):
        (tmp_path / 'texts' / name).write_text(texts[name])
    (tmp_path / 'texts' / 'notes.md').write_text('not a source')
    (tmp_path / 'c.txt').write_text(texts['c.txt'])
    result = prepare('mixed_char', '--input', str(tmp_path / 'texts'), str(tmp_path / 'c.txt'),
                     '--out_dir', str(tmp_path / 'out'))
    assert result.returncode == 0, result.stderr
    order = sorted(texts)  # b.txt, c.txt, nested/a.txt
    assert decode(tmp_path / 'out', 'train') == '\n'.join(texts[n][:int(0.9 * len(texts[n]))] for n in order)
    assert decode(tmp_path / 'out', 'val') == '\n'.join(texts[n][int(0.9 * len(texts[n])):] for n in order)
    meta = json.loads((tmp_path / 'out' / 'meta.json').read_text())
    assert meta['chars'] == ''.join(sorted(set(''.join(texts.values())) | {'\n'}))
    assert meta['sources']['nested/a.txt'] == {'characters': 500, 'train': 450, 'val': 50}


def test_a_training_slice_keeps_each_source_s_share_and_the_whole_validation_and_vocabulary(tmp_path):
    (tmp_path / 'a.txt').write_text('a' * 1000)
    (tmp_path / 'b.txt').write_text('b' * 3000 + 'Z')
    whole, part = tmp_path / 'whole', tmp_path / 'part'
    assert prepare('mixed_char', '--input', str(tmp_path / 'a.txt'), str(tmp_path / 'b.txt'),
                   '--out_dir', str(whole)).returncode == 0
    result = prepare('mixed_char', '--input', str(tmp_path / 'a.txt'), str(tmp_path / 'b.txt'),
                     '--train_chars', '360', '--out_dir', str(part))
    assert result.returncode == 0, result.stderr
    assert decode(part, 'train') == 'a' * 90 + '\n' + 'b' * 270  # 900 and 2,700 training characters, 1:3
    assert (part / 'val.bin').read_bytes() == (whole / 'val.bin').read_bytes()
    assert json.loads((part / 'meta.json').read_text())['chars'] == json.loads((whole / 'meta.json').read_text())['chars']
    assert 'Z' in decode(part, 'val')


@pytest.mark.parametrize('extra, words', [
    (['--train_chars', '99999'], 'between 1 and the corpus'),
    (['--input', 'missing.txt'], 'neither a file nor a folder'),
])
def test_bad_mixed_corpus_requests_fail_in_one_sentence_and_write_nothing(tmp_path, extra, words):
    (tmp_path / 'a.txt').write_text(TEXT)
    arguments = ['--input', str(tmp_path / 'a.txt'), *extra] if extra[0] != '--input' else \
        [extra[0], str(tmp_path / extra[1])]
    result = prepare('mixed_char', *arguments, '--out_dir', str(tmp_path / 'out'))
    assert result.returncode != 0 and words in result.stderr and 'Traceback' not in result.stderr
    assert not (tmp_path / 'out').exists()


def test_the_default_mixed_corpus_downloads_exactly_the_offline_texts(tmp_path):
    """The addresses the script downloads from are pinned to commits and checked by sha256; those hashes are the
    offline copies' beside the project, so both routes build the same corpus."""
    import hashlib
    import importlib.util
    spec = importlib.util.spec_from_file_location('mixed_prepare', os.path.join(ROOT, 'data', 'mixed_char',
                                                                                'prepare.py'))
    mixed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mixed)
    folder = os.path.join(SHARED, 'data')
    if not os.path.isdir(folder):
        pytest.skip(f"no offline corpora at {folder}")
    local = mixed.local_sources([folder])
    assert sorted(local) == sorted(mixed.SOURCES)
    for name, path in local.items():
        with open(path, 'rb') as f:
            assert hashlib.sha256(f.read()).hexdigest() == mixed.SOURCES[name][1], name
