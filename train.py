"""
Trains a GPT or Llama model (model.py) on a prepared token dataset (data/<dataset>/train.bin, val.bin).

    python train.py                                   # small deep Llama with LNS on shakespeare_char, CPU, ~5 min
    python train.py config/some_config.py --key=value # a config file, then overrides, applied in order
    torchrun --standalone --nproc_per_node=8 train.py config/llama_350m_lns.py   # DDP on 8 GPUs

The trainer's settings are the fields of TrainConfig below, their defaults the documentation; the model's are
model.GPTConfig's fields, set by name the same way. train() below is the whole loop: evaluation, saving, and each
optimizer step's forward, backward, clip and update; the set-up, the schedule and the evaluation it calls follow
it, in that order. Beside this file:
dataloader.py (the data and its batches), checkpoint.py (the run folder: checkpoints, log, resume) and
configurator.py (settings, processes, devices).
"""

import importlib.util
import inspect
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

from checkpoint import CheckpointWriter, append_log, delete_run, existing_run, gather_rng_states, \
    load_resume_checkpoint, restore_rng_state, run_lock, truncate_log
from configurator import (DTYPES, UserError, all_reduce, mixed_precision, peak_flops, read_settings, run_main,
                          setup_distributed, synchronize)
from dataloader import TokenData, check_data, data_fingerprint, read_meta, resolve_data_dir, train_batches
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
    authors_eval_gpus: int = 1             # the authors' estimator as their run computed it, whatever our process
    authors_eval_batch_size: Optional[int] = None  # count: their GPUs and per-GPU evaluation batch (None:
                                           # batch_size); see dataloader.TokenData.eval_batches
    log_interval: int = 25                 # print and log the training loss every this many iterations
    checkpoint_interval: Optional[int] = None  # save ckpt.pt every this many iterations (None: eval_interval) and
                                           # at the end; written in the background, training waits only for a copy
    always_save_checkpoint: bool = True    # False: save only at evaluations where the validation loss improves
    init_from: str = 'scratch'             # 'scratch' or 'resume': out_dir/ckpt.pt's run goes on with its own
                                           # settings (model, data, schedule, cadence) but those a --key=value
                                           # names; only the LAUNCH ones below come from this command
    overwrite: bool = False                # init_from='scratch' into an out_dir that holds a run deletes that run
                                           # (its checkpoints and log); without it, refused
    wandb_log: bool = False
    wandb_project: str = 'curse-of-depth'
    wandb_run_name: str = 'run'
    # data
    dataset: str = 'shakespeare_char'      # a folder under data/ made by its prepare.py
    data_dir: str = ''                     # '' means data/<dataset> beside this file
    batch_size: int = 16                   # sequences per micro-step; with global_batch_size, the most one process
                                           # runs at once (a ceiling that fits its GPU): the trainer picks the largest
                                           # micro-batch up to it that divides the process's share
    block_size: int = 64                   # tokens per sequence (the model's block_size too)
    global_batch_size: Optional[int] = None  # sequences per optimizer step over all processes, whatever their
                                           # number (the paper's recipe: 512); None: batch_size x
                                           # gradient_accumulation_steps
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
    tf32: bool = True                      # float32 matmuls on CUDA in TF32 (faster, about 3 digits); False: full
                                           # float32, as on a CPU
    compile: bool = False                  # torch.compile the model
    compile_mode: str = 'default'          # torch.compile's mode, e.g. 'max-autotune-no-cudagraphs' (longer
                                           # compilation, maybe faster steps: a bench.py row decides)
    activation_checkpointing: bool = False # recompute each block's activations in the backward pass: less memory
    loss_chunk_tokens: int = 0             # N > 0: the loss over N tokens at a time, their logits recomputed in
                                           # backward (less memory; a bench.py row decides its speed)
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
# how one invocation runs, never the run itself: on resume these come from the command line and config files as
# given now; every other setting (the model, the data, the schedule, the cadence) from the checkpoint, unless the
# command line names it (--key=value), which the start-up announces (continue_run)
LAUNCH = ('out_dir', 'init_from', 'overwrite', 'device', 'compile', 'compile_mode', 'tf32', 'activation_checkpointing',
          'loss_chunk_tokens', 'ddp_timeout_minutes', 'wandb_log', 'wandb_project', 'wandb_run_name')
