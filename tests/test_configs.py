"""The paper's configs: their sizes against the paper's table, and every config file parses."""

import dataclasses
import glob
import os

import pytest
import torch

from conftest import ROOT
from model import GPT, GPTConfig
from train import model_config, parse_config

# the paper's Table (Llama, vocabulary 32,000, untied head): d_model, layers, heads, FFN hidden, parameters
PAPER_SIZES = {
    '71m': (512, 12, 8, 1368, 71e6),
    '130m': (768, 12, 12, 2048, 134e6),
    '250m': (768, 24, 16, 2560, 247e6),
    '350m': (1024, 24, 16, 2736, 368e6),
    '1b': (2048, 24, 32, 5461, 1.34e9),
}
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, 'config', '*.py')))
# the authors' warmup steps (their run_<size>.sh scripts)
AUTHORS_WARMUP = {'130m': 2000, '250m': 4000, '350m': 6000, '1b': 1000}


def llama_params(d, layers, hidden, vocab):
    """Per block: q, k, v, o (4 d^2), SwiGLU's gate, up, down (3 d hidden), two RMSNorm weights; then the final
    norm, and untied input and output embeddings."""
    return layers * (4 * d * d + 3 * d * hidden + 2 * d) + d + 2 * vocab * d


@pytest.mark.parametrize('size', PAPER_SIZES)
@pytest.mark.parametrize('scheme', ['pre', 'lns'])
def test_paper_config_has_the_paper_size_and_the_authors_recipe(size, scheme):
    d, layers, heads, hidden, paper_params = PAPER_SIZES[size]
    cfg = parse_config([os.path.join(ROOT, 'config', f'llama_{size}_{scheme}.py')])
    model = cfg.model
    assert (model['n_embd'], model['n_layer'], model['n_head'], model['ffn_hidden'], model['norm_scheme']) == \
        (d, layers, heads, hidden, scheme)
    assert cfg.block_size == 256 and cfg.batch_size * cfg.gradient_accumulation_steps == 512
    assert cfg.weight_decay == 0.0 and cfg.grad_clip == 0.0 and cfg.min_lr == pytest.approx(cfg.learning_rate / 10)
    assert (cfg.beta1, cfg.beta2) == (0.9, 0.999) and cfg.warmup_iters == AUTHORS_WARMUP.get(size, cfg.warmup_iters)
    assert cfg.dtype == 'pure_bfloat16' and model['embedding_init_std'] == 0.632 and model['arch'] == 'llama'
    assert model['vocab_size'] == 32000 and cfg.eval_tokens == 10_000_000
    with torch.device('meta'):
        model = GPT(model_config(cfg, vocab_size=None))
    assert model.num_params() == llama_params(d, layers, hidden, 32000)
    assert model.num_params() == pytest.approx(paper_params, rel=0.01)


@pytest.mark.parametrize('size', PAPER_SIZES)
def test_our_recipe_is_one_file_away_from_each_paper_config(size):
    authors = parse_config([os.path.join(ROOT, 'config', f'llama_{size}_lns.py')])
    ours = parse_config([os.path.join(ROOT, 'config', f'llama_{size}_lns.py'),
                         os.path.join(ROOT, 'config', 'our_recipe.py')])
    assert (ours.dtype, ours.model['embedding_init_std'], ours.model['vocab_size']) == ('bfloat16', 0.02, None)
    changed = {k for k, v in ours.settings().items() if authors.settings()[k] != v}
    assert changed == {'dtype', 'embedding_init_std', 'vocab_size', 'data_dir'}


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_parses_into_a_valid_model(path):
    cfg = parse_config([path])
    config = model_config(cfg, vocab_size=50304)
    assert config.block_size >= cfg.block_size
    with torch.device('meta'):
        assert GPT(config).num_params() > 0


@pytest.mark.parametrize('size', PAPER_SIZES)
def test_pre_and_lns_twins_differ_only_in_the_scheme_and_out_dir(size):
    pre, lns = (parse_config([os.path.join(ROOT, 'config', f'llama_{size}_{s}.py')]) for s in ('pre', 'lns'))
    assert pre.model['norm_scheme'] == 'pre' and lns.model['norm_scheme'] == 'lns'
    assert dataclasses.replace(pre, model={**pre.model, 'norm_scheme': 'lns'}, out_dir=lns.out_dir) == lns
