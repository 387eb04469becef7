"""Every numeric trainer setting with a valid range is checked up front, in one sentence naming the range."""

import pytest

import train


@pytest.mark.parametrize('argument, words', [
    ('--learning_rate=0', 'learning_rate must be positive, not 0.0'),
    ('--learning_rate=-1e-3', 'learning_rate must be positive'),
    ('--min_lr=-1e-5', 'min_lr must be at least 0'),
    ('--min_lr=0.1', 'min_lr (0.1) must not exceed learning_rate'),
    ('--beta1=1', 'beta1 must be in [0, 1), not 1.0'),
    ('--beta2=-0.1', 'beta2 must be in [0, 1)'),
    ('--weight_decay=-0.1', 'weight_decay must be at least 0'),
    ('--warmup_iters=-1', 'warmup_iters must be at least 0'),
    ('--lr_decay_iters=0', 'lr_decay_iters must be at least 1'),
    ('--dropout=1.0', 'dropout must be in [0, 1)'),
    ('--grad_clip=-1', 'grad_clip must be at least 0'),
    ('--eval_interval=0', 'eval_interval must be at least 1'),
    ('--checkpoint_interval=0', 'checkpoint_interval must be at least 1'),
    ('--log_interval=0', 'log_interval must be at least 1'),
    ('--eval_tokens=-1', 'eval_tokens must be at least 0'),
    ('--keep_last_n=-1', 'keep_last_n must be at least 0'),
    ('--ddp_timeout_minutes=0', 'ddp_timeout_minutes must be at least 1'),
])
def test_out_of_range_settings_are_refused_with_their_range(argument, words):
    with pytest.raises(train.UserError, match=words.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[')):
        train.parse_config([argument])


@pytest.mark.parametrize('argument', ['--warmup_iters=0', '--weight_decay=0', '--grad_clip=0', '--beta1=0',
                                      '--dropout=0', '--min_lr=0', '--eval_tokens=0', '--min_lr=2e-3'])
def test_the_edges_of_each_range_are_accepted(argument):
    key, value = argument[2:].split('=')
    assert train.parse_config([argument]).settings()[key] == float(value)