DIAGNOSTIC_TOKENS = 1024  # the per-block diagnostics' batch: 4 rows of the paper's 256 tokens (diagnostic_sequences)


class Diverged(UserError):
    """A non-finite loss: the run stops without saving, and the exit status says so."""
    exit_status = 3


class Interrupted(UserError):
    """Ctrl-C: the save in flight is finished, the message says where the last checkpoint is."""
    exit_status = 130


# ----------------------------------------------------------------------------- the training loop

def train(cfg, dist, device, explicit=(), given=()):
    """Trains the model cfg describes; returns the best validation loss. On resume the run goes on with the
    checkpoint's settings, but those the command line names (`explicit`); `given` holds every setting the config
    files and the command line set, so that the start-up can say which of them the run did not take."""
    checkpoint, changes = None, []
    if cfg.init_from == 'resume':
        checkpoint = load_resume_checkpoint(cfg.out_dir)
        cfg, changes = continue_run(cfg, checkpoint, set(explicit), set(given), dist.world_size)
    else:
        cfg = resolve_batch(cfg, dist.world_size)
    data_dir, meta, config, fingerprint = check_inputs(cfg, dist, checkpoint)
    if checkpoint is not None and checkpoint['iter_num'] >= cfg.max_iters:
        if dist.master:
            print(f"{cfg.out_dir} holds a finished run: iteration {checkpoint['iter_num']} of max_iters "
                  f"{cfg.max_iters}, best validation loss {checkpoint['best_val_loss']:.4f}; nothing to do (to "
                  f"train on, resume with a larger --max_iters)")
        return checkpoint['best_val_loss']
    log_path = os.path.join(cfg.out_dir, 'log.jsonl')

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model, optimizer, autocast, scaler = build_model(cfg, config, device)
    torch.manual_seed(cfg.seed + dist.rank)  # dropout differs between processes
    data = TokenData(data_dir, meta, cfg.seed)
    # draws the training batches' places, the same in every process: see dataloader.train_batches
    train_generator = torch.Generator().manual_seed(cfg.seed)
    eval_batches = {split: data.eval_batches(split, cfg) for split in ('train', 'val')}
    iter_num, best_val_loss = 0, float('inf')
    if checkpoint is not None:
        iter_num, best_val_loss = restore_state(checkpoint, model, optimizer, scaler, train_generator, cfg, dist,
                                                log_path)
        checkpoint = None  # free its memory
    resumed_at = iter_num if iter_num > 0 else None  # that iteration was evaluated and saved before the stop
    saved_at = resumed_at
    if dist.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if cfg.init_from == 'scratch':
            delete_run(cfg.out_dir)  # check_inputs allowed it: nothing there, or --overwrite=True
        print_startup(cfg, config, model, device, dist, changes)
        print(('training' if resumed_at else f"evaluating iteration 0 ({cfg.eval_sequences} sequences per split), "
               f"then training") + (", the first step compiling the model (minutes for a large one)" if cfg.compile
                                    else ''), flush=True)
    train_model = wrap_for_training(model, cfg, dist, device)
    writer = (CheckpointWriter(cfg.out_dir, cfg.keep_last_n, log_path, saved_iter=resumed_at) if dist.master
              else None)
    health, stopwatch = TrainingHealth(device), Stopwatch(device)
    progress = Progress(cfg, model, device, dist, log_path)
    checkpoint_interval = cfg.checkpoint_interval or cfg.eval_interval
    micro_steps = cfg.gradient_accumulation_steps // dist.world_size  # this process's share of the step
    try:
        while True:
            last_step = iter_num >= cfg.max_iters
            evaluating = (iter_num % cfg.eval_interval == 0 or last_step) and iter_num != resumed_at
            improved = False
            if evaluating:
                stopwatch.pause()
                health.check(iter_num, dist, log_path)
                val_loss = evaluate(iter_num, model, data, eval_batches, device, autocast, dist, cfg, log_path)
                improved, best_val_loss = val_loss < best_val_loss, min(best_val_loss, val_loss)
            # the one save condition: never the iteration just resumed from (it is the checkpoint), nor before
            # training; then on schedule and at the end, or (always_save_checkpoint=False) when evaluation improved
            on_schedule = iter_num % checkpoint_interval == 0 or last_step
            if iter_num > 0 and iter_num != resumed_at and (on_schedule if cfg.always_save_checkpoint else improved):
                stopwatch.pause()
                if not evaluating:  # a run that has gone non-finite saves nothing (evaluating checked it already)
                    health.check(iter_num, dist, log_path)
                rng_states = gather_rng_states(train_generator, dist)
                if writer is not None:
                    writer.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                 'scaler': scaler.state_dict(), 'model_config': config.to_dict(),
                                 'train_config': cfg.settings(), 'data_meta': meta, 'data_fingerprint': fingerprint,
                                 'iter_num': iter_num, 'best_val_loss': best_val_loss, 'rng': rng_states})
                saved_at = iter_num
            if last_step:
                break

            # one optimizer step: the learning rate, then forward and backward over this process's micro-batches
            stopwatch.resume()
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
                    _, loss = train_model(x, y, return_logits=False)  # the logits would live through backward
                x, y = next(batches, (None, None))  # read and copy the next micro-batch while this one computes
                scaler.scale(loss / micro_steps).backward()
                loss_sum += loss.detach()  # kept on the device: nothing in a step waits for the GPU
            logging = (iter_num + 1) % cfg.log_interval == 0
            grad_norm = None
            if cfg.grad_clip > 0 or logging:
                scaler.unscale_(optimizer)
                grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            # zeroed in place, not freed: under DDP the gradients are views into its all-reduce buckets, and a freed
            # one would come back as a second, separate copy in the next micro-steps without sync
            optimizer.zero_grad(set_to_none=False)
            iter_num += 1
            health.record(loss_sum / micro_steps, iter_num)  # numbered as the log numbers it: the step's end
            stopwatch.step_done(first_of_process=iter_num == (resumed_at or 0) + 1)
            if logging:
                seconds_per_iter = stopwatch.read()
                progress.log(iter_num, lr, health.check(iter_num - 1, dist, log_path), grad_norm,
                             seconds_per_iter)
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
        name = os.path.basename(os.path.normpath(cfg.out_dir))
        print(f"finished: {cfg.out_dir}, iteration {iter_num}, best validation loss {best_val_loss:.4f}. Next:\n"
              f"  python eval_layers.py {cfg.out_dir}       # which blocks matter, the variance by depth\n"
              f"  python sample.py {cfg.out_dir}            # text from the model"
              + (f"\n  python hf.py {cfg.out_dir} hf/{name}      # a Hugging Face folder"
                 if config.norm_scheme in ('pre', 'lns') else ''))  # the schemes transformers' Pre-LN classes hold
    return best_val_loss


