"""
Steady-state training speed of a config: ms per step, tokens/s, MFU and peak memory, compile warm-up excluded.

    python bench.py [config/file.py ...] [--key=value ...] [--steps=20] [--warmup=5]
    python bench.py --n_layer=12 --n_embd=128 --compile=True
    python bench.py --table [--json FILE]     # experiments/README.md's table: two configs, eager and compiled,
                                              # every scheme
    python bench.py --paper [--json FILE]     # on a GPU: the paper configs at their per-GPU micro-batch
    python bench.py --memory                  # estimated memory per GPU of each paper config at 1-16 GPUs

Takes train.py's settings (batch_size, block_size, gradient_accumulation_steps, model knobs, device, dtype,
compile) and times full optimizer steps on random tokens, so no dataset is needed (its vocabulary size is used
when it is prepared, else GPT-2's 50,304). MFU is measured against the
GPU's datasheet peak (configurator.PEAK_FLOPS) or, on a CPU, against the float32 matmul rate measured here first.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import configurator
import dataloader
import train
from model import GPT, GPTConfig, NORM_SCHEMES

# the configs of experiments/README.md's table: the default training run, and a wider model with longer sequences
TABLE_CONFIGS = {
    'small: Llama 12 x 128, 16 x 64 tokens': [],
    'medium: Llama 12 x 384, 8 x 256 tokens': ['--n_embd=384', '--n_head=6', '--block_size=256', '--batch_size=8'],
}


def measured_matmul_flops(device, size=2048, repeats=10):
    """The best FLOP/s of a large float32 matmul over a few tries on this device: a practical peak for CPUs."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device.type == 'cuda':
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def split_bench_args(argv):
    """(steps, warmup, the rest for train.parse_config)."""
    values, rest = {'steps': 20, 'warmup': 5}, []
    for arg in argv:
        key, _, raw = arg[2:].partition('=') if arg.startswith('--') else ('', '', '')
        if key in values:
            if not raw.isdigit() or int(raw) < 1:
                raise configurator.UserError(f"--{key} expects a positive int, got {raw!r}")
            values[key] = int(raw)
        else:
            rest.append(arg)
    return values['steps'], values['warmup'], rest


def bench(cfg, steps, warmup):
    """Times `steps` training steps of cfg's model after `warmup` more; the result as a dict (see main)."""
    device = configurator.resolve_device(cfg.device)
    cfg = train.resolve_batch(cfg, world_size=1)  # one process: a global batch runs as its micro-steps
    model, step = training_step_on_random_tokens(cfg, device)
    warmup_start = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_seconds = time.perf_counter() - warmup_start
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds_per_step = (time.perf_counter() - start) / steps
    return report(cfg, model, device, warmup_seconds, seconds_per_step)


def training_step_on_random_tokens(cfg, device):
    """(model, step): the model cfg describes, built as train.py builds it, and a function that runs one optimizer
    step on fixed random tokens, as train.py's loop does it (tests/test_gpu_path.py checks that the two agree), and
    waits for the device."""
    try:  # the dataset's vocabulary when it is prepared, else GPT-2's padded one
        data_dir = dataloader.resolve_data_dir(cfg.data_dir, cfg.dataset)
        vocab_size = dataloader.read_meta(data_dir, cfg.dataset)['vocab_size']
    except configurator.UserError:
        vocab_size = GPTConfig.vocab_size
    config = train.model_config(cfg, vocab_size)
    torch.manual_seed(cfg.seed)
    model, optimizer, autocast, scaler = train.build_model(cfg, config, device)
    train_model = train.wrap_for_training(model, cfg, configurator.Distributed(), device)  # compiled as in training
    batches = [torch.randint(0, config.vocab_size, (cfg.batch_size, cfg.block_size + 1), device=device)
               for _ in range(cfg.gradient_accumulation_steps)]

    def step():
        loss = optimizer_step(train_model, model, optimizer, scaler, autocast,
                              [(batch[:, :-1], batch[:, 1:]) for batch in batches], cfg.grad_clip)
        return loss.item()  # waits for the device
    return model, step


def optimizer_step(train_model, model, optimizer, scaler, autocast, micro_batches, grad_clip):
    """The work of one step of train.py's loop in one process: forward and backward per micro-batch, clip, update;
    the last micro-batch's loss."""
    for x, y in micro_batches:
        with autocast:
            _, loss = train_model(x, y, return_logits=False)
        scaler.scale(loss / len(micro_batches)).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        train.clip_gradients(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=False)
    return loss


