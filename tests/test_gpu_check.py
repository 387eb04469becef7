"""experiments/gpu_check.sh, the one prepared call a lent GPU gets: its parts in the order of what decides most,
each with its time within the budget, run here with stand-ins for the commands that need a GPU; and the comparison
of a stopped-and-resumed run with a straight one that its resume part prints."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'experiments'))
import gpu_rank_check  # noqa: E402

BUDGET = 470  # GPU_CHECK_SECONDS' default
# (part, its time limit): those that must fit the budget, in order, then the rest
DECISIVE = [('tests_core', 110), ('resume_pair', 90), ('rank_train', 100), ('rank_resume', 60), ('bench_350m', 40),
            ('bench_1b_ffn5461', 35), ('bench_1b_ffn5504', 35)]
REST = [('bench_350m_autotune', 150), ('bench_350m_chunked_loss', 60), ('bench_130m', 60), ('bench_71m', 60),
        ('tests_rest', 120)]


def run_check(tmp_path, budget=BUDGET, seconds_per_part=0):
    """gpu_check.sh with stand-ins first on PATH: `timeout` records each part's limit and command instead of running
    it (and takes seconds_per_part), `nvidia-smi` names a GPU, `python -c` passes the CUDA check (other python runs
    for real); (calls, the finished process, parts.txt lines)."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    stand_ins = {'timeout': f'shift\necho "$*" | tr "\\n" " " >> "$CALLS"\necho >> "$CALLS"\nsleep {seconds_per_part}\n',
                 'nvidia-smi': 'echo "NVIDIA H100 80GB HBM3, 81559 MiB, 550.54"\n',
                 'python': f'[ "$1" = -c ] && exit 0\nexec {sys.executable} "$@"\n'}
    for name, body in stand_ins.items():
        (bin_dir / name).write_text('#!/bin/sh\n' + body)
        (bin_dir / name).chmod(0o755)
    report = tmp_path / 'report'
    env = {**os.environ, 'PATH': f"{bin_dir}:{os.environ['PATH']}", 'CALLS': str(tmp_path / 'calls'),
           'GPU_CHECK_SECONDS': str(budget)}
    result = subprocess.run(['bash', os.path.join(ROOT, 'experiments', 'gpu_check.sh'), str(report)], env=env,
                            capture_output=True, text=True, timeout=120)
    calls = (tmp_path / 'calls').read_text().splitlines() if (tmp_path / 'calls').exists() else []
    return calls, result, (report / 'parts.txt').read_text().splitlines()


def test_the_parts_run_in_the_order_of_what_decides_most_each_within_the_budget(tmp_path):
    calls, result, parts = run_check(tmp_path)
    assert [line.split(':')[0] for line in parts] == [name for name, _ in DECISIVE + REST], result.stdout
    assert sum(limit for _, limit in DECISIVE) <= BUDGET
    limits = [int(call.split()[0]) for call in calls]
    assert limits == [limit for _, limit in DECISIVE + REST]  # nothing cut: no time passes with the stand-ins
    commands = [call.split(maxsplit=1)[1] for call in calls]
    assert commands[0].startswith('python -m pytest') and "synchronizes or ddp or resume" in result.stdout
    assert 'config/llama_71m_lns.py' in commands[1] and 'init_from=resume' in commands[1]  # the paper's dtype
    assert 'config/llama_350m_lns.py' in commands[4] and '--batch_size=64' in result.stdout
    assert '--ffn_hidden=5504' in result.stdout.split('== bench_1b_ffn5504')[1].splitlines()[0]


def test_a_part_that_would_pass_the_deadline_is_cut_to_the_time_left_and_the_rest_skipped(tmp_path):
    calls, result, parts = run_check(tmp_path, budget=27, seconds_per_part=4)
    limits = [int(call.split()[0]) for call in calls]
    assert len(limits) == 2 and 20 <= limits[1] < limits[0] <= 27  # each cut to what is left of the 27 s
    assert all('skipped: no time left' in line for line in parts[2:]) and len(parts) == len(DECISIVE + REST)
    assert result.returncode == 0  # skipped parts are not failures; a part that fails or times out is


def test_the_resume_pair_passes_an_exact_resume_and_fails_a_resume_that_drifts(tmp_path, char_data):
    argv = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_sequences=8',
            '--device=cpu', f'--data_dir={char_data}', '--max_iters=6', '--eval_interval=3', '--log_interval=1',
            '--keep_last_n=1']
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    assert train.main(argv + [f'--out_dir={straight}']) == 0
    resumed.mkdir()
    shutil.copy(straight / 'ckpt-0000003.pt', resumed / 'ckpt.pt')
    shutil.copy(straight / 'log.jsonl', resumed / 'log.jsonl')
    assert train.main([f'--out_dir={resumed}', '--init_from=resume', '--device=cpu']) == 0
    lines, problems = gpu_rank_check.pair(str(straight), str(resumed), resumed_at=3, last=6)
    assert problems == [] and 'within 0.0e+00 (relative)' in lines[0]
    checkpoint = torch.load(resumed / 'ckpt.pt', weights_only=True)
    checkpoint['model']['tok_emb.weight'] *= 1.01
    torch.save(checkpoint, resumed / 'ckpt.pt')
    lines, problems = gpu_rank_check.pair(str(straight), str(resumed), resumed_at=3, last=6)
    assert len(problems) == 1 and 'weights' in problems[0]


@pytest.mark.parametrize('missing', ['straight', 'resumed'])
def test_the_resume_pair_names_a_run_that_left_no_log(tmp_path, missing):
    for name in ('straight', 'resumed'):
        (tmp_path / name).mkdir()
    (tmp_path / ('resumed' if missing == 'straight' else 'straight') / 'log.jsonl').write_text('')
    _, problems = gpu_rank_check.pair(str(tmp_path / 'straight'), str(tmp_path / 'resumed'), 3, 6)
    assert problems and f'no log at {tmp_path / missing}' in problems[0]