def wrap_for_training(model, cfg, dist, device):
    """The module the training step calls: compiled if asked, in DDP under torchrun. The bare model is the one
    evaluated and saved, so checkpoints never carry a compile or DDP prefix."""
    train_model = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
    if dist.ddp:
        # gradients live in DDP's communication buckets (no second copy); 100 MB buckets: a few dozen all-reduces
        # per step for 350M-1B models instead of DDP's default 25 MB's hundreds
        train_model = DDP(train_model, device_ids=[device.index] if device.type == 'cuda' else None,
                          gradient_as_bucket_view=True, bucket_cap_mb=100)
    return train_model


class Progress:
    """The training log line and log.jsonl record: loss, learning rate, gradient norm, speed and MFU; also sent to
    Weights & Biases with wandb_log (imported only then)."""

    def __init__(self, cfg, model, device, dist, log_path):
        self.tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
        self.flops_per_iter = model.flops_per_token(cfg.block_size) * self.tokens_per_iter
        _, peak = peak_flops(device, cfg.dtype)
        self.peak = peak * dist.world_size if peak else None
        self.master, self.log_path, self.wandb, self.device = dist.master, log_path, cfg.wandb_log, device
        self.max_iters = cfg.max_iters
        if self.wandb and self.master:
            import wandb
            wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=cfg.settings())

    def log(self, iter_num, lr, loss, grad_norm, seconds_per_iter):
        if not self.master:
            return
        record = {'iter': iter_num, 'loss': loss, 'lr': lr, 'grad_norm': grad_norm.item(),
                  'ms_per_iter': None, 'tokens_per_sec': None, 'mfu': None}
        if self.device.type == 'cuda':  # the allocator's own count: no wait for the GPU
            record['peak_memory_gib'] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        speed = 'timing starts after the first step'
        if seconds_per_iter is not None:  # None: only the first step (compilation) since the start
            record.update(ms_per_iter=1000 * seconds_per_iter, tokens_per_sec=self.tokens_per_iter / seconds_per_iter,
                          mfu=self.flops_per_iter / seconds_per_iter / self.peak if self.peak else None)
            left = round((self.max_iters - iter_num) * seconds_per_iter)  # training alone, evaluations not counted
            left = f'{left // 3600}h {left // 60 % 60:02d}m' if left >= 3600 else f'{left // 60}m {left % 60:02d}s'
            speed = (f"{record['ms_per_iter']:.1f} ms/iter, {record['tokens_per_sec']:,.0f} tokens/s, MFU "
                     + (f"{record['mfu']:.1%}" if record['mfu'] is not None else 'unknown')
                     + f", {left} of training left")
        print(f"iter {iter_num} of {self.max_iters}: loss {loss:.4f}, lr {lr:.2e}, "
              f"grad norm {record['grad_norm']:.3f}, {speed}")
        append_log(self.log_path, record)
        if self.wandb:
            import wandb
            wandb.log({f'train/{k}': v for k, v in record.items() if v is not None})


