"""data/c4/prepare.py: in the packed layout every document followed by end-of-text; in the rows layout one
document per row, truncated with its end token kept and right-padded; shards in order, cached shards reused,
downloads deleted on request, and bad input that fails in one sentence without touching the dataset already there."""

import gzip
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, 'data', 'c4', 'prepare.py')
EOT = 50256
TRAIN = 'c4-train.{:05d}-of-01024.json.gz'
VAL = 'c4-validation.00000-of-00008.json.gz'
DOCS = ["Beginners BBQ Class Taking Place in Missoula!\nDo you want to get better at making delicious BBQ?",
        "Discussion in 'Mac OS X Lion (10.7)' started by axboi87, Jan 20, 2012. <|endoftext|> is plain text here.",
        "Foil plaid lycra and spandex shortall with metallic slinky insets. Attached metallic elastic belt."]


@pytest.fixture(scope='module')
def encoding():
    tiktoken = pytest.importorskip('tiktoken')
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as error:  # offline without TIKTOKEN_CACHE_DIR
        pytest.skip(f"tiktoken's gpt2 encoding is not available: {error}")


def write_shard(path, texts=(), lines=None):
    # a real C4 line also has "timestamp" and "url", which the script must ignore
    lines = lines if lines is not None else [json.dumps({'text': t, 'timestamp': '2019-04-25', 'url': 'x'})
                                             for t in texts]
    with gzip.open(path, 'wt', encoding='utf-8') as f:
        f.write(''.join(line + '\n' for line in lines))
    return str(path)


def prepare(*args, cwd=None):
    # a dead proxy makes any download fail at once, so no test can reach the network
    env = dict(os.environ, https_proxy='http://127.0.0.1:9', HTTPS_PROXY='http://127.0.0.1:9')
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=cwd)


def expected(encoding, texts):
    return [token for text in texts for token in encoding.encode_ordinary(text) + [EOT]]


def read_split(folder, split):
    return np.fromfile(os.path.join(folder, f'{split}.bin'), dtype=np.uint16).tolist()


def dataset_bytes(out):
    return {name: (out / name).read_bytes() for name in ('train.bin', 'val.bin', 'meta.json')}


def assert_one_sentence_error(result, *words):
    assert result.returncode == 1 and result.stderr.startswith('error: ') and 'Traceback' not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for word in words:
        assert word in result.stderr


def test_every_document_is_followed_by_end_of_text_in_train_and_val_bin(tmp_path, encoding):
    train = write_shard(tmp_path / TRAIN.format(0), DOCS[:2])
    val = write_shard(tmp_path / VAL, DOCS[2:])
    result = prepare('--input', train, val, '--out_dir', str(tmp_path / 'out'), '--workers', '1')
    assert result.returncode == 0, result.stderr
    assert read_split(tmp_path / 'out', 'train') == (encoding.encode_ordinary(DOCS[0]) + [EOT]
                                                     + encoding.encode_ordinary(DOCS[1]) + [EOT])
    assert read_split(tmp_path / 'out', 'val') == expected(encoding, DOCS[2:])
    assert json.loads((tmp_path / 'out' / 'meta.json').read_text()) == {
        'layout': 'packed', 'tokenizer': 'gpt2', 'vocab_size': 50304, 'tokenizer_vocab_size': 50257,
        'documents': {'train': 2, 'val': 1}}


def test_train_shards_concatenate_in_shard_order_whatever_the_command_line_order(tmp_path, encoding):
    shards = [write_shard(tmp_path / TRAIN.format(i), [DOCS[i]]) for i in range(3)]
    val = write_shard(tmp_path / VAL, DOCS[:1])
    result = prepare('--input', val, *reversed(shards), '--out_dir', str(tmp_path / 'out'), '--workers', '1')
    assert result.returncode == 0, result.stderr
    assert read_split(tmp_path / 'out', 'train') == expected(encoding, DOCS)
    assert json.loads((tmp_path / 'out' / 'meta.json').read_text())['documents'] == {'train': 3, 'val': 1}


def test_a_worker_pool_writes_the_same_bytes_as_one_process(tmp_path, encoding):
    # 700 documents are three batches, so the pool really splits the shard and must keep the batches in order
    texts = [f"document {i}: {DOCS[i % 3]}" for i in range(700)]
    train = write_shard(tmp_path / TRAIN.format(0), texts)
    val = write_shard(tmp_path / VAL, DOCS)
    for workers in ('1', '2'):
        result = prepare('--input', train, val, '--out_dir', str(tmp_path / workers), '--workers', workers)
        assert result.returncode == 0, result.stderr
    assert dataset_bytes(tmp_path / '1') == dataset_bytes(tmp_path / '2')
    assert read_split(tmp_path / '2', 'train') == expected(encoding, texts)


