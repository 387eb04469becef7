"""
Trains a GPT or Llama model (model.py) on a prepared token dataset (data/<dataset>/train.bin, val.bin).

    python train.py                                   # small deep Llama with LNS on shakespeare_char, CPU, ~5 min
    python train.py config/some_config.py --key=value # a config file, then overrides, applied in order
    torchrun --standalone --nproc_per_node=8 train.py config/llama_350m_lns.py   # DDP on 8 GPUs

From the top: the settings (TrainConfig; the model's are model.GPTConfig's, set by name the same way), the set-up,
get_lr, the loop (evaluate, save, one optimizer step, log) and the evaluation it calls. Beside it: dataloader.py (the
data, its batches), checkpoint.py (the run folder), configurator.py (settings and their checks, processes, devices).
"""

import math
import os
import sys
import textwrap
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional, get_type_hints

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (CheckpointWriter, append_log, check_same_data, delete_run, gather_rng_states,
                        load_resume_checkpoint, out_dir_problem, restore_state, run_lock)
from configurator import (UserError, all_reduce, check_train_settings, from_rank_0, mixed_precision, peak_flops,
                          read_settings, resumed_settings, run_main, settings_usage, setup_distributed,
                          synchronize)
from dataloader import (TokenData, authors_estimate, check_data, check_same_data_on_every_rank, data_fingerprint,
                        read_meta, resolve_batch, resolve_data_dir, train_batches)
from model import GPT, GPTConfig


@dataclass
class TrainConfig:
    # output and logging
    out_dir: str = 'out'                   # ckpt.pt and log.jsonl go here
    eval_interval: int = 250               # evaluate every this many iterations, and at the end
    eval_sequences: int = 640              # sequences per split in each evaluation, evenly spaced over the split:
                                           # the same tokens for every seed, process count and micro-batch
    eval_tokens: int = 0                   # rows layout: evaluate on validation rows until more than this many
                                           # non-pad tokens (the authors' rule; 0: eval_sequences rows)
    authors_eval_gpus: int = 1             # the authors' estimator as their GPUs and per-GPU batch (None:
    authors_eval_batch_size: Optional[int] = None  # batch_size) computed it: dataloader.TokenData.eval_batches
    log_interval: int = 25                 # print and log the training loss every this many iterations
    checkpoint_interval: Optional[int] = None  # save ckpt.pt every this many iterations (None: eval_interval) and
                                           # at the end; written in the background, training waits only for a copy
    always_save_checkpoint: bool = True    # False: save only at evaluations where the validation loss improves
    init_from: str = 'scratch'             # 'scratch' or 'resume': out_dir/ckpt.pt's run goes on with its own
                                           # settings, but LAUNCH's below and those a --key=value names
    overwrite: bool = False                # a new run into an out_dir holding one deletes that one; else refused
    wandb_log: bool = False
    wandb_project: str = 'curse-of-depth'
    wandb_run_name: str = 'run'
    # data
    dataset: str = 'shakespeare_char'      # a folder under data/ made by its prepare.py
    data_dir: str = ''                     # '' means data/<dataset> beside this file
    batch_size: int = 16                   # sequences per micro-step; with global_batch_size, the most a process
                                           # runs at once (what fits its GPU): dataloader.resolve_batch
    block_size: int = 64                   # tokens per sequence (the model's block_size too)
    global_batch_size: Optional[int] = None  # sequences per optimizer step over all processes, whatever their
                                           # number (the paper's: 512); None: batch_size x gradient_accumulation_steps
    gradient_accumulation_steps: int = 1   # without global_batch_size: micro-steps per optimizer step, all processes
                                           # together (torchrun divides them, as nanoGPT's)
    # the model: the settings of model.GPTConfig given, each by name like any other setting (--n_layer=24); the
    # rest take GPTConfig's defaults (a small deep Llama with LNS); vocab_size unset or None: the dataset's
    model: dict = field(default_factory=dict)
    # AdamW
    learning_rate: float = 2e-3            # peak learning rate
    max_iters: int = 1500                  # optimizer steps in all
    weight_decay: float = 0.1              # on matrices and embeddings only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                 # clip the global gradient norm to this; 0 disables
    # learning-rate schedule: linear warmup, then cosine decay to min_lr
    decay_lr: bool = True                  # False: constant learning_rate
    warmup_iters: int = 100
    lr_decay_iters: Optional[int] = None   # None: max_iters
    min_lr: float = 2e-4                   # the floor; commonly learning_rate / 10
    # system
    device: str = 'auto'                   # 'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...
    dtype: str = 'float32'                 # 'float32', 'bfloat16' or 'float16' (autocast over float32 weights), or
                                           # 'pure_bfloat16': weights, gradients, Adam's state all bf16 (the authors')
    tf32: bool = True                      # float32 matmuls on CUDA in TF32 (faster, about 3 digits); False: not
    compile: bool = False                  # torch.compile the model
    compile_mode: str = 'default'          # torch.compile's, e.g. 'max-autotune-no-cudagraphs' (bench.py decides)
    activation_checkpointing: bool = False # recompute each block's activations in the backward pass: less memory
    loss_chunk_tokens: int = 0             # N > 0: the loss N tokens at a time, logits recomputed: less memory
    keep_last_n: int = 0                   # also keep this many earlier checkpoints, as ckpt-<iter>.pt
    ddp_timeout_minutes: int = 30          # a process waiting this long in a collective fails the job
    seed: int = 1337

    def settings(self):
        """Every setting by name, flat, the model's among them (GPTConfig's defaults where unset)."""
        values = asdict(self)
        defaults = {f.name: f.default for f in fields(GPTConfig) if f.name in MODEL_KEYS} | {'vocab_size': None}
        return {**{k: v for k, v in values.items() if k != 'model'}, **defaults, **values['model']}


