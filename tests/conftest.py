import json
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the offline corpora beside the project; only optional tests read them. CURSE_SHARED_DIR points elsewhere (a
# missing folder shows what a fork without them runs)
SHARED = os.environ.get('CURSE_SHARED_DIR', os.path.join(os.path.dirname(ROOT), 'shared'))
sys.path.insert(0, ROOT)

# tiny Shakespeare's 65 characters, so that models trained on the generated corpus read that text too
CHARACTERS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SPEAKERS = ['FIRST CITIZEN', 'SECOND CITIZEN', 'KING', 'QUEEN', 'NURSE', 'DUKE OF YORK', 'MESSENGER']
WORDS = ('the a and of to in my your his her our good noble gentle lord lady king queen love heart night day '
         'sword crown grace speak hear come go know tell would shall must not now here there what why how '
         'never ever well fair sweet blood death life time world father mother son brother friend').split()


def play_text(characters=60_000, seed=0):
    """A play made of random sentences over a small word list: structured enough to learn in a few dozen steps,
    with every character of tiny Shakespeare in its first line."""
    generator = random.Random(seed)
    parts = ["ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 3 $ & ' , - . : ; ? !\n\n"]
    size = len(parts[0])
    while size < characters:
        sentences = []
        for _ in range(generator.randint(1, 3)):
            words = generator.choices(WORDS, k=generator.randint(3, 9))
            sentences.append(' '.join(words).capitalize() + generator.choice('.....?!;'))
        part = f"{generator.choice(SPEAKERS)}:\n{' '.join(sentences)}\n\n"
        parts.append(part)
        size += len(part)
    return ''.join(parts)


@pytest.fixture
def shakespeare_text_path():
    """The offline copy of tiny Shakespeare beside the project, when there is one."""
    path = os.path.join(SHARED, 'data', 'tinyshakespeare', 'input.txt')
    if not os.path.exists(path):
        pytest.skip(f"no offline corpus at {path}")
    return path


@pytest.fixture(scope='session')
def char_text(tmp_path_factory):
    """The generated play as a text file (about 60 KB), written once per test session."""
    path = tmp_path_factory.mktemp('play') / 'input.txt'
    path.write_text(play_text())
    return str(path)


@pytest.fixture(scope='session')
def char_data(tmp_path_factory, char_text):
    """The generated play as characters (vocabulary 65), prepared once per test session by the char prepare
    script, so that the training tests run without any offline corpus."""
    folder = tmp_path_factory.mktemp('shakespeare_char')
    subprocess.run([sys.executable, os.path.join(ROOT, 'data', 'shakespeare_char', 'prepare.py'),
                    '--input', char_text, '--out_dir', str(folder)], check=True, capture_output=True)
    return str(folder)


def read_log(out_dir):
    """The records of a run's log.jsonl."""
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def training_losses(out_dir):
    """{iteration: training loss} of a run's log."""
    return {r['iter']: r['loss'] for r in read_log(out_dir) if 'loss' in r}


def launch(argv, nproc=1, script=os.path.join(ROOT, 'train.py'), **kwargs):
    """train.py (or another script) in a fresh process, through torchrun when nproc > 1 (gloo on CPU)."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    prefix = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] \
        if nproc > 1 else [sys.executable]
    return subprocess.Popen(prefix + [str(script), *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def finish(process, timeout=300):
    """(exit status, stdout, stderr) of a launched process."""
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
