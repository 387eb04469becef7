"""
Steady-state training speed of a config: ms per step, tokens/s, MFU and peak memory, compile warm-up excluded.

    python bench.py [config/file.py ...] [--key=value ...] [--steps=20] [--warmup=5]
    python bench.py --n_layer=12 --n_embd=128 --compile=True
    python bench.py --memory          # estimated memory per GPU of each paper config at 1-16 GPUs

Takes train.py's settings and runs train.py's own loop (train.train) for warmup + steps optimizer steps, one process,
on random tokens in a temporary folder, so no dataset is needed (its vocabulary size is used when it is prepared,
else GPT-2's 50,304); the trainer's lines go to stderr. The speed is the mean of the timed steps' log records, each
step timed alone. MFU is measured against the GPU's datasheet peak (configurator.PEAK_FLOPS) or, on a CPU, against
the float32 matmul rate measured here first. Peak memory is the run's: on a GPU the allocator's peak (its two
one-sequence evaluations included), on a CPU the process's largest resident size. The tables of experiments/README.md
are made by experiments/speed_tables.py from these measurements.
"""

import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

import checkpoint
import configurator
import dataloader
import train
from model import GPT, GPTConfig

BENCH_TYPES = {'steps': int, 'warmup': int}  # bench.py's own settings, beside train.py's


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


def write_random_tokens(folder, cfg):
    """A prepared dataset of random tokens in folder, enough for any batch, in the model's vocabulary: cfg's
    vocab_size, else that of cfg's dataset when it is prepared, else GPT-2's padded one."""
    vocab_size = cfg.model.get('vocab_size')
    try:
        vocab_size = vocab_size or dataloader.read_meta(dataloader.resolve_data_dir(cfg.data_dir, cfg.dataset),
                                                        cfg.dataset)['vocab_size']
    except configurator.UserError:
        vocab_size = GPTConfig.vocab_size
    generator = np.random.default_rng(0)
    for split, count in (('train', max(1 << 20, 4 * cfg.block_size * cfg.batch_size)), ('val', 4 * cfg.block_size)):
        generator.integers(0, vocab_size, count, dtype=np.uint16).tofile(os.path.join(folder, f'{split}.bin'))
    with open(os.path.join(folder, 'meta.json'), 'w') as f:
        json.dump({'vocab_size': vocab_size, 'tokenizer': 'random'}, f)
    return vocab_size


def bench(cfg, steps, warmup):
    """Times `steps` optimizer steps of train.py's loop on cfg after `warmup` more; the result as a dict (see run)."""
    device, cfg = configurator.resolve_device(cfg.device), train.resolve_batch(cfg, 1)  # one process
    # in memory where Linux offers it: the run's one save (8 GB for the 1B model) then costs seconds, not tens
    with tempfile.TemporaryDirectory(dir='/dev/shm' if os.path.isdir('/dev/shm') else None) as folder:
        vocab_size = write_random_tokens(folder, cfg)
        out_dir = os.path.join(folder, 'run')
        # every step logged (each timed alone); one evaluation sequence at the start and the end, one save at the end
        run = replace(cfg, data_dir=folder, out_dir=out_dir, init_from='scratch', overwrite=False,
                      max_iters=warmup + steps, log_interval=1, eval_interval=warmup + steps, eval_sequences=1,
                      eval_tokens=0, checkpoint_interval=None, always_save_checkpoint=True, keep_last_n=0,
                      wandb_log=False)
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            train.train(run, configurator.Distributed(), device)
        seconds = time.perf_counter() - start
        records = [r for r in checkpoint.read_log(os.path.join(out_dir, 'log.jsonl'))
                   if 'ms_per_iter' in r and r['iter'] > warmup]
    with torch.device('meta'):  # the model's size and FLOPs only: no second copy of its weights
        model = GPT(train.model_config(cfg, vocab_size))
    seconds_per_step = sum(r['ms_per_iter'] for r in records) / len(records) / 1000
    memory = (records[-1]['peak_memory_gib'] * 2 ** 30 if device.type == 'cuda'
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
    return report(cfg, model, device, seconds - steps * seconds_per_step, seconds_per_step, memory)


def report(cfg, model, device, warmup_seconds, seconds_per_step, memory):
    device_name, peak = configurator.peak_flops(device, cfg.dtype)
    peak_source = f"datasheet {'TF32' if cfg.dtype == 'float32' else '16-bit'} peak"
    if peak is None:
        peak, peak_source = measured_matmul_flops(device), 'measured float32 matmul'
    tokens_per_step = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    flops_per_step = model.flops_per_token(cfg.block_size) * tokens_per_step
    config = model.config
    return {
        'device': device_name, 'threads': torch.get_num_threads(), 'arch': config.arch,
        'norm_scheme': config.norm_scheme, 'n_layer': config.n_layer, 'n_embd': config.n_embd,
        'parameters': model.num_params(), 'tokens_per_step': tokens_per_step, 'compile': cfg.compile,
        'compile_mode': cfg.compile_mode, 'dtype': cfg.dtype,
        'warmup_seconds': warmup_seconds,  # all but the timed steps: start-up, compilation, warm-up, evaluations, save
        'ms_per_step': 1000 * seconds_per_step, 'tokens_per_sec': tokens_per_step / seconds_per_step,
        'mfu': flops_per_step / seconds_per_step / peak, 'peak_flops': peak, 'peak_source': peak_source,
        'peak_memory_bytes': memory,
        'peak_memory_source': 'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'process max RSS',
    }


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


def run(argv):
    if '--memory' in argv:
        if argv != ['--memory']:
            raise configurator.UserError("--memory takes no other argument: it estimates every paper config at 1 to "
                                         "16 GPUs without running one; run python bench.py --memory")
        print(memory_table())
        return
    values = configurator.read_settings(argv, {**train.SETTING_TYPES, **BENCH_TYPES}, example='--steps=20')
    steps, warmup = values.pop('steps', 20), values.pop('warmup', 5)
    for key, value in (('steps', steps), ('warmup', warmup)):
        if value < 1:
            raise configurator.UserError(f"--{key} expects a positive int, got {value}")
    result = bench(train.checked_config(values), steps, warmup)
    print(f"{result['arch']} {result['norm_scheme']}, {result['n_layer']} x {result['n_embd']}, "
          f"{result['parameters']:,} parameters, {result['dtype']}, compile={result['compile']}, on "
          f"{result['device']} ({result['threads']} threads): {result['ms_per_step']:.1f} ms/step, "
          f"{result['tokens_per_sec']:,.0f} tokens/s, MFU {result['mfu']:.1%} of the {result['peak_source']} "
          f"({result['peak_flops'] / 1e12:.2f} TFLOP/s), peak memory {result['peak_memory_bytes'] / 2**20:,.0f} MiB "
          f"({result['peak_memory_source']}); the rest of the run {result['warmup_seconds']:.1f} s")
    print(json.dumps(result))


def usage():
    return (f"usage: python bench.py [config/file.py ...] [--key=value ...] [--steps=N] [--warmup=N]\n"
            f"       python bench.py --memory\n{__doc__}")


def main(argv):
    return configurator.run_main(run, argv, usage)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