# what config files and --key=value can set, with the type each takes: the trainer's settings and the model's
# (GPTConfig's, but block_size, which the trainer sets; vocab_size may be None, for the dataset's)
MODEL_KEYS = [f.name for f in fields(GPTConfig) if f.name != 'block_size']
SETTING_TYPES = {**{key: kind for key, kind in get_type_hints(GPTConfig).items() if key in MODEL_KEYS},
                 'vocab_size': Optional[int],
                 **{key: kind for key, kind in get_type_hints(TrainConfig).items() if key != 'model'}}
# how one invocation runs, never the run itself: on resume these come as given now, every other setting from the
# checkpoint unless a --key=value names it (continue_run)
LAUNCH = ('out_dir', 'init_from', 'overwrite', 'device', 'compile', 'compile_mode', 'tf32', 'activation_checkpointing',
          'loss_chunk_tokens', 'ddp_timeout_minutes', 'wandb_log', 'wandb_project', 'wandb_run_name')
DIAGNOSTIC_TOKENS = 1024  # the per-block diagnostics' batch (evaluate): 4 rows of the paper's 256 tokens
NEVER = 2 ** 62  # the first non-finite iteration of a run that has none


class Diverged(UserError):
    """A non-finite loss: the run stops without saving, and the exit status says so."""
    exit_status = 3


class Interrupted(UserError):
    """Ctrl-C: the save in flight is finished, the message says where the last checkpoint is."""
    exit_status = 130


def parse_config(argv):
    """TrainConfig from command-line arguments: config files and --key=value overrides, applied in order."""
    return checked_config(read_settings(argv, SETTING_TYPES))


def config_from(settings):
    """TrainConfig of flat {setting: value}, the model's among them."""
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k not in MODEL_KEYS})
    cfg.model.update({k: v for k, v in settings.items() if k in MODEL_KEYS})
    return cfg


def checked_config(values):
    """config_from(values), each setting and their combinations checked; UserError naming the first wrong one."""
    cfg = config_from(values)
    check_train_settings(cfg, values)
    model_config(cfg, vocab_size=1)  # the model's settings checked now too (the vocabulary comes with the data)
    return cfg


