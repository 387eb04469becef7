"""The paper's configs: their sizes against the paper's table, and every config file parses."""

import dataclasses
import glob
import os

import pytest
import torch

from conftest import ROOT
from model import GPT
from train import UserError, model_config, parse_config, resolve_batch

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
# the GPUs and per-GPU batch of the authors' run of each size, which their evaluation estimator depends on (71M,
# not in the paper, as 130M)
AUTHORS_EVALUATION = {'71m': (1, 64), '130m': (1, 64), '250m': (4, 128), '350m': (4, 128), '1b': (8, 32)}


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
    assert cfg.block_size == 256 and cfg.global_batch_size == 512
    assert (cfg.authors_eval_gpus, cfg.authors_eval_batch_size) == AUTHORS_EVALUATION[size]
    assert cfg.weight_decay == 0.0 and cfg.grad_clip == 0.0 and cfg.min_lr == pytest.approx(cfg.learning_rate / 10)
    assert (cfg.beta1, cfg.beta2) == (0.9, 0.999) and cfg.warmup_iters == AUTHORS_WARMUP.get(size, cfg.warmup_iters)
    # embeddings at 0.02: the authors state their reported runs used it, not their public code's 0.632
    assert cfg.dtype == 'pure_bfloat16' and model['embedding_init_std'] == 0.02 and model['arch'] == 'llama'
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
    assert (ours.dtype, ours.model['vocab_size']) == ('bfloat16', None)
    changed = {k for k, v in ours.settings().items() if authors.settings()[k] != v}
    assert changed == {'dtype', 'vocab_size', 'data_dir'}


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


@pytest.mark.parametrize('size', PAPER_SIZES)
@pytest.mark.parametrize('processes', [1, 2, 4, 8, 16])
def test_every_paper_config_trains_on_512_sequences_a_step_on_any_sensible_gpu_count(size, processes):
    ceiling = parse_config([os.path.join(ROOT, 'config', f'llama_{size}_lns.py')])
    cfg = resolve_batch(ceiling, processes)
    micro_steps, remainder = divmod(cfg.gradient_accumulation_steps, processes)
    assert remainder == 0 and processes * micro_steps * cfg.batch_size == 512
    assert cfg.batch_size <= ceiling.batch_size  # the micro-batch fits what one GPU was said to hold
    # no smaller number of micro-steps would do: the micro-batch is the largest that fits and divides the share
    assert cfg.batch_size == min(ceiling.batch_size, 512 // processes)


def test_the_authors_runs_are_recovered_from_the_global_batch():
    """1B on 8 GPUs: 32 x 2 micro-steps each; 130M on one GPU: 64 x 8; 350M on 4 GPUs: 128 x 1."""
    for size, processes, expected in (('1b', 8, (32, 16)), ('130m', 1, (64, 8)), ('350m', 4, (128, 4))):
        cfg = resolve_batch(parse_config([os.path.join(ROOT, 'config', f'llama_{size}_lns.py')]), processes)
        assert (cfg.batch_size, cfg.gradient_accumulation_steps) == expected


@pytest.mark.parametrize('processes', [3, 6, 12, 24])
def test_a_process_count_that_cannot_share_the_global_batch_is_refused_naming_the_counts_that_work(processes):
    cfg = parse_config([os.path.join(ROOT, 'config', 'llama_350m_lns.py')])
    with pytest.raises(UserError, match=r'cannot be shared evenly by \d+ processes; run 1, 2, 4, 8, 16, 32, 64'):
        resolve_batch(cfg, processes)


def test_gradient_accumulation_keeps_its_nanogpt_meaning_without_a_global_batch():
    cfg = resolve_batch(parse_config(['--batch_size=12', '--gradient_accumulation_steps=8']), 4)
    assert (cfg.batch_size, cfg.gradient_accumulation_steps) == (12, 8)  # 2 micro-steps on each of 4 processes
    with pytest.raises(UserError, match='must be a multiple of the number of processes'):
        resolve_batch(cfg, 3)
    with pytest.raises(UserError, match='drop gradient_accumulation_steps'):
        parse_config([os.path.join(ROOT, 'config', 'llama_1b_lns.py'), '--gradient_accumulation_steps=4'])
    cfg = parse_config([os.path.join(ROOT, 'config', 'llama_1b_lns.py'), '--global_batch_size=None',
                        '--gradient_accumulation_steps=4'])
    assert resolve_batch(cfg, 2).gradient_accumulation_steps == 4