# ----------------------------------------------------------------------------- set-up, in the order train() calls it

def check_inputs(cfg, dist, checkpoint=None):
    """Everything about the data, out_dir and the checkpoint to resume that can be wrong, before anything is built
    or written; (data_dir, meta, model config, data fingerprint)."""
    data_dir = resolve_data_dir(cfg.data_dir, cfg.dataset)
    meta = read_meta(data_dir, cfg.dataset)
    config = model_config(cfg, meta['vocab_size'])
    if meta['vocab_size'] > config.vocab_size:
        raise UserError(f"dataset {cfg.dataset!r} has {meta['vocab_size']} token ids but the model's vocab_size is "
                        f"{config.vocab_size}; raise vocab_size or leave it unset")
    check_data(data_dir, meta, cfg.block_size, config.vocab_size)
    fingerprint = data_fingerprint(data_dir)
    problem = out_dir_problem(cfg) if dist.master else None  # only rank 0 writes there
    if dist.ddp:  # each node reads its own copy of the data: a different one would draw an inconsistent batch
        found = [None] * dist.world_size
        torch.distributed.all_gather_object(found, (fingerprint, problem))
        others = [rank for rank, (theirs, _) in enumerate(found) if theirs != found[0][0]]
        if others:  # every process refuses, so none waits for the others in a collective
            raise UserError(f"rank(s) {', '.join(map(str, others))} found other data in {data_dir} than rank 0 "
                            f"(meta.json, or the size or contents of train.bin or val.bin); give every node the "
                            f"same prepared data")
        problem = found[0][1]
    if problem:
        raise UserError(problem)
    if checkpoint is not None:
        check_same_run(cfg, checkpoint, config, meta, fingerprint, data_dir)
    return data_dir, meta, config, fingerprint