def model_config(cfg, vocab_size):
    """GPTConfig of cfg's model settings, for sequences of cfg.block_size; vocab_size where cfg leaves it None."""
    try:
        return GPTConfig(**{**cfg.model, 'block_size': cfg.block_size,
                            'vocab_size': cfg.model.get('vocab_size') or vocab_size})
    except ValueError as error:
        raise UserError(str(error)) from None


# ----------------------------------------------------------------------------- set-up, in the order train() calls it

def continue_run(cfg, checkpoint, explicit, given, world_size):
    """cfg for going on with the checkpoint's run (configurator.resumed_settings), and the start-up's lines on what
    the command line changed and what config files gave that the run did not take."""
    own = {'seed': checkpoint['train_config'].get('seed'), **{k: checkpoint['model_config'].get(k) for k in MODEL_KEYS}}
    settings, changed, lines = resumed_settings(checkpoint['train_config'], cfg.settings(), explicit, given, own,
                                                LAUNCH, cfg.out_dir)
    cfg, it = resolve_batch(config_from(settings), world_size), checkpoint['iter_num']
    before = get_lr(it, replace(cfg, **{k: v for k, v in changed.items() if k not in MODEL_KEYS}))
    if changed:
        lines.append("changed from the run's settings: " + ', '.join(f"{k} {v!r} -> {settings[k]!r}" for k, v in
                     changed.items()) + (f"; the learning rate at iteration {it} goes from {before:.2e} to "
                                         f"{get_lr(it, cfg):.2e}" if before != get_lr(it, cfg) else ''))
    return cfg, lines


def check_inputs(cfg, dist, checkpoint=None):
    """Everything about the data, out_dir and the checkpoint to resume that can be wrong, before anything is built
    or written; (data_dir, meta, model config, data fingerprint)."""
    data_dir = resolve_data_dir(cfg.data_dir, cfg.dataset)
    meta, fingerprint = read_meta(data_dir, cfg.dataset), data_fingerprint(data_dir)
    if checkpoint is not None:  # first: other data can also mean another vocabulary, which is not another model
        check_same_data(checkpoint, meta, fingerprint, data_dir, cfg.out_dir)
    config = model_config(cfg, meta['vocab_size'])
    check_data(data_dir, meta, cfg.block_size, config.vocab_size)
    check_same_data_on_every_rank(fingerprint, data_dir, dist)
    problem = from_rank_0(out_dir_problem(cfg.out_dir, cfg.init_from, cfg.overwrite) if dist.master else None, dist)
    if problem:  # rank 0's, the one that writes there: every process refuses, so none waits in a collective
        raise UserError(problem)
    return data_dir, meta, config, fingerprint


def build_model(cfg, config, device):
    """(model, optimizer, autocast, scaler) as cfg asks, the weights drawn from the current seed on the device."""
    model = GPT.on_device(config, device)
    if cfg.dtype == 'pure_bfloat16':
        # no fp32 master copy: an Adam step below half a bf16 spacing rounds away (README, "Paper scale")
        model.to(torch.bfloat16)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.loss_chunk_tokens = cfg.loss_chunk_tokens
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    autocast, scaler = mixed_precision(cfg.dtype, device, cfg.tf32)
    return model, optimizer, autocast, scaler


