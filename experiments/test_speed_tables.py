"""experiments/speed_tables.py: each measurement in its own bench.py process, announced before it runs, each row
with its numbers; a measurement that fails ends in one sentence."""

import json
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'experiments')]
import speed_tables  # noqa: E402


def one_error(err):
    """The error sentence, after checking that it is the only one, the last thing written, and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and err.endswith(errors[0] + '\n') and 'Traceback' not in err, err
    return errors[0]


FAKE_RESULT = {'device': 'cpu', 'threads': 1, 'parameters': 10 ** 6, 'tokens_per_step': 1024, 'compile': False,
               'dtype': 'float32', 'warmup_seconds': 1.0, 'ms_per_step': 10.0, 'tokens_per_sec': 1e5, 'mfu': 0.1,
               'peak_source': 'measured float32 matmul', 'peak_memory_bytes': 2 ** 20,
               'peak_memory_source': 'process max RSS'}


@pytest.mark.parametrize('argv, first, count', [
    (['cpu'], 'measuring small: Llama 12 x 128, 16 x 64 tokens, compile=False', 4 + 5 * 6 + 5 * 2),
    (['paper'], 'measuring 71M', 5),
])
def test_each_measurement_of_a_table_is_announced_before_it_runs(capsys, monkeypatch, argv, first, count):
    """Every measurement's process starts after a line saying what it measures (the processes are stand-ins)."""
    said = []

    def measured(command, **kwargs):
        said.append(capsys.readouterr().err)  # what the user has seen when this process starts
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps(FAKE_RESULT) + '\n', stderr='')
    monkeypatch.setattr(speed_tables.subprocess, 'run', measured)
    assert speed_tables.main(argv) == 0
    assert len(said) == count and said[0].splitlines()[-1].startswith(first), said[0]
    assert all(err.splitlines()[-1].startswith('measuring ') for err in said), said
    if argv == ['cpu']:
        assert said[4].splitlines()[-1].startswith('measuring norm_scheme=pre, --compile=False, round 1 of 5')


def test_a_paper_config_announced_and_measured_for_real(tmp_path, capfd):
    shrink = ['--device=cpu', '--dtype=float32', '--compile=False', '--n_layer=2', '--n_head=2', '--n_kv_head=2',
              '--n_embd=32', '--batch_size=2', '--block_size=16', '--vocab_size=128']
    speed_tables.paper_table(configs={'130M': ['config/llama_130m_lns.py']}, extra=shrink, steps=1, warmup=1)
    lines = capfd.readouterr().err.splitlines()
    result = next(i for i, line in enumerate(lines) if line.startswith('130M: ') and line.endswith(' ms/step'))
    assert lines.index('measuring 130M (1 warm-up and 1 timed steps)') < result, lines


def test_a_measurement_that_fails_ends_in_one_sentence(capsys, monkeypatch):
    monkeypatch.setattr(speed_tables.subprocess, 'run', lambda command, **kwargs: subprocess.CompletedProcess(
        command, 1, stdout='', stderr='Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory'))
    assert speed_tables.main(['paper']) == 1
    error = one_error(capsys.readouterr().err)
    assert 'measuring 71M failed (torch.OutOfMemoryError: CUDA out of memory)' in error, error
    assert 'run python bench.py' in error and 'llama_71m_lns.py' in error, error


def test_the_paper_benchmark_table_runs_each_config_in_its_own_process(tmp_path):
    """The GPU check's benchmark, on the CPU with the configs shrunk: every config a row, each with its numbers."""
    shrink = ['--device=cpu', '--dtype=float32', '--compile=False', '--n_layer=2', '--n_head=2', '--n_kv_head=2',
              '--n_embd=32', '--batch_size=2', '--block_size=16', '--vocab_size=128']
    configs = {'130M': ['config/llama_130m_lns.py'], '1B (ffn 5504)': ['config/llama_1b_lns.py', '--ffn_hidden=48']}
    text = speed_tables.paper_table(tmp_path / 'paper.json', configs=configs, extra=shrink, steps=1, warmup=1)
    rows = json.loads((tmp_path / 'paper.json').read_text())['configs']
    assert [row['config'] for row in rows] == ['130M', '1B (ffn 5504)']
    assert all(row['ms_per_step'] > 0 and row['tokens_per_step'] == 32 for row in rows)
    assert '| 1B (ffn 5504) |' in text and 'measured float32 matmul' in text



@pytest.mark.slow
def test_bench_table_has_every_config_compiled_and_not_and_every_scheme(tmp_path):
    tiny = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=2', '--device=cpu',
            '--dataset=none']
    text = speed_tables.table(tmp_path / 'table.json', configs={'tiny': tiny}, rounds=1, steps=2, warmup=1)
    report = json.loads((tmp_path / 'table.json').read_text())
    assert [(row['config'], row['compile']) for row in report['configs']] == [('tiny', False), ('tiny', True)]
    assert set(report['scheme_overhead']) == {'pre', 'lns', 'post', 'mix', 'deepnorm', 'peri'}
    assert report['scheme_overhead']['pre'] == 0.0 and '| lns |' in text and 'measured float32 matmul' in text