def out_dir_problem(cfg):
    """Why out_dir cannot take this run, in one sentence, or None."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        return f"out_dir {cfg.out_dir} exists and is not a folder; choose another out_dir"
    found = existing_run(cfg.out_dir)
    if cfg.init_from == 'scratch' and found and not cfg.overwrite:
        return (f"{cfg.out_dir} already holds a run ({found}); resume it with --init_from=resume, or start over "
                f"with --overwrite=True, which deletes it (or choose another --out_dir)")
    return None


def resolve_batch(cfg, world_size):
    """cfg for world_size processes: batch_size the micro-batch, gradient_accumulation_steps the micro-steps of all
    processes together (their product the global batch), authors_eval_batch_size set. With global_batch_size, each
    process's share of it runs in the largest micro-batch that divides the share and fits the batch_size ceiling."""
    cfg = replace(cfg, authors_eval_batch_size=cfg.authors_eval_batch_size or cfg.batch_size)
    if cfg.global_batch_size is None:
        if cfg.gradient_accumulation_steps % world_size:
            raise UserError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple of "
                            f"the number of processes ({world_size}) to keep the global batch; change one of them")
        return cfg
    total = cfg.global_batch_size
    if total % world_size:
        counts = [n for n in range(1, total + 1) if total % n == 0]
        raise UserError(f"global_batch_size {total} cannot be shared evenly by {world_size} processes; run "
                        f"{', '.join(map(str, counts))} processes, or change global_batch_size")
    share = total // world_size
    micro_batch = max(b for b in range(1, min(cfg.batch_size, share) + 1) if share % b == 0)
    return replace(cfg, batch_size=micro_batch, gradient_accumulation_steps=share // micro_batch * world_size)


def continue_run(cfg, checkpoint, explicit, given, world_size):
    """cfg resolved for going on with the checkpoint's run: the checkpoint's settings, the LAUNCH ones as given now,
    and those the command line names (`explicit`) changed, but a model setting, which is refused; and the lines the
    start-up prints about what changed, and what config files gave that the run did not take."""
    saved, now, built = checkpoint['train_config'], cfg.settings(), checkpoint['model_config']
    if 'seed' in explicit and now['seed'] != saved.get('seed'):
        raise UserError(f"seed sets a run's initial weights and data order, which the run in {cfg.out_dir} has "
                        f"(seed={saved.get('seed')}); resume without --seed, or start a new run for another seed")
    other_model = [k for k in MODEL_KEYS if k in explicit and now[k] is not None and now[k] != built.get(k)]
    if other_model:
        raise UserError(f"{cfg.out_dir}/ckpt.pt holds another model than asked: " + ', '.join(
            f"{k}={built.get(k)!r} (asked: {now[k]!r})" for k in other_model) + "; resume without those settings "
            "(the run keeps its own), or start a new run in another out_dir")
    settings = {k: v for k, v in saved.items() if k in SETTING_TYPES and k not in LAUNCH}
    changed = {k: settings[k] for k in explicit if k in settings and now[k] != settings[k]}
    kept = {k: now[k] for k in given - explicit if k in settings and now[k] != settings[k]}
    cfg = resolve_batch(config_from({**settings, **{k: now[k] for k in (*explicit, *LAUNCH)}}), world_size)
    lines = []
    if kept:
        lines.append("note: config files do not change a resumed run; it keeps its own " + ', '.join(
            f"{k}={settings[k]!r}" for k in kept) + " over the files' " + ', '.join(
            f"{k}={v!r}" for k, v in kept.items()) + " (a --key=value changes one)")
    if changed:
        it, before = checkpoint['iter_num'], replace(cfg, **{k: v for k, v in changed.items() if k not in MODEL_KEYS})
        lines.append("changed from the run's settings: " + ', '.join(
            f"{k} {v!r} -> {now[k]!r}" for k, v in changed.items()) + (
            f"; the learning rate at iteration {it} goes from {get_lr(it, before):.2e} to {get_lr(it, cfg):.2e}"
            if get_lr(it, before) != get_lr(it, cfg) else ''))
    return cfg, lines


def check_same_run(cfg, checkpoint, config, meta, fingerprint, data_dir):
    """Refuses to resume the checkpoint's run on other data than it trained on (checked first: other data can
    also mean another vocabulary, which is not the user asking for another model), or with another model."""
    saved_meta = checkpoint.get('data_meta')
    if saved_meta is not None and saved_meta != meta:
        keys = sorted(k for k in set(saved_meta) | set(meta) if saved_meta.get(k) != meta.get(k))
        raise UserError(f"{data_dir} holds other data than the run in {cfg.out_dir} trained on (its meta.json "
                        f"differs in {', '.join(keys)}); point data_dir at the data it trained on (or prepare that "
                        f"again), or start a new run")
    if checkpoint.get('data_fingerprint', fingerprint) != fingerprint:
        raise UserError(f"train.bin or val.bin in {data_dir} differ from the data the run in {cfg.out_dir} trained "
                        f"on (meta.json is the same); point data_dir at the run's data, or start a new run")
    ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
    try:  # resolved again, so that settings added since the checkpoint take their defaults
        saved = GPTConfig.from_dict(checkpoint['model_config']).to_dict()
    except ValueError as error:
        raise UserError(f"{ckpt_path} holds a model this version cannot build: {error}") from None
    if saved != config.to_dict():
        differences = [f"{k}={saved.get(k)!r} (asked: {v!r})" for k, v in config.to_dict().items() if saved.get(k) != v]
        raise UserError(f"{ckpt_path} holds a different model: {', '.join(differences)}; "
                        f"resume with the checkpoint's settings or use another out_dir")


def build_model(cfg, config, device):
    """(model, optimizer, autocast, scaler) as cfg asks, the weights drawn from the current seed (on a GPU from its
    generator: the model is made there, without a float32 copy on the CPU, 5.4 GB per process at 1B)."""
    if device.type == 'cpu':
        model = GPT(config)
    else:
        with torch.device('meta'):  # shapes only, no memory
            model = GPT(config)
        model.to_empty(device=device)
        model.init_weights()
    if cfg.dtype == 'pure_bfloat16':
        # no fp32 master copy: an Adam step below half a bf16 spacing (2^-8 just under 1) rounds away, so norm gains
        # of 1 stay exactly 1 at lr 1e-3 (README, "Paper scale")
        model.to(torch.bfloat16)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.loss_chunk_tokens = cfg.loss_chunk_tokens
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    autocast, scaler = mixed_precision(cfg.dtype, device, cfg.tf32)
    return model, optimizer, autocast, scaler


def restore_state(checkpoint, model, optimizer, scaler, train_generator, cfg, dist, log_path):
    """Weights, optimizer, scaler and RNG states from a checkpoint loaded on the CPU, and the log cut back to its
    iteration; (iter_num, best_val_loss)."""
    model.load_state_dict(checkpoint['model'])  # copies onto the model's device
    optimizer.load_state_dict(checkpoint['optimizer'])  # moves the state to its parameters' device
    scaler.load_state_dict(checkpoint['scaler'])
    ranks = checkpoint['rng']
    restore_rng_state(ranks[dist.rank] if len(ranks) == dist.world_size else ranks[0], train_generator)
    if len(ranks) != dist.world_size:  # another process count: the data order is kept, dropout draws fresh
        torch.manual_seed(cfg.seed + dist.rank + checkpoint['iter_num'])
    if dist.master:
        truncate_log(log_path, checkpoint['iter_num'])
        print(f"resuming from {os.path.join(cfg.out_dir, 'ckpt.pt')} at iteration {checkpoint['iter_num']}")
    return checkpoint['iter_num'], checkpoint['best_val_loss']


def print_startup(cfg, config, model, device, dist, changes=()):
    for name, settings in (('settings', {k: v for k, v in asdict(cfg).items() if k != 'model'}),
                           ('model', config.to_dict())):
        print(textwrap.fill(', '.join(f'{k}={v}' for k, v in settings.items()), width=116, initial_indent=f'{name}: ',
                            subsequent_indent='    ', break_long_words=False, break_on_hyphens=False))
    for line in changes:
        print(line)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    device_name, peak = peak_flops(device, cfg.dtype)
    ddp = f", DDP over {torch.distributed.get_backend()}" if dist.ddp else ''
    print(f"{dist.world_size} process(es){ddp} on {device_name} "
          f"(peak {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'})"
          f"; {model.num_params():,} parameters ({model.num_params(exclude_embeddings=True):,} without embeddings)")
    micro_steps = cfg.gradient_accumulation_steps // dist.world_size
    print(f"{cfg.batch_size * cfg.gradient_accumulation_steps:,} sequences per step = {dist.world_size} process(es) "
          f"x {micro_steps} micro-step(s) x {cfg.batch_size} sequences; {tokens_per_iter:,} tokens per step; "
          f"{model.flops_per_token(cfg.block_size):,} FLOPs per token")
    print('lns_scale by block:', ' '.join(f'{block.lns_scale:.3f}' for block in model.blocks))
    if cfg.decay_lr and cfg.warmup_iters >= cfg.max_iters:
        print(f"note: warmup_iters={cfg.warmup_iters} is not below max_iters={cfg.max_iters}, so the learning rate "
              f"never passes {get_lr(cfg.max_iters - 1, cfg):.2e} of its {cfg.learning_rate:.2e} peak; lower "
              f"warmup_iters to reach it")
    if cfg.dtype == 'float16' and device.type == 'cpu':
        print("note: float16 on a CPU is computed in software, several times slower than float32 for the same "
              "losses; --dtype=float32 (or bfloat16) is faster here")


# ----------------------------------------------------------------------------- the schedule, health and speed

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


class TrainingHealth:
    """The training loss kept on the device: the latest step's, and the first iteration whose loss was not finite.
    check() reads them (one wait for the device) and is called only when logging, evaluating or saving."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.no_iteration = torch.full((), 2 ** 62, dtype=torch.long, device=device)

    def record(self, loss, iter_num):
        self.loss = loss
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, iter_num), self.first_bad)

    def check(self, iter_num, dist, log_path):
        """The latest loss, the mean over processes; Diverged naming the first non-finite iteration of any
        process."""
        first_bad = all_reduce(torch.where(self.first_bad < 0, self.no_iteration, self.first_bad).clone(), dist,
                               torch.distributed.ReduceOp.MIN if dist.ddp else None).item()
        loss = all_reduce(self.loss.detach().float().clone(), dist).item()
        if first_bad != self.no_iteration.item():
            if dist.master:
                append_log(log_path, {'iter': first_bad, 'diverged': 'train'})
            raise Diverged(f"training loss is not finite at iteration {first_bad}; stopped at iteration {iter_num} "
                           f"without saving (lower learning_rate or set grad_clip)")
        return loss / dist.world_size


class Stopwatch:
    """Training time per iteration between log lines, with evaluations and saves left out, and the first step
    after a start or resume (compilation) too. Waits for the device only where the loop waits anyway."""

    def __init__(self, device):
        self.device = device
        self.seconds, self.steps, self.started = 0.0, 0, None

    def resume(self):
        if self.started is None:
            self.started = time.perf_counter()

    def pause(self):
        if self.started is not None:
            synchronize(self.device)
            self.seconds += time.perf_counter() - self.started
            self.started = None

    def step_done(self, first_of_process):
        if first_of_process:  # compilation and warm-up: start timing from here
            synchronize(self.device)
            self.seconds, self.steps, self.started = 0.0, 0, time.perf_counter()
        else:
            self.steps += 1

    def read(self):
        """Seconds per iteration since the last read (None when no step was timed), and starts a new window."""
        self.pause()
        per_iter = self.seconds / self.steps if self.steps else None
        self.seconds, self.steps = 0.0, 0
        self.resume()
        return per_iter


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
    starts = diagnostic_sequences(eval_batches['val'][0][0], cfg.block_size)
    record.update(depth_diagnostics(model, *data.read('val', starts, cfg.block_size, device), autocast))
    print(line)
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


def authors_estimate(loss_sums, tokens, gpus):
    """The loss the authors' evaluation reports, from each batch's loss sum and target count and the GPU that read
    it: per GPU, the sum of its batches' mean losses divided by (its batches + 1), their counter starting at 1;
    then the plain mean over the GPUs. It reads low by about 1/(batches per GPU + 1) of the loss."""
    means = loss_sums / tokens.clamp(min=1)
    gpus = torch.tensor(gpus)
    return torch.stack([means[gpus == gpu].sum() / ((gpus == gpu).sum() + 1) for gpu in gpus.unique()]).mean().item()


def diagnostic_sequences(starts, block_size):
    """The first sequences of an evaluation batch, DIAGNOSTIC_TOKENS' worth: the diagnostics run eagerly with
    gradients and without activation checkpointing, so on a whole micro-batch (128 rows at 350M) they would need
    several times the memory of a checkpointed training step."""
    return starts[:max(1, DIAGNOSTIC_TOKENS // block_size)]


def depth_diagnostics(model, x, y, autocast):
    """Per block l = 1..L, on one fixed batch in eval mode: the variance of the residual stream after the block
    (the paper's Figure 4), the mean effective gain of its norms (weight times the LNS factor), and the gradient
    norm of its parameters. torch.autograd.grad leaves .grad alone, so training is untouched (DDP too)."""
    model.eval()
    with torch.enable_grad(), autocast:
        _, loss, residuals = model(x, y, return_residuals=True, return_logits=False)
        params = [[p for p in block.parameters() if p.requires_grad] for block in model.blocks]
        grads = torch.autograd.grad(loss, [p for block in params for p in block], allow_unused=True)
    grad_norms, i = [], 0
    for block in params:
        block_grads = [g.float() for g in grads[i:i + len(block)] if g is not None]
        grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in block_grads])).item()
                          if block_grads else 0.0)
        i += len(block)
    model.train()
    return {'block_variance': [r.float().var(unbiased=False).item() for r in residuals[1:]],
            'block_norm_gain': [block.effective_norm_gain() for block in model.blocks],
            'block_grad_norm': grad_norms}


# ----------------------------------------------------------------------------- configuration

def parse_config(argv):
    """TrainConfig from command-line arguments: config files and --key=value overrides, applied in order (a file
    that overrides an earlier --key=value is announced)."""
    return checked_config(read_settings(argv, SETTING_TYPES))


def config_from(settings):
    """TrainConfig of flat {setting: value}, the model's among them."""
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k not in MODEL_KEYS})
    cfg.model.update({k: v for k, v in settings.items() if k in MODEL_KEYS})
    return cfg