def print_startup(cfg, config, model, device, dist, changes):
    for name, settings in (('settings', {k: v for k, v in asdict(cfg).items() if k != 'model'}),
                           ('model', config.to_dict())):
        print(textwrap.fill(', '.join(f'{k}={v}' for k, v in settings.items()), width=116, initial_indent=f'{name}: ',
                            subsequent_indent='    ', break_long_words=False, break_on_hyphens=False))
    device_name, peak = peak_flops(device, cfg.dtype)
    print(*changes, f"{dist.world_size} process(es)"
          f"{f', DDP over {torch.distributed.get_backend()}' if dist.ddp else ''} on {device_name} (peak "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}); {model.num_params():,} parameters "
          f"({model.num_params(exclude_embeddings=True):,} without embeddings)",
          f"{cfg.batch_size * cfg.gradient_accumulation_steps:,} sequences per step = {dist.world_size} process(es) "
          f"x {cfg.gradient_accumulation_steps // dist.world_size} micro-step(s) x {cfg.batch_size} sequences; "
          f"{cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size:,} tokens per step; "
          f"{model.flops_per_token(cfg.block_size):,} FLOPs per token",
          f"lns_scale by block: {' '.join(f'{block.lns_scale:.3f}' for block in model.blocks)}", sep='\n')
    if cfg.decay_lr and cfg.warmup_iters >= cfg.max_iters:
        print(f"note: warmup_iters={cfg.warmup_iters} is not below max_iters={cfg.max_iters}, so the learning rate "
              f"never passes {get_lr(cfg.max_iters - 1, cfg):.2e} of its {cfg.learning_rate:.2e} peak; lower "
              f"warmup_iters to reach it")
    if cfg.dtype == 'float16' and device.type == 'cpu':
        print("note: float16 on a CPU is computed in software, several times slower than float32 for the same "
              "losses; --dtype=float32 (or bfloat16) is faster here")


# ----------------------------------------------------------------------------- the schedule and the gradient

def get_lr(it, cfg):
    """Linear warmup over warmup_iters, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def clip_gradients(parameters, grad_clip):
    """The global gradient norm, each tensor's accumulated in float32 (bf16 gradients under pure_bfloat16 would
    round the sum), the gradients then scaled down to grad_clip when the norm is above it (0: never)."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float32)
                                                 for p in parameters]))
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, grad_clip, norm)
    return norm


# ----------------------------------------------------------------------------- the training loop