def report(cfg, model, device, warmup_seconds, seconds_per_step):
    device_name, peak = configurator.peak_flops(device, cfg.dtype)
    peak_source = f"datasheet {'TF32' if cfg.dtype == 'float32' else '16-bit'} peak"
    if peak is None:
        peak, peak_source = measured_matmul_flops(device), 'measured float32 matmul'
    tokens_per_step = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    flops_per_step = model.flops_per_token(cfg.block_size) * tokens_per_step
    memory = (torch.cuda.max_memory_allocated(device) if device.type == 'cuda'
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
    config = model.config
    return {
        'device': device_name, 'threads': torch.get_num_threads(), 'arch': config.arch,
        'norm_scheme': config.norm_scheme, 'n_layer': config.n_layer, 'n_embd': config.n_embd,
        'parameters': model.num_params(), 'tokens_per_step': tokens_per_step, 'compile': cfg.compile,
        'compile_mode': cfg.compile_mode,
        'dtype': cfg.dtype, 'warmup_seconds': warmup_seconds, 'ms_per_step': 1000 * seconds_per_step,
        'tokens_per_sec': tokens_per_step / seconds_per_step,
        'mfu': flops_per_step / seconds_per_step / peak, 'peak_flops': peak, 'peak_source': peak_source,
        'peak_memory_bytes': memory,
        'peak_memory_source': 'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'process max RSS',
    }


def measure(args, steps, warmup, label):
    """bench.py's JSON result for args, measured in a fresh process (so peak memory is this config's own); the
    label, said first, tells the user of a table that takes minutes what is being measured."""
    print(f"measuring {label} ({warmup} warm-up and {steps} timed steps)", file=sys.stderr, flush=True)
    command = [sys.executable, os.path.abspath(__file__), *args, f'--steps={steps}', f'--warmup={warmup}']
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        last_line = (result.stderr.strip().splitlines() or ['no output'])[-1]
        raise configurator.UserError(f"measuring {label} failed ({last_line}); run python bench.py "
                                     f"{' '.join(args)} to see the whole output")
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
        args = [os.path.join(os.path.dirname(os.path.abspath(__file__)), a) if a.endswith('.py') else a for a in args]
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


def saved_activation_bytes(cfg, rows, return_residuals=False):
    """Bytes of the activations that the backward pass keeps for a micro-batch of `rows` sequences of cfg's model
    in bf16, run eagerly (as the training step, or with return_residuals as the depth diagnostics): counted on the
    meta device, where tensors have shapes but no memory."""
    with torch.device('meta'):
        model = GPT(train.model_config(cfg, None)).to(torch.bfloat16)
    parameters = {id(p) for p in model.parameters()}
    saved = {}

    def pack(tensor):  # the weights are saved for the backward too, but they exist anyway
        if id(tensor) not in parameters and id(tensor._base) not in parameters:
            saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor
    x = torch.zeros(rows, cfg.block_size, dtype=torch.long, device='meta')
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, x, return_residuals=return_residuals, return_logits=False)
    return sum(saved.values())


MEMORY_SIZES = ['71m', '130m', '250m', '350m', '1b']


def memory_table(processes=(1, 2, 4, 8, 16)):
    """An estimate of each paper config's memory per GPU at each process count, without running anything: its
    micro-batch (resolve_batch) and, in pure bf16, 8 bytes per parameter (weights, gradients, Adam's two moments)
    plus the activations an eager micro-step keeps for the backward. Compiled runs fuse and keep less; the
    transient buffers of the backward and the allocator's slack come on top."""
    lines = ['| config | parameters | ' + ' | '.join(f'{n} GPU{"s" * (n > 1)}' for n in processes) + ' |',
             '| --- | --- |' + ' --- |' * len(processes)]
    for size in MEMORY_SIZES:
        cfg = train.parse_config([os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config',
                                               f'llama_{size}_lns.py')])
        with torch.device('meta'):
            parameters = GPT(train.model_config(cfg, None)).num_params()
        cells = []
        for n in processes:
            share = train.resolve_batch(cfg, n)
            gib = (8 * parameters + saved_activation_bytes(share, share.batch_size)) / 2 ** 30
            cells.append(f"{share.batch_size} x {share.gradient_accumulation_steps // n}: {gib:.1f} GiB")
        lines.append(f"| {size.upper()} | {parameters / 1e6:,.0f}M | " + ' | '.join(cells) + ' |')
    lines += ['', 'micro-batch x micro-steps per GPU: estimated GiB per GPU (pure bf16, eager, not measured)']
    return '\n'.join(lines)


def write_json(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(data, f, indent=1)


def run(argv):
    if argv and argv[0] == '--paper':
        if argv[1:] and not (len(argv) == 3 and argv[1] == '--json'):
            raise configurator.UserError("--paper takes only --json FILE")
        print(paper_table(argv[2] if len(argv) == 3 else None))
        return
    if '--memory' in argv:
        if argv != ['--memory']:
            raise configurator.UserError("--memory takes no other argument: it estimates every paper config at 1 to "
                                         "16 GPUs without running one; run python bench.py --memory")
        print(memory_table())
        return
    if argv and argv[0] == '--table':
        if argv[1:] and not (len(argv) == 3 and argv[1] == '--json'):
            raise configurator.UserError("--table takes only --json FILE")
        print(table(argv[2] if len(argv) == 3 else None))
        return
    steps, warmup, rest = split_bench_args(argv)
    result = bench(train.parse_config(rest), steps, warmup)
    print(f"{result['arch']} {result['norm_scheme']}, {result['n_layer']} x {result['n_embd']}, "
          f"{result['parameters']:,} parameters, {result['dtype']}, compile={result['compile']}, on "
          f"{result['device']} ({result['threads']} threads): {result['ms_per_step']:.1f} ms/step, "
          f"{result['tokens_per_sec']:,.0f} tokens/s, MFU {result['mfu']:.1%} of the {result['peak_source']} "
          f"({result['peak_flops'] / 1e12:.2f} TFLOP/s), peak memory {result['peak_memory_bytes'] / 2**20:,.0f} MiB "
          f"({result['peak_memory_source']}); warm-up {result['warmup_seconds']:.1f} s")
    print(json.dumps(result))


def usage():
    return f"usage: python bench.py [config/file.py ...] [--key=value ...] [--steps=N] [--warmup=N]\n{__doc__}"


def main(argv):
    return configurator.run_main(run, argv, usage)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
