"""
The speed tables of experiments/README.md, each row one bench.py measurement in its own process (so that its peak
memory is its own), each announced before it runs:

    python experiments/speed_tables.py cpu [--json FILE]     # two configs, eager and compiled, then every
                                                             # norm_scheme's step time relative to pre
    python experiments/speed_tables.py paper [--json FILE]   # on a GPU: the paper configs at their per-GPU
                                                             # micro-batch
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BENCH = os.path.join(ROOT, 'bench.py')

from configurator import UserError, run_main  # noqa: E402 (after the project's folder is on the path)
from model import NORM_SCHEMES  # noqa: E402

# the configs of experiments/README.md's table: the default training run, and a wider model with longer sequences
TABLE_CONFIGS = {
    'small: Llama 12 x 128, 16 x 64 tokens': [],
    'medium: Llama 12 x 384, 8 x 256 tokens': ['--n_embd=384', '--n_head=6', '--block_size=256', '--batch_size=8'],
}


def measure(args, steps, warmup, label):
    """bench.py's JSON result for args, measured in a fresh process (so peak memory is this config's own); the
    label, said first, tells the user of a table that takes minutes what is being measured."""
    print(f"measuring {label} ({warmup} warm-up and {steps} timed steps)", file=sys.stderr, flush=True)
    command = [sys.executable, BENCH, *args, f'--steps={steps}', f'--warmup={warmup}']
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        last_line = (result.stderr.strip().splitlines() or ['no output'])[-1]
        raise UserError(f"measuring {label} failed ({last_line}); run python bench.py {' '.join(args)} to see the "
                        f"whole output")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(json_path=None, configs=TABLE_CONFIGS, rounds=5, steps=30, warmup=5):
    """The benchmark table: each config eager and compiled; then, on the first config, every norm_scheme's step
    time relative to pre, eager, and LNS's relative to pre, compiled."""
    rows = []
    for name, args in configs.items():
        for compiled in (False, True):
            result = measure(args + [f'--compile={compiled}'], steps, warmup, f"{name}, compile={compiled}")
            rows.append({'config': name, **result})
    first_config = next(iter(configs.values()))
    eager = interleaved_medians(first_config + ['--compile=False'], NORM_SCHEMES, rounds, steps, warmup)
    compiled = interleaved_medians(first_config + ['--compile=True'], ('pre', 'lns'), rounds, steps, warmup)
    overhead = {scheme: eager[scheme] / eager['pre'] - 1 for scheme in NORM_SCHEMES}
    lns_compiled = compiled['lns'] / compiled['pre'] - 1

    lines = ['| config | compile | ms/step | tokens/s | MFU | peak memory |', '| --- | --- | --- | --- | --- | --- |']
    for row in rows:
        lines.append(f"| {row['config']} | {row['compile']} | {row['ms_per_step']:.1f} | "
                     f"{row['tokens_per_sec']:,.0f} | {row['mfu']:.1%} | {row['peak_memory_bytes'] / 2**20:,.0f} MiB |")
    lines += ['', f'| norm_scheme | eager ms/step (median of {rounds}) | relative to pre | compiled ms/step | '
                  f'relative to pre |', '| --- | --- | --- | --- | --- |']
    for scheme in NORM_SCHEMES:
        cells = (f"{compiled[scheme]:.1f} | {compiled[scheme] / compiled['pre'] - 1:+.1%}" if scheme in compiled
                 else '| ')
        lines.append(f"| {scheme} | {eager[scheme]:.1f} | {overhead[scheme]:+.1%} | {cells} |")
    first = rows[0]
    lines += ['', f"{first['device']}, {first['threads']} threads, float32; MFU against the {first['peak_source']} "
                  f"rate; peak memory is {first['peak_memory_source']}."]
    if json_path:
        write_json(json_path, {'configs': rows, 'scheme_ms_per_step': eager, 'scheme_overhead': overhead,
                               'compiled_ms_per_step': compiled, 'lns_overhead_compiled': lns_compiled})
    return '\n'.join(lines)


def interleaved_medians(args, schemes, rounds, steps, warmup):
    """Median ms/step of each norm_scheme on args over `rounds` rounds, the schemes interleaved within each round,
    so that drifts of the machine fall on all of them alike."""
    times = {scheme: [] for scheme in schemes}
    for number in range(1, rounds + 1):
        for scheme in schemes:
            label = f"norm_scheme={scheme}, {' '.join(args)}, round {number} of {rounds}"
            times[scheme].append(measure(args + [f'--norm_scheme={scheme}'], steps, warmup, label)['ms_per_step'])
    return {scheme: statistics.median(values) for scheme, values in times.items()}


# the paper configs at their per-GPU micro-batch (one micro-step), compiled, bf16; the 1B twice, since its FFN
# width 5461 (the paper's) gives matrices whose bf16 rows are not 16-byte aligned, and 5504 (a multiple of 64) does
PAPER_CONFIGS = {
    '71M': ['config/llama_71m_lns.py'],
    '130M': ['config/llama_130m_lns.py'],
    '350M': ['config/llama_350m_lns.py'],
    '1B (ffn 5461)': ['config/llama_1b_lns.py'],
    '1B (ffn 5504)': ['config/llama_1b_lns.py', '--ffn_hidden=5504'],
}


def paper_table(json_path=None, configs=PAPER_CONFIGS, extra=(), steps=10, warmup=3):
    """Step time, throughput, MFU and peak memory of each paper config on this machine's device, one process
    per config; `extra` overrides go after each config (tests shrink the models with them)."""
    rows = []
    for name, args in configs.items():
        args = [os.path.join(ROOT, a) if a.endswith('.py') else a for a in args]
        one_micro_step = ['--global_batch_size=None', '--gradient_accumulation_steps=1']
        result = measure(args + one_micro_step + list(extra), steps, warmup, name)
        rows.append({'config': name, **result})
        print(f"{name}: {result['ms_per_step']:.1f} ms/step", file=sys.stderr, flush=True)
    lines = ['| config | parameters | micro-batch (tokens) | ms/step | tokens/s | MFU | peak memory | warm-up |',
             '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for row in rows:
        lines.append(f"| {row['config']} | {row['parameters'] / 1e6:,.0f}M | {row['tokens_per_step']:,} | "
                     f"{row['ms_per_step']:.1f} | {row['tokens_per_sec']:,.0f} | {row['mfu']:.1%} | "
                     f"{row['peak_memory_bytes'] / 2**30:.1f} GiB | {row['warmup_seconds']:.0f} s |")
    first = rows[0]
    lines += ['', f"{first['device']}, {first['dtype']}, compile={first['compile']}; MFU against the "
                  f"{first['peak_source']}; peak memory is {first['peak_memory_source']}."]
    if json_path:
        write_json(json_path, {'configs': rows})
    return '\n'.join(lines)


def write_json(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(data, f, indent=1)


def run(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('table', choices=['cpu', 'paper'])
    parser.add_argument('--json', help='also write the measurements to this file')
    args = parser.parse_args(argv)
    print((table if args.table == 'cpu' else paper_table)(args.json))


def main(argv):
    return run_main(run, argv)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