def train(cfg, dist, device, explicit=(), given=()):
    """Trains the model cfg describes and returns the best validation loss; `explicit` and `given` are the settings
    the command line and the config files set, for resuming (continue_run)."""
    checkpoint, changes = None, []
    if cfg.init_from == 'resume':
        checkpoint = load_resume_checkpoint(cfg.out_dir)
        cfg, changes = continue_run(cfg, checkpoint, set(explicit), set(given), dist.world_size)
    else:
        cfg = resolve_batch(cfg, dist.world_size)
    data_dir, meta, config, fingerprint = check_inputs(cfg, dist, checkpoint)
    if checkpoint is not None and checkpoint['iter_num'] >= cfg.max_iters:
        if dist.master:
            print(f"{cfg.out_dir} holds a finished run: iteration {checkpoint['iter_num']} of max_iters {cfg.max_iters}"
                  f"; nothing to do (to train on, resume with a larger --max_iters)")
        return checkpoint['best_val_loss']
    log_path = os.path.join(cfg.out_dir, 'log.jsonl')

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model, optimizer, autocast, scaler = build_model(cfg, config, device)
    torch.manual_seed(cfg.seed + dist.rank)  # dropout differs between processes
    data = TokenData(data_dir, meta, cfg.seed)
    train_generator = torch.Generator().manual_seed(cfg.seed)  # the batches' places, alike in every process
    eval_batches = {split: data.eval_batches(split, cfg) for split in ('train', 'val')}
    iter_num, best_val_loss = 0, float('inf')
    if checkpoint is not None:
        restore_state(checkpoint, model, optimizer, scaler, train_generator, cfg.seed, dist, cfg.out_dir)
        iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
        checkpoint = None  # free its memory
    resumed_at = saved_at = iter_num or None  # a resumed iteration was evaluated and saved before the stop
    if dist.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if cfg.init_from == 'scratch':
            delete_run(cfg.out_dir)  # check_inputs allowed it: nothing there, or --overwrite=True
        print_startup(cfg, config, model, device, dist, changes)
        print(('training' if resumed_at else f"evaluating iteration 0 ({cfg.eval_sequences} sequences per split), "
               f"then training") + (", the first step compiling the model (minutes for a large one)" if cfg.compile
                                    else ''), flush=True)
        if cfg.wandb_log:
            import wandb  # only when asked for
            wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=cfg.settings())
    # the module the step calls, compiled if asked and in DDP under torchrun; the bare model is the one evaluated
    # and saved, so checkpoints carry no compile or DDP prefix
    train_model = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
    if dist.ddp:  # gradients live in DDP's buckets (no second copy); 100 MB ones: a few dozen all-reduces per step
        train_model = DDP(train_model, device_ids=[device.index] if device.type == 'cuda' else None,
                          gradient_as_bucket_view=True, bucket_cap_mb=100)
    writer = (CheckpointWriter(cfg.out_dir, cfg.keep_last_n, log_path, saved_iter=resumed_at) if dist.master
              else None)
    checkpoint_interval = cfg.checkpoint_interval or cfg.eval_interval
    micro_steps = cfg.gradient_accumulation_steps // dist.world_size  # this process's share of the step
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    flops_per_iter = model.flops_per_token(cfg.block_size) * tokens_per_iter
    peak = peak_flops(device, cfg.dtype)[1]
    # the last step's loss and the first iteration whose loss was not finite, kept on the device: no step waits
    loss, first_bad = torch.zeros((), device=device), torch.full((), NEVER, dtype=torch.long, device=device)
    timer, lr, grad_norm = None, None, None  # timer: (time, iteration) where the speed's window began, or None
    try:
        while True:
            last_step = iter_num >= cfg.max_iters
            evaluating = (iter_num % cfg.eval_interval == 0 or last_step) and iter_num != resumed_at
            on_schedule = iter_num % checkpoint_interval == 0 or last_step
            logging = iter_num > (resumed_at or 0) and iter_num % cfg.log_interval == 0  # the step just taken logs
            if evaluating or on_schedule or logging:  # the loss check: a run gone non-finite stops, saving nothing
                first = all_reduce(first_bad.clone(), dist, torch.distributed.ReduceOp.MIN if dist.ddp else None).item()
                if first != NEVER:
                    if dist.master:
                        append_log(log_path, {'iter': first, 'diverged': 'train'})
                    raise Diverged(f"training loss is not finite at iteration {first}; stopped at iteration "
                                   f"{iter_num} without saving (lower learning_rate or set grad_clip)")
            if logging:  # the log line and record: loss, learning rate, gradient norm, speed and MFU
                record = {'iter': iter_num, 'loss': all_reduce(loss.float().clone(), dist).item() / dist.world_size,
                          'lr': lr, 'grad_norm': grad_norm.item(), 'ms_per_iter': None, 'tokens_per_sec': None,
                          'mfu': None}
                speed = 'timing starts after the first step'
                if timer is not None:
                    synchronize(device)
                    seconds = (time.perf_counter() - timer[0]) / (iter_num - timer[1])
                    left = round((cfg.max_iters - iter_num) * seconds)  # training alone, evaluations not counted
                    record.update(ms_per_iter=1000 * seconds, tokens_per_sec=tokens_per_iter / seconds,
                                  mfu=flops_per_iter / seconds / (peak * dist.world_size) if peak else None)
                    speed = (f"{record['ms_per_iter']:.1f} ms/iter, {record['tokens_per_sec']:,.0f} tokens/s, MFU "
                             + (f"{record['mfu']:.1%}" if peak else 'unknown') + ', ' + (
                                 f'{left // 3600}h {left // 60 % 60:02d}m' if left >= 3600 else
                                 f'{left // 60}m {left % 60:02d}s') + ' of training left')
                if device.type == 'cuda':  # the allocator's own count: no wait for the GPU
                    record['peak_memory_gib'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                if dist.master:
                    print(f"iter {iter_num} of {cfg.max_iters}: loss {record['loss']:.4f}, lr {lr:.2e}, "
                          f"grad norm {record['grad_norm']:.3f}, {speed}")
                    append_log(log_path, record)
                    if cfg.wandb_log:
                        wandb.log({f'train/{k}': v for k, v in record.items() if v is not None})
                timer = None
            improved = False
            if evaluating:
                val_loss = evaluate(iter_num, model, data, eval_batches, device, autocast, dist, cfg, log_path)
                improved, best_val_loss, timer = val_loss < best_val_loss, min(best_val_loss, val_loss), None
            # the one save condition: never the iteration just resumed from (it is the checkpoint), nor before
            # training; then on schedule and at the end, or (always_save_checkpoint=False) when evaluation improved
            if iter_num > 0 and iter_num != resumed_at and (on_schedule if cfg.always_save_checkpoint else improved):
                rng_states = gather_rng_states(train_generator, dist)
                if writer is not None:
                    writer.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                 'scaler': scaler.state_dict(), 'model_config': config.to_dict(),
                                 'train_config': cfg.settings(), 'data_meta': meta, 'data_fingerprint': fingerprint,
                                 'iter_num': iter_num, 'best_val_loss': best_val_loss, 'rng': rng_states})
                saved_at, timer = iter_num, None
            if last_step:
                break

            # one optimizer step: the learning rate, then forward and backward over this process's micro-batches
            if timer is None:  # the speed is timed from here, leaving out evaluations, saves and the first step
                synchronize(device)
                timer = (time.perf_counter(), iter_num)
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group['lr'] = lr
            batches = train_batches(iter_num, train_generator, data, device, cfg, dist)
            x, y = next(batches)
            loss_sum = torch.zeros((), device=device)
            for micro_step in range(micro_steps):
                if dist.ddp:  # average gradients across processes only after the last micro-step
                    train_model.require_backward_grad_sync = micro_step == micro_steps - 1
                with autocast:
                    _, micro_loss = train_model(x, y, return_logits=False)  # the logits would live through backward
                x, y = next(batches, (None, None))  # read and copy the next micro-batch while this one computes
                scaler.scale(micro_loss / micro_steps).backward()
                loss_sum += micro_loss.detach()  # kept on the device: nothing in a step waits for the GPU
            if cfg.grad_clip > 0 or (iter_num + 1) % cfg.log_interval == 0:  # the norm: for the log line too
                scaler.unscale_(optimizer)
                grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            # zeroed in place, not freed: under DDP the gradients are views into its all-reduce buckets, and a freed
            # one would come back as a second, separate copy in the next micro-steps without sync
            optimizer.zero_grad(set_to_none=False)
            iter_num += 1
            loss = loss_sum / micro_steps  # numbered as the log numbers it, by the step's end
            first_bad = torch.minimum(first_bad, torch.where(torch.isfinite(loss), NEVER, iter_num))
            if iter_num == (resumed_at or 0) + 1:
                timer = None  # this process's first step compiles and warms up: its time is no measure of speed
    except KeyboardInterrupt:
        where = (f"{cfg.out_dir}/ckpt.pt holds iteration {saved_at}; go on with --init_from=resume" if saved_at
                 else "no checkpoint was saved")
        raise Interrupted(f"interrupted at iteration {iter_num}; {where}") from None
    finally:
        if writer is not None:
            writer.close()  # a save in flight is finished, never abandoned
    if dist.ddp:  # leave together: a process that tears down its group while rank 0 still saves can abort
        torch.distributed.barrier()
    if dist.master:
        export = (f"\n  python hf.py {cfg.out_dir} hf/{os.path.basename(os.path.normpath(cfg.out_dir))}      # a "
                  f"Hugging Face folder" if config.norm_scheme in ('pre', 'lns') else '')  # transformers' Pre-LN
        print(f"finished: {cfg.out_dir}, iteration {iter_num}, best validation loss {best_val_loss:.4f}. Next:\n"
              f"  python eval_layers.py {cfg.out_dir}       # which blocks matter, the variance by depth\n"
              f"  python sample.py {cfg.out_dir}            # text from the model{export}")
    return best_val_loss


