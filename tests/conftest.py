import os
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


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
