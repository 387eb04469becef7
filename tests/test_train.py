"""train.py: configuration, schedule, learning on real data, exact resume, and one-sentence errors."""

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, read_log
from model import GPT, GPTConfig, read_checkpoint
from train import TrainConfig, UserError, get_lr, parse_config

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8', '--eval_sequences=32',
        '--device=cpu']


def run(argv, capsys=None):
    code = train.main(argv)
    return code, (capsys.readouterr() if capsys else None)


# ----------------------------------------------------------------------------- configuration

def test_overrides_apply_in_order_after_config_files(tmp_path):
    config_file = tmp_path / 'small.py'
    config_file.write_text("import math\nn_layer = 6\nlearning_rate = 3e-4\n_private = 'ignored'\nout_dir = 'a'\n")
    cfg = parse_config([str(config_file), '--n_layer=8', '--out_dir=123', '--compile=True', '--bias=None'])
    assert (cfg.model['n_layer'], cfg.learning_rate, cfg.out_dir, cfg.compile, cfg.model['bias']) == \
        (8, 3e-4, '123', True, None)
    assert parse_config([]) == TrainConfig()


def test_an_int_is_accepted_for_a_float():
    cfg = parse_config(['--learning_rate=1', '--dropout=0'])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)


@pytest.mark.parametrize('argv, words', [
    (['--n_layers=4'], ["'n_layers'", 'did you mean n_layer?']),
    (['--n_layer=abc'], ['n_layer', 'an int', "'abc'"]),
    (['--n_layer=2.5'], ['n_layer', 'an int', '2.5']),
    (['--n_layer=True'], ['n_layer', 'an int']),
    (['--compile=yes'], ['compile', 'a bool', "'yes'"]),
    (['--learning_rate=fast'], ['learning_rate', 'a float']),
    (['--n_kv_head=two'], ['n_kv_head', 'an int or None']),
    (['--max_iters'], ['--max_iters', '--key=value']),
    (['--=3'], ['--key=value']),
    (['max_iters=3'], ['max_iters=3', '.py']),
    (['--init_from=gpt2'], ['init_from', 'scratch', 'resume']),
    (['--dtype=fp8'], ['dtype', 'bfloat16']),
    (['--batch_size=0'], ['batch_size', 'at least 1']),
])
def test_bad_arguments_name_the_key_and_what_is_expected(argv, words):
    with pytest.raises(UserError) as error:
        parse_config(argv)
    message = str(error.value)
    assert all(word in message for word in words), message
    assert '\n' not in message


def test_bad_config_files_are_named(tmp_path):
    unknown = tmp_path / 'unknown.py'
    unknown.write_text("n_layers = 4\n")
    with pytest.raises(UserError, match="unknown setting 'n_layers' in .*unknown.py"):
        parse_config([str(unknown)])
    wrong_type = tmp_path / 'wrong.py'
    wrong_type.write_text("max_iters = '100'\n")
    with pytest.raises(UserError, match=r"max_iters expects an int, but .*wrong.py gives '100'"):
        parse_config([str(wrong_type)])
    broken = tmp_path / 'broken.py'
    broken.write_text("n_layer = = 4\n")
    with pytest.raises(UserError, match='broken.py failed to run: SyntaxError'):
        parse_config([str(broken)])
    with pytest.raises(UserError, match='cannot read config file'):
        parse_config([str(tmp_path / 'missing.py')])


def test_every_model_setting_is_a_training_knob_declared_once_in_gptconfig():
    model_settings = {f.name for f in dataclasses.fields(GPTConfig)} - {'block_size'}  # the trainer sets that
    assert set(train.MODEL_KEYS) == model_settings
    assert not model_settings & {f.name for f in dataclasses.fields(TrainConfig)}  # no second declaration
    for field in dataclasses.fields(GPTConfig):  # each one settable by name, with GPTConfig's type
        if field.name in model_settings:
            value = TrainConfig().model.get(field.name, field.default)
            assert parse_config([f'--{field.name}={value}']).model[field.name] == value


def test_bad_model_settings_exit_with_the_model_error(capsys, char_data):
    code, out = run(TINY + [f'--data_dir={char_data}', '--norm_scheme=LNS'], capsys)
    assert code == 1 and 'norm_scheme must be one of pre, lns' in out.err and 'Traceback' not in out.err


# ----------------------------------------------------------------------------- learning-rate schedule

def test_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    warmup = [get_lr(it, cfg) for it in range(10)]
    assert all(b - a == pytest.approx(1 / 11) for a, b in zip(warmup, warmup[1:])) and warmup[-1] < 1.0
    assert get_lr(10, cfg) == pytest.approx(1.0)
    assert get_lr(60, cfg) == pytest.approx(0.55)  # halfway through the decay: (peak + floor) / 2
    assert get_lr(35, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert get_lr(110, cfg) == pytest.approx(0.1) and get_lr(500, cfg) == pytest.approx(0.1)
    assert get_lr(50, TrainConfig(decay_lr=False, learning_rate=0.3)) == 0.3
    assert get_lr(60, TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=999,
                                  lr_decay_iters=110)) == pytest.approx(0.55)


