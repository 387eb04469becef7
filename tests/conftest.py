import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
sys.path.insert(0, ROOT)


@pytest.fixture
def shakespeare_text_path():
    """The offline copy of tiny Shakespeare beside the project, when there is one."""
    path = os.path.join(SHARED, 'data', 'tinyshakespeare', 'input.txt')
    if not os.path.exists(path):
        pytest.skip(f"no offline corpus at {path}")
    return path


@pytest.fixture(scope='session')
def char_data(tmp_path_factory):
    """Tiny Shakespeare as characters, prepared once per test session from the offline copy."""
    source = os.path.join(SHARED, 'data', 'tinyshakespeare', 'input.txt')
    if not os.path.exists(source):
        pytest.skip(f"no offline corpus at {source}")
    folder = tmp_path_factory.mktemp('shakespeare_char')
    subprocess.run([sys.executable, os.path.join(ROOT, 'data', 'shakespeare_char', 'prepare.py'),
                    '--input', source, '--out_dir', str(folder)], check=True, capture_output=True)
    return str(folder)


def read_log(out_dir):
    """The records of a run's log.jsonl."""
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