def checked_config(values):
    """config_from(values), each setting and their combinations checked; UserError naming the first wrong one."""
    if values.get('global_batch_size') is not None and 'gradient_accumulation_steps' in values:
        raise UserError(f"global_batch_size ({values['global_batch_size']}) fixes the sequences per step and the "
                        f"trainer derives the micro-steps from it; drop gradient_accumulation_steps (lower batch_size "
                        f"to use less memory), or set --global_batch_size=None to count micro-steps yourself")
    cfg = config_from(values)
    if cfg.init_from not in ('scratch', 'resume'):
        raise UserError(f"init_from must be 'scratch' or 'resume', not {cfg.init_from!r}")
    if cfg.init_from == 'resume' and cfg.overwrite:
        raise UserError("overwrite=True starts a run over and init_from=resume goes on with it; give one of them "
                        "(--init_from=scratch --overwrite=True deletes the run first)")
    if not cfg.out_dir.strip():
        raise UserError("out_dir is empty; name the folder for the run's checkpoints and log, e.g. --out_dir=out/run")
    if cfg.wandb_log and importlib.util.find_spec('wandb') is None:
        raise UserError("wandb_log=True needs wandb, which is not installed; pip install wandb, or drop wandb_log")
    if cfg.dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not {cfg.dtype!r}")
    for key, (low, high, low_open, rule) in RANGES.items():
        value = getattr(cfg, key)
        if value is not None and (value < low or (low_open and value == low) or (high is not None and value >= high)):
            raise UserError(f"{key} must be {rule}, not {value}")
    if cfg.min_lr > cfg.learning_rate:
        raise UserError(f"min_lr ({cfg.min_lr}) must not exceed learning_rate ({cfg.learning_rate}); lower min_lr")
    model_config(cfg, vocab_size=1)  # the model's settings checked now too (the vocabulary comes with the data)
    return cfg