@pytest.fixture(scope='module')
def good_run(tmp_path_factory, encoding):
    """A finished run on DOCS[:2] / DOCS[2:]: its shards and its out folder, copied per test by prepared_copy."""
    folder = tmp_path_factory.mktemp('good')
    train = write_shard(folder / TRAIN.format(0), DOCS[:2])
    val = write_shard(folder / VAL, DOCS[2:])
    result = prepare('--input', train, val, '--out_dir', str(folder / 'out'), '--workers', '1')
    assert result.returncode == 0, result.stderr
    return train, val, folder / 'out'


def prepared_copy(good_run, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(good_run[2], out)  # copytree keeps mtimes
    return out


def test_a_second_run_reuses_the_shard_token_files_without_reading_or_downloading(tmp_path, good_run):
    out = prepared_copy(good_run, tmp_path)
    before = dataset_bytes(out)
    token_files = sorted(out.joinpath('tokens').iterdir())
    mtimes = [path.stat().st_mtime_ns for path in token_files]
    # no --input: the default shards 00000 are the ones cached, so nothing is downloaded (the network is cut)
    result = prepare('--out_dir', str(out), '--workers', '1')
    assert result.returncode == 0, result.stderr
    assert dataset_bytes(out) == before
    assert [path.stat().st_mtime_ns for path in token_files] == mtimes
    assert not out.joinpath('downloads').exists()


def test_shards_already_downloaded_are_not_downloaded_again(tmp_path, encoding):
    out = tmp_path / 'out'
    out.joinpath('downloads').mkdir(parents=True)
    write_shard(out / 'downloads' / TRAIN.format(0), DOCS[:2])
    write_shard(out / 'downloads' / VAL, DOCS[2:])
    result = prepare('--out_dir', str(out), '--workers', '1')
    assert result.returncode == 0, result.stderr
    assert read_split(out, 'train') == expected(encoding, DOCS[:2])


def test_a_failed_download_names_the_url_and_suggests_input(tmp_path, encoding):
    result = prepare('--out_dir', str(tmp_path / 'out'), '--workers', '1')
    assert_one_sentence_error(result, 'https://huggingface.co/datasets/allenai/c4/resolve/main/en/'
                                      'c4-train.00000-of-01024.json.gz', '--input')
    assert not list(tmp_path.joinpath('out', 'downloads').iterdir())


@pytest.mark.parametrize('bad, workers', [('not gzip', '1'), ('truncated gzip', '1'), ('not json', '1'),
                                          ('no text', '1'), ('text is not a string', '1'), ('no text', '2')])
def test_a_bad_shard_fails_naming_the_file_and_keeps_the_old_dataset(tmp_path, good_run, bad, workers):
    good, val, _ = good_run
    out = prepared_copy(good_run, tmp_path)
    before = dataset_bytes(out)
    path = tmp_path / TRAIN.format(1)
    if bad == 'not gzip':
        path.write_bytes(b'{"text": "plain json, not gzipped"}\n')
    elif bad == 'truncated gzip':
        path.write_bytes(gzip.compress(json.dumps({'text': DOCS[0] * 50}).encode())[:-30])
    else:
        line = {'not json': '{"text": "unclosed', 'no text': '{"url": "x"}', 'text is not a string': '{"text": 7}'}
        write_shard(path, lines=[json.dumps({'text': DOCS[0]})] * 300 + [line[bad]])
    result = prepare('--input', good, str(path), val, '--out_dir', str(out), '--workers', workers)
    assert_one_sentence_error(result, str(path))
    assert dataset_bytes(out) == before
    assert sorted(p.name for p in out.joinpath('tokens').iterdir()) == [
        'c4-train.00000-of-01024.bin', 'c4-validation.00000-of-00008.bin']


@pytest.mark.parametrize('name, expected_words', [
    ('shard.json.gz', ['c4-train.*.json.gz']),
    ('c4-train.00000-of-01024.json', ['c4-train.*.json.gz']),
    ('missing', ['does not exist']),
    ('no validation shard', ['c4-validation']),
])
def test_input_that_is_not_one_c4_shard_per_split_fails_in_one_sentence(tmp_path, name, expected_words):
    train = write_shard(tmp_path / TRAIN.format(0), DOCS[:2])
    val = write_shard(tmp_path / VAL, DOCS[2:])
    inputs = {'missing': [train, val, str(tmp_path / TRAIN.format(1))], 'no validation shard': [train]}
    if name not in inputs:
        inputs[name] = [train, val, write_shard(tmp_path / name, DOCS[:1])]
    result = prepare('--input', *inputs[name], '--out_dir', str(tmp_path / 'out'), '--workers', '1')
    assert_one_sentence_error(result, *expected_words)
    assert not (tmp_path / 'out').exists()


def test_importing_the_module_downloads_and_writes_nothing(tmp_path):
    folder = os.path.dirname(SCRIPT)
    before = sorted(os.listdir(folder))
    code = ("import importlib.util; spec = importlib.util.spec_from_file_location('prepare', %r); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))" % SCRIPT)
    result = subprocess.run([sys.executable, '-B', '-c', code], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, env=dict(os.environ, https_proxy='http://127.0.0.1:9'))
    assert result.returncode == 0, result.stderr
    assert result.stdout == '' and os.listdir(tmp_path) == [] and sorted(os.listdir(folder)) == before


def test_download_writes_the_whole_file_through_a_part_file(tmp_path):
    # a file:// URL goes through the same urllib code as the real https one, without the network
    spec = importlib.util.spec_from_file_location('c4_prepare', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = tmp_path / 'source.json.gz'
    source.write_bytes(os.urandom(3 << 20))
    module.download(source.as_uri(), str(tmp_path / 'shard.json.gz'))
    assert (tmp_path / 'shard.json.gz').read_bytes() == source.read_bytes()
    assert not (tmp_path / 'shard.json.gz.part').exists()


# The rows layout, with a small T5-like tokenizer made here: <pad> 0, </s> 1, <unk> 2, words, then T5's sentinel
# tokens as the highest ids (<extra_id_0> last), and a post-processor that appends </s> to every document.
PAD, EOS = 0, 1
WORDS = [f'w{i}' for i in range(400)] + DOCS[0].split()
SENTINELS = 3


def t5_like_tokenizer(path, words=WORDS):
    tokenizers = pytest.importorskip('tokenizers')
    vocab = {'<pad>': PAD, '</s>': EOS, '<unk>': 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    first_sentinel = len(vocab)
    sentinels = {f'<extra_id_{i}>': first_sentinel + SENTINELS - 1 - i for i in range(SENTINELS)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({**vocab, **sentinels}, unk_token='<unk>'))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(['<pad>', '</s>', '<unk>', *sentinels])
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(single='$A </s>',
                                                                       special_tokens=[('</s>', EOS)])
    tokenizer.save(str(path))
    return str(path)


@pytest.fixture(scope='module')
def t5_file(tmp_path_factory):
    return t5_like_tokenizer(tmp_path_factory.mktemp('tokenizer') / 'tokenizer.json')


def words(start, count):
    return ' '.join(f'w{i % 400}' for i in range(start, start + count))


# a real sentence (with words the vocabulary lacks), and documents of 300, 255 and 256 words: too long, exactly
# one row with </s>, and one word too long
ROW_DOCS = [DOCS[1], words(0, 300), words(7, 255), words(3, 256), DOCS[0]]


def expected_rows(tokenizer_file, texts, row_length=256):
    """Each text's own tokens, cut to row_length - 1, then </s>, then <pad> up to row_length."""
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(tokenizer_file)
    rows = []
    for text in texts:
        content = tokenizer.encode(text, add_special_tokens=False).ids[:row_length - 1]
        rows.append(content + [EOS] + [PAD] * (row_length - 1 - len(content)))
    return rows


def read_rows(folder, split, row_length=256):
    return np.fromfile(os.path.join(folder, f'{split}.bin'), dtype=np.uint16).reshape(-1, row_length).tolist()


def prepare_rows(tokenizer_file, *args):
    return prepare('--layout', 'rows', '--tokenizer_file', tokenizer_file, '--workers', '1', *map(str, args))


def test_each_row_is_one_document_cut_to_256_tokens_with_its_end_token_last_and_right_padded(tmp_path, t5_file):
    train = write_shard(tmp_path / TRAIN.format(0), ROW_DOCS[:4])
    val = write_shard(tmp_path / VAL, ROW_DOCS[4:])
    result = prepare_rows(t5_file, '--input', train, val, '--out_dir', tmp_path / 'out')
    assert result.returncode == 0, result.stderr
    train_rows, val_rows = read_rows(tmp_path / 'out', 'train'), read_rows(tmp_path / 'out', 'val')
    assert train_rows == expected_rows(t5_file, ROW_DOCS[:4])
    assert val_rows == expected_rows(t5_file, ROW_DOCS[4:])
    assert [row[-1] for row in train_rows[1:4]] == [EOS, EOS, EOS]  # cut, exactly full, cut by one
    assert train_rows[0].index(EOS) < 255 and set(train_rows[0][train_rows[0].index(EOS) + 1:]) == {PAD}
    non_pad = {split: sum(token != PAD for row in rows for token in row)
               for split, rows in (('train', train_rows), ('val', val_rows))}
    assert json.loads((tmp_path / 'out' / 'meta.json').read_text()) == {
        'layout': 'rows', 'row_length': 256, 'pad_id': PAD, 'eos_id': EOS, 'tokenizer': 't5-base',
        'vocab_size': 3 + len(set(WORDS)), 'tokenizer_vocab_size': 3 + len(set(WORDS)) + SENTINELS,
        'tokenizer_sha256': hashlib.sha256(open(t5_file, 'rb').read()).hexdigest(),
        'documents': {'train': 4, 'val': 1}, 'non_pad_tokens': non_pad}


def test_rows_from_a_worker_pool_equal_rows_from_one_process_at_any_row_length(tmp_path, t5_file):
    # 700 documents are three batches, so the pool really splits the shard and must keep the batches in order
    texts = [words(i, i % 13) for i in range(700)]
    train = write_shard(tmp_path / TRAIN.format(0), texts)
    val = write_shard(tmp_path / VAL, ROW_DOCS)
    for workers in ('1', '2'):
        result = prepare('--layout', 'rows', '--tokenizer_file', t5_file, '--row_length', '8', '--input', train, val,
                         '--out_dir', str(tmp_path / workers), '--workers', workers)
        assert result.returncode == 0, result.stderr
    assert dataset_bytes(tmp_path / '1') == dataset_bytes(tmp_path / '2')
    assert read_rows(tmp_path / '2', 'train', 8) == expected_rows(t5_file, texts, 8)
    assert json.loads((tmp_path / '2' / 'meta.json').read_text())['row_length'] == 8


def test_an_interrupted_run_resumes_from_tokenized_shards_whose_downloads_it_deleted(tmp_path, t5_file):
    out = tmp_path / 'out'
    downloads = out / 'downloads'
    downloads.mkdir(parents=True)
    write_shard(downloads / TRAIN.format(0), ROW_DOCS[:2])
    write_shard(downloads / TRAIN.format(1), lines=[json.dumps({'text': 'w1 w2'}), '{"text": "unclosed'])
    write_shard(downloads / VAL, ROW_DOCS[4:])
    first = prepare_rows(t5_file, '--shards', '2', '--out_dir', out, '--delete_downloads')
    assert_one_sentence_error(first, TRAIN.format(1))
    assert sorted(os.listdir(downloads)) == [TRAIN.format(1), VAL]  # shard 0 was tokenized, so it went
    assert not (out / 'meta.json').exists()
    # shard 0 now lives only in its token file, and the network is cut: the run must resume from that file
    write_shard(downloads / TRAIN.format(1), ROW_DOCS[2:4])
    second = prepare_rows(t5_file, '--shards', '2', '--out_dir', out, '--delete_downloads')
    assert second.returncode == 0, second.stderr
    assert read_rows(out, 'train') == expected_rows(t5_file, ROW_DOCS[:4])
    assert read_rows(out, 'val') == expected_rows(t5_file, ROW_DOCS[4:])
    assert os.listdir(downloads) == []


def test_delete_downloads_never_deletes_input_files_and_without_it_downloads_stay(tmp_path, t5_file):
    train = write_shard(tmp_path / TRAIN.format(0), ROW_DOCS[:2])
    val = write_shard(tmp_path / VAL, ROW_DOCS[4:])
    result = prepare_rows(t5_file, '--input', train, val, '--out_dir', tmp_path / 'out', '--delete_downloads')
    assert result.returncode == 0, result.stderr
    assert os.path.exists(train) and os.path.exists(val)
    downloads = tmp_path / 'kept' / 'downloads'
    downloads.mkdir(parents=True)
    shutil.copy(train, downloads)
    shutil.copy(val, downloads)
    result = prepare_rows(t5_file, '--out_dir', tmp_path / 'kept')
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(downloads)) == [TRAIN.format(0), VAL]


def test_a_document_that_tokenizes_to_a_t5_sentinel_is_refused_and_nothing_is_written(tmp_path, t5_file):
    from tokenizers import Tokenizer
    train = write_shard(tmp_path / TRAIN.format(0), [ROW_DOCS[0], 'w1 <extra_id_0> w2'])
    val = write_shard(tmp_path / VAL, ROW_DOCS[4:])
    result = prepare_rows(t5_file, '--input', train, val, '--out_dir', tmp_path / 'out')
    sentinel_id = Tokenizer.from_file(t5_file).token_to_id('<extra_id_0>')
    assert_one_sentence_error(result, train, str(sentinel_id), str(3 + len(set(WORDS))))
    assert [name for _, _, names in os.walk(tmp_path / 'out') for name in names] == []


def test_a_changed_tokenizer_file_tokenizes_again_instead_of_reusing_rows(tmp_path, t5_file):
    other = t5_like_tokenizer(tmp_path / 'reversed.json', list(reversed(WORDS)))
    train = write_shard(tmp_path / TRAIN.format(0), ROW_DOCS[:4])
    val = write_shard(tmp_path / VAL, ROW_DOCS[4:])
    for tokenizer_file in (t5_file, other):
        result = prepare_rows(tokenizer_file, '--input', train, val, '--out_dir', tmp_path / 'out')
        assert result.returncode == 0, result.stderr
    assert read_rows(tmp_path / 'out', 'train') == expected_rows(other, ROW_DOCS[:4])
    assert read_rows(tmp_path / 'out', 'train') != expected_rows(t5_file, ROW_DOCS[:4])


@pytest.mark.parametrize('bad', ['missing', 'not json', 'json but no tokenizer', 'no </s> appended', 'no <pad>'])
def test_a_bad_tokenizer_file_fails_in_one_sentence_before_writing_anything(tmp_path, bad):
    tokenizers = pytest.importorskip('tokenizers')
    path = tmp_path / 'tokenizer.json'
    if bad == 'not json':
        path.write_bytes(b'\x00 not a tokenizer')
    elif bad == 'json but no tokenizer':
        path.write_text('{"vocab": ["a", "b"]}')
    elif bad == 'no </s> appended':
        tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({'<pad>': 0, '</s>': 1, '<unk>': 2, 'a': 3},
                                                                     unk_token='<unk>'))
        tokenizer.save(str(path))
    elif bad == 'no <pad>':
        t5_like_tokenizer(path)
        path.write_text(path.read_text().replace('"<pad>"', '"<nopad>"'))
    train = write_shard(tmp_path / TRAIN.format(0), ROW_DOCS[:2])
    val = write_shard(tmp_path / VAL, ROW_DOCS[4:])
    result = prepare_rows(str(path), '--input', train, val, '--out_dir', tmp_path / 'out')
    assert_one_sentence_error(result, str(path), '--tokenizer_file')
    assert not (tmp_path / 'out').exists()


def test_a_failed_tokenizer_download_names_the_url_and_suggests_tokenizer_file(tmp_path):
    train = write_shard(tmp_path / TRAIN.format(0), ROW_DOCS[:2])
    val = write_shard(tmp_path / VAL, ROW_DOCS[4:])
    result = prepare('--layout', 'rows', '--input', train, val, '--out_dir', str(tmp_path / 'out'))
    assert_one_sentence_error(result, 'https://huggingface.co/google-t5/t5-base/resolve/main/tokenizer.json',
                              '--tokenizer_file')
    assert os.listdir(tmp_path / 'out' / 'downloads') == []


def test_the_t5_tokenizer_is_downloaded_once_then_read_from_its_cache(tmp_path, t5_file, monkeypatch):
    spec = importlib.util.spec_from_file_location('c4_prepare', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, 'T5_TOKENIZER_URL', pathlib.Path(t5_file).as_uri())
    path = module.t5_tokenizer_file(str(tmp_path))
    assert open(path, 'rb').read() == open(t5_file, 'rb').read()
    # a second call must not fetch: the URL now leads nowhere
    monkeypatch.setattr(module, 'T5_TOKENIZER_URL', (tmp_path / 'gone.json').as_uri())
    assert module.t5_tokenizer_file(str(tmp_path)) == path


def test_tokenizer_file_belongs_to_the_rows_layout(tmp_path, t5_file):
    train = write_shard(tmp_path / TRAIN.format(0), ROW_DOCS[:2])
    val = write_shard(tmp_path / VAL, ROW_DOCS[4:])
    result = prepare('--tokenizer_file', t5_file, '--input', train, val, '--out_dir', str(tmp_path / 'out'))
    assert_one_sentence_error(result, '--layout rows')