# ----------------------------------------------------------------------------- training

def test_training_lowers_the_loss_on_real_text(tmp_path, char_data):
    out_dir = str(tmp_path / 'run')
    code, _ = run(TINY + [f'--data_dir={char_data}', f'--out_dir={out_dir}', '--max_iters=60', '--eval_interval=60',
                          '--learning_rate=1e-2', '--min_lr=1e-3', '--warmup_iters=5', '--log_interval=10'])
    assert code == 0
    evals = [r for r in read_log(out_dir) if 'val_loss' in r]
    assert [r['iter'] for r in evals] == [0, 60]
    # from uniform over 65 characters (4.17 nats) to well below the unigram entropy of the text (~3.3 nats)
    assert evals[0]['val_loss'] == pytest.approx(math.log(65), abs=0.1)
    assert evals[1]['val_loss'] < 3.0
    logged = [r for r in read_log(out_dir) if 'loss' in r]
    assert [r['iter'] for r in logged] == [10, 20, 30, 40, 50, 60] and all(r['lr'] > 0 for r in logged)
    checkpoint = read_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    assert checkpoint['iter_num'] == 60 and checkpoint['best_val_loss'] == evals[1]['val_loss']
    assert all(type(v) in (int, float, str, bool, type(None)) for v in checkpoint['train_config'].values())
    model = GPT.from_checkpoint(checkpoint)
    assert model.config.n_layer == 2 and model.config.norm_scheme == 'lns'


def test_resume_continues_with_identical_losses(tmp_path, char_data):
    common = TINY + [f'--data_dir={char_data}', '--dropout=0.1', '--eval_interval=10', '--log_interval=1',
                     '--warmup_iters=5', '--lr_decay_iters=20', '--learning_rate=3e-3',
                     '--gradient_accumulation_steps=2']
    whole, halves = str(tmp_path / 'whole'), str(tmp_path / 'halves')
    assert run(common + [f'--out_dir={whole}', '--max_iters=20'])[0] == 0
    assert run(common + [f'--out_dir={halves}', '--max_iters=10'])[0] == 0
    assert run(common + [f'--out_dir={halves}', '--max_iters=20', '--init_from=resume'])[0] == 0
    losses = lambda out_dir: {r['iter']: r['loss'] for r in read_log(out_dir) if 'loss' in r}
    assert len(losses(whole)) == 20 and losses(halves) == losses(whole)
    val = lambda out_dir: [r['val_loss'] for r in read_log(out_dir) if 'val_loss' in r]
    assert val(halves) == val(whole)
    final = [read_checkpoint(os.path.join(d, 'ckpt.pt'))['model'] for d in (whole, halves)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


# ----------------------------------------------------------------------------- one-sentence errors

def test_unprepared_dataset_names_the_prepare_command(tmp_path, capsys):
    code, out = run(['--dataset=shakespeare_char', f'--data_dir={tmp_path}', '--device=cpu'], capsys)
    assert code == 1 and 'run: python data/shakespeare_char/prepare.py' in out.err
    assert out.err.count('\n') == 1 and 'Traceback' not in out.err


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys, char_data):
    code, out = run(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--init_from=resume'], capsys)
    assert code == 1 and 'no ' in out.err and 'ckpt.pt' in out.err and out.err.count('\n') == 1


def test_truncated_checkpoint_is_reported_and_left_alone(tmp_path, capsys, char_data):
    (tmp_path / 'ckpt.pt').write_bytes(b'PK\x03\x04 truncated')
    code, out = run(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--init_from=resume'], capsys)
    assert code == 1 and 'cut short or damaged' in out.err and out.err.count('\n') == 1
    assert (tmp_path / 'ckpt.pt').read_bytes() == b'PK\x03\x04 truncated'


def test_resume_with_another_model_names_the_difference(tmp_path, capsys, char_data):
    base = TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--eval_interval=2']
    assert run(base + ['--max_iters=2'])[0] == 0
    before = (tmp_path / 'ckpt.pt').read_bytes()
    code, out = run(base + ['--max_iters=4', '--init_from=resume', '--n_layer=3'], capsys)
    assert code == 1 and 'n_layer=2' in out.err and 'asked: 3' in out.err
    assert (tmp_path / 'ckpt.pt').read_bytes() == before


def test_out_dir_that_is_a_file_is_refused(tmp_path, capsys, char_data):
    (tmp_path / 'file').write_text('keep me')
    code, out = run(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path / "file"}'], capsys)
    assert code == 1 and 'not a folder' in out.err and (tmp_path / 'file').read_text() == 'keep me'


def test_block_size_beyond_the_data_is_refused(tmp_path, capsys):
    (tmp_path / 'meta.json').write_text('{"vocab_size": 10}')
    for split in ('train', 'val'):
        (tmp_path / f'{split}.bin').write_bytes(bytes(40))  # 20 tokens
    code, out = run(TINY + [f'--data_dir={tmp_path}', f'--out_dir={tmp_path / "o"}'], capsys)
    assert code == 1 and 'fewer tokens than block_size 32' in out.err


def test_script_exits_non_zero_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--n_layer=x'],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().count('\n') == 0 and 'n_layer' in result.stderr