# the valid range of each numeric trainer setting (the model's are GPTConfig's to check):
# (lowest, first value too high or None, lowest excluded, in words)
AT_LEAST_1, AT_LEAST_0, POSITIVE = (1, None, False, 'at least 1'), (0, None, False, 'at least 0'), \
    (0, None, True, 'positive')
RANGES = {
    **dict.fromkeys(['eval_interval', 'eval_sequences', 'log_interval', 'checkpoint_interval', 'batch_size',
                     'block_size', 'global_batch_size', 'gradient_accumulation_steps', 'max_iters',
                     'ddp_timeout_minutes', 'lr_decay_iters', 'authors_eval_gpus', 'authors_eval_batch_size'],
                    AT_LEAST_1),
    **dict.fromkeys(['eval_tokens', 'warmup_iters', 'weight_decay', 'grad_clip', 'min_lr', 'keep_last_n',
                     'loss_chunk_tokens'], AT_LEAST_0),
    'learning_rate': POSITIVE,
    **dict.fromkeys(['beta1', 'beta2'], (0, 1, False, 'in [0, 1)')),
}


def model_config(cfg, vocab_size):
    """GPTConfig of cfg's model settings, for sequences of cfg.block_size; vocab_size is used when cfg leaves it
    unset or None."""
    try:
        return GPTConfig(**{**cfg.model, 'block_size': cfg.block_size,
                            'vocab_size': cfg.model.get('vocab_size') or vocab_size})
    except ValueError as error:
        raise UserError(str(error)) from None


def usage():
    """The module's docstring and every setting with its default and comment: TrainConfig's own source."""
    source = inspect.getsource(TrainConfig).split('    def settings')[0]
    model = ', '.join(f"{key}={value!r}" for key, value in TrainConfig().settings().items()
                      if key in MODEL_KEYS)
    return (f"{__doc__.strip()}\n\nThe trainer's settings, with their defaults:\n{source.rstrip()}\n\nThe model's "
            f"settings (model.GPTConfig's fields, documented there), with their defaults:\n"
            + textwrap.fill(model, width=116, initial_indent='    ', subsequent_indent='    '))


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