# ----------------------------------------------------------------------------- evaluation

def evaluate(iter_num, model, data, eval_batches, device, autocast, dist, cfg, log_path):
    """Evaluates, logs the losses and the per-block depth diagnostics, and returns the validation loss; a
    non-finite one stops the run (Diverged) before anything is saved."""
    losses = estimate_loss(model, data, eval_batches, cfg, device, autocast, dist)
    if not math.isfinite(losses['val']):
        if dist.master:
            append_log(log_path, {'iter': iter_num, 'diverged': 'val'})
        raise Diverged(f"validation loss is {losses['val']} at iteration {iter_num}; stopped without saving "
                       f"(lower learning_rate or set grad_clip)")
    if not dist.master:
        return losses['val']
    record = {'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val']}
    line = f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
    if data.layout == 'rows':  # beside the authors' estimator, so that a number compares with their Table 1
        record.update(val_ppl=math.exp(losses['val']), val_loss_authors=losses['val_authors'],
                      val_ppl_authors=math.exp(losses['val_authors']))
        line += (f" (perplexity {record['val_ppl']:.2f}; the authors' estimator as {cfg.authors_eval_gpus} GPU(s) x "
                 f"{cfg.authors_eval_batch_size} rows read it: {record['val_ppl_authors']:.2f})")
    print(line)
    # the depth diagnostics on the validation set's first DIAGNOSTIC_TOKENS: run eagerly with gradients, on a whole
    # micro-batch (128 rows at 350M) they would need several times the memory of a checkpointed training step
    starts = eval_batches['val'][0][0][:max(1, DIAGNOSTIC_TOKENS // cfg.block_size)]
    with autocast:
        record.update(model.depth_diagnostics(*data.read('val', starts, cfg.block_size, device)))
    append_log(log_path, record)
    if cfg.wandb_log:
        import wandb  # initialised by train()
        wandb.log({'iter': iter_num, 'train/loss_eval': losses['train'], 'val/loss': losses['val']})
    return losses['val']


@torch.no_grad()
def estimate_loss(model, data, eval_batches, cfg, device, autocast, dist):
    """Per split, the mean loss per target token over its fixed evaluation batches, and for 'val' also
    'val_authors', the authors' estimator (authors_estimate). Each batch is read in micro-batches shared out
    among the processes, and its loss sum and token count are added up over them."""
    model.eval()
    losses = {}
    for split, batches in eval_batches.items():
        chunks = [(i, chunk) for i, (starts, _) in enumerate(batches) for chunk in starts.split(cfg.batch_size)]
        mine = chunks[dist.rank::dist.world_size]
        sums = torch.zeros(len(batches), 2, dtype=torch.float64, device=device)  # per batch: loss x tokens, tokens
        quiet = not dist.master or len(mine) < 20 or None  # None: tqdm shows bars only on a terminal
        for i, starts in tqdm(mine, desc=f'eval {split}', leave=False, disable=quiet):
            x, y = data.read(split, starts, cfg.block_size, device)
            with autocast:
                _, loss = model(x, y, return_logits=False)
            tokens = (y >= 0).sum().double()
            sums[i] += torch.stack([torch.where(tokens > 0, loss.double() * tokens, 0.0), tokens])
        loss_sums, tokens = all_reduce(sums, dist).cpu().unbind(1)
        losses[split] = (loss_sums.sum() / tokens.sum()).item()
        if split == 'val':
            losses['val_authors'] = authors_estimate(loss_sums, tokens, [gpu for _, gpu in batches])
    model.train()
    return losses


# ----------------------------------------------------------------------------- command line

def usage():
    return settings_usage(__doc__, TrainConfig, {k: v for k, v in TrainConfig().settings().items() if k in MODEL_KEYS})


def run(argv):
    """Trains the run the arguments describe, in each process torchrun starts (or the one process)."""
    dist = None
    try:
        values = read_settings(argv, SETTING_TYPES)
        cfg = checked_config(values)
        dist, device = setup_distributed(cfg)
        explicit = {arg[2:].partition('=')[0] for arg in argv if arg.startswith('--')}
        with run_lock(cfg.out_dir) if dist.master else nullcontext():  # one training per out_dir at a time
            train(cfg, dist, device, explicit, given=set(values))
    except KeyboardInterrupt:  # during training, train() turns it into Interrupted, naming the last checkpoint
        raise Interrupted("interrupted before training began; nothing was saved") from None
    finally:
        if dist is not None and dist.ddp:
            torch.distributed.destroy_process_group()


def main(argv):
    return run_main(run, argv, usage)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
