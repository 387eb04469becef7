"""
Trains a GPT or Llama model (model.py) on a prepared token dataset (data/<dataset>/train.bin, val.bin).

    python train.py                                   # small deep Llama with LNS on shakespeare_char, CPU, ~5 min
    python train.py config/some_config.py --key=value # a config file, then overrides, applied in order
    torchrun --standalone --nproc_per_node=8 train.py config/llama_350m_lns.py   # DDP on 8 GPUs

Every knob is a field of TrainConfig below; its default is the documentation. Model knobs share the names of
model.GPTConfig's fields.
"""

import ast
import glob
import json
import math
import os
import shutil
import sys
import time
import types
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Optional, get_args, get_type_hints

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import GPT, GPTConfig, read_checkpoint


@dataclass
class TrainConfig:
    # output and logging
    out_dir: str = 'out'                   # ckpt.pt and log.jsonl go here
    eval_interval: int = 250               # evaluate (and checkpoint) every this many iterations, and at the end
    eval_iters: int = 20                   # batches per split in each evaluation; the same batches every time
    log_interval: int = 25                 # print and log the training loss every this many iterations
    always_save_checkpoint: bool = True    # False: save only when the validation loss improves
    init_from: str = 'scratch'             # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    wandb_log: bool = False
    wandb_project: str = 'curse-of-depth'
    wandb_run_name: str = 'run'
    # data
    dataset: str = 'shakespeare_char'      # a folder under data/ made by its prepare.py
    data_dir: str = ''                     # '' means data/<dataset> beside this file
    batch_size: int = 16                   # sequences per micro-step
    block_size: int = 64                   # tokens per sequence
    gradient_accumulation_steps: int = 1   # micro-steps per optimizer step, all processes together (torchrun
                                           # divides them), so the global batch does not depend on the GPU count
    # model: model.GPTConfig's fields, documented there; None: the architecture's default (vocab_size: the dataset's)
    arch: str = 'llama'
    norm_scheme: str = 'lns'
    n_layer: int = 12
    n_head: int = 4
    n_kv_head: Optional[int] = None
    n_embd: int = 128
    ffn_hidden: Optional[int] = None
    vocab_size: Optional[int] = None
    bias: Optional[bool] = None
    qkv_bias: Optional[bool] = None
    dropout: float = 0.0
    norm_eps: Optional[float] = None
    rope_theta: float = 10000.0
    tie_embeddings: Optional[bool] = None
    mix_ratio: float = 0.25
    lns_position: str = 'norm'
    init_scheme: str = 'normal'
    layerscale: bool = False
    layerscale_init: Optional[float] = None
    skipinit: bool = False
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
    dtype: str = 'float32'                 # 'float32', 'bfloat16' or 'float16' (autocast)
    compile: bool = False                  # torch.compile the model
    activation_checkpointing: bool = False # recompute each block's activations in the backward pass: less memory
    keep_last_n: int = 0                   # also keep this many earlier checkpoints, as ckpt-<iter>.pt
    seed: int = 1337


MODEL_KEYS = [f.name for f in fields(GPTConfig)]
DTYPES = ('float32', 'bfloat16', 'float16')
CHECKED_TOKENS = 10_000_000  # of each split, for ids beyond the vocabulary


class UserError(Exception):
    """A problem the user can fix; main() prints its one-sentence message and exits non-zero."""


# ----------------------------------------------------------------------------- configuration

def _describe(annotation):
    names = [t.__name__ for t in get_args(annotation) or (annotation,)]
    return ' or '.join('None' if n == 'NoneType' else f"a {n}" if n != 'int' else 'an int' for n in names)


def check_value(key, value, source):
    """Returns value as the type TrainConfig declares for key (an int is fine for a float); UserError otherwise."""
    hints = get_type_hints(TrainConfig)
    if key not in hints:
        raise UserError(f"unknown setting {key!r} in {source}; known settings are: {', '.join(hints)}")
    allowed = get_args(hints[key]) or (hints[key],)
    for kind in allowed:
        if kind is type(None) and value is None:
            return None
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, bool):
            continue
        if kind is not type(None) and isinstance(value, kind):
            return value
    raise UserError(f"{key} expects {_describe(hints[key])}, but {source} gives {value!r}")


def _parse_literal(key, raw):
    hints = get_type_hints(TrainConfig)
    if key in hints and str in (get_args(hints[key]) or (hints[key],)):
        return raw
    words = {'true': True, 'false': False, 'none': None}
    if raw.lower() in words:
        return words[raw.lower()]
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # check_value then names what was expected


def read_config_file(path):
    """The plain assignments of a Python config file, as a dict (names starting with _ and modules ignored)."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as error:
        raise UserError(f"cannot read config file {path}: {error.strerror}") from None
    namespace = {}
    try:
        exec(compile(source, path, 'exec'), {}, namespace)
    except Exception as error:
        raise UserError(f"config file {path} failed to run: {type(error).__name__}: {error}") from None
    return {k: v for k, v in namespace.items() if not k.startswith('_') and not isinstance(v, types.ModuleType)}


def parse_config(argv):
    """TrainConfig from command-line arguments: config files and --key=value overrides, applied in order."""
    values = {}
    for arg in argv:
        if arg.startswith('--'):
            key, has_value, raw = arg[2:].partition('=')
            if not has_value or not key:
                raise UserError(f"malformed argument {arg!r}; write --key=value, e.g. --max_iters=500")
            values[key] = check_value(key, _parse_literal(key, raw), f"--{key}")
        elif arg.endswith('.py'):
            for key, value in read_config_file(arg).items():
                values[key] = check_value(key, value, arg)
        else:
            raise UserError(f"unexpected argument {arg!r}; give a config file ending in .py or --key=value")
    cfg = TrainConfig(**values)
    if cfg.init_from not in ('scratch', 'resume'):
        raise UserError(f"init_from must be 'scratch' or 'resume', not {cfg.init_from!r}")
    if cfg.dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not {cfg.dtype!r}")
    for key in ('eval_interval', 'eval_iters', 'log_interval', 'batch_size', 'block_size',
                'gradient_accumulation_steps', 'max_iters'):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key} must be at least 1, not {getattr(cfg, key)}")
    return cfg


def model_config(cfg, vocab_size):
    """GPTConfig from the model knobs of cfg; vocab_size is used when cfg leaves it None."""
    values = {key: getattr(cfg, key) for key in MODEL_KEYS}
    values['vocab_size'] = cfg.vocab_size or vocab_size
    try:
        return GPTConfig(**values)
    except ValueError as error:
        raise UserError(str(error)) from None


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


# ----------------------------------------------------------------------------- data

def resolve_data_dir(cfg):
    return cfg.data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', cfg.dataset)


def read_meta(data_dir, dataset):
    """meta.json of a prepared dataset; UserError naming the prepare command when it is missing."""
    paths = [os.path.join(data_dir, name) for name in ('meta.json', 'train.bin', 'val.bin')]
    missing = [p for p in paths if not os.path.isfile(p) or os.path.getsize(p) == 0]
    if missing:
        raise UserError(f"dataset {dataset!r} is not prepared ({missing[0]} is missing or empty); "
                        f"run: python data/{dataset}/prepare.py")
    with open(paths[0]) as f:
        return json.load(f)


def open_tokens(data_dir, split):
    # a fresh memmap on every call: a long-lived one keeps pages resident and grows memory (nanoGPT's lesson)
    return np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')


def read_windows(tokens, offsets, block_size):
    """Inputs and next-token targets, (len(offsets), block_size) int64 each, starting at the given offsets."""
    windows = np.stack([tokens[i:i + block_size + 1] for i in offsets.tolist()]).astype(np.int64)
    windows = torch.from_numpy(windows)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def random_offsets(tokens, count, block_size, generator):
    return torch.randint(len(tokens) - block_size, (count,), generator=generator)


def to_device(x, device):
    if device.type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


# ----------------------------------------------------------------------------- checkpoints

def write_atomically(path, state):
    """torch.save to a temporary file, fsync, then rename: a crash mid-write never leaves a partial `path`."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out_dir, state, keep_last_n=0):
    """Writes out_dir/ckpt.pt atomically, keeping the keep_last_n previous ones as ckpt-<iter>.pt."""
    numbered = os.path.join(out_dir, f"ckpt-{state['iter_num']:07d}.pt")
    write_atomically(numbered, state)
    latest, tmp = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'ckpt.pt.tmp')
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(numbered, tmp)  # a second name for the same file: no copy
    except OSError:
        shutil.copyfile(numbered, tmp)
    os.replace(tmp, latest)
    # the newest numbered file is ckpt.pt itself; beyond it keep keep_last_n
    numbered_files = sorted(glob.glob(os.path.join(out_dir, 'ckpt-*.pt')))
    keep = numbered_files[-(keep_last_n + 1):] if keep_last_n else []
    for old in set(numbered_files) - set(keep):
        os.remove(old)


def rng_state(sampler):
    state = {'sampler': sampler.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state, sampler):
    sampler.set_state(state['sampler'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def truncate_log(path, last_iter):
    """Drops log records after last_iter (written by a run that died after its last checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)['iter'] <= last_iter]
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.writelines(lines)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- processes and devices

@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self):
        return self.rank == 0


def setup_distributed():
    """Joins the process group when launched by torchrun (RANK, LOCAL_RANK, WORLD_SIZE are set)."""
    if 'RANK' not in os.environ:
        return Distributed()
    dist = Distributed(int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE']))
    backend = 'nccl' if torch.cuda.is_available() else 'gloo'
    if backend == 'nccl':
        torch.cuda.set_device(dist.local_rank)
    torch.distributed.init_process_group(backend=backend)
    return dist


def resolve_device(name, dist):
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda' and dist.world_size > 1:
        name = f'cuda:{dist.local_rank}'
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a torch device; use 'auto', 'cpu' or 'cuda'") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device=cpu")
    return device


def all_reduce_sum(values, dist, device):
    """The sums over all processes of a list of floats (the list itself in a single process)."""
    if dist.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


# dense bf16 tensor-core peak of one GPU, FLOP/s, from the vendors' datasheets; matched against the device name
# in this order (so that 'A100' is tried before 'A10', 'L40S' before 'L4')
PEAK_FLOPS = [('H200', 989e12), ('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12),
              ('A100', 312e12), ('L40S', 362e12), ('L4', 121e12), ('A10', 125e12), ('V100', 125e12)]


def peak_flops(device):
    """(name, peak FLOP/s) of the device, with peak None where unknown (every CPU, unlisted GPUs)."""
    if device.type != 'cuda':
        return 'cpu', None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in PEAK_FLOPS if key in name), None)


def mixed_precision(dtype, device):
    """(autocast context, grad scaler) for dtype; also allows TF32 matmuls on GPUs (CPU float32 stays exact)."""
    if device.type == 'cuda':
        torch.set_float32_matmul_precision('high')
    autocast = nullcontext() if dtype == 'float32' else torch.autocast(device.type, dtype=getattr(torch, dtype))
    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == 'float16')


def append_log(path, record):
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def estimate_loss(model, data_dir, eval_offsets, block_size, device, autocast, dist):
    """Mean loss per split over the fixed evaluation batches, shared out among the processes."""
    model.eval()
    losses = {}
    for split, batches in eval_offsets.items():
        tokens = open_tokens(data_dir, split)
        mine = batches[dist.rank::dist.world_size]
        total = 0.0
        quiet = not dist.master or len(mine) < 20 or None  # None: tqdm shows bars only on a terminal
        for offsets in tqdm(mine, desc=f'eval {split}', leave=False, disable=quiet):
            x, y = read_windows(tokens, offsets, block_size)
            with autocast:
                _, loss = model(to_device(x, device), to_device(y, device))
            total += loss.item()
        total, count = all_reduce_sum([total, len(mine)], dist, device)
        losses[split] = total / count
    model.train()
    return losses


def print_startup(cfg, config, model, device, dist):
    print('config:', ', '.join(f'{k}={v}' for k, v in asdict(cfg).items()))
    print('model:', ', '.join(f'{k}={v}' for k, v in config.to_dict().items()))
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    device_name, peak = peak_flops(device)
    print(f"{dist.world_size} process(es) on {device_name} (peak {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'})"
          f"; {model.num_params():,} parameters ({model.num_params(exclude_embeddings=True):,} without embeddings)")
    print(f"{tokens_per_iter:,} tokens per iteration = {cfg.batch_size} sequences x {cfg.block_size} tokens x "
          f"{cfg.gradient_accumulation_steps} micro-steps ({cfg.gradient_accumulation_steps // dist.world_size} "
          f"per process); {model.flops_per_token(cfg.block_size):,} FLOPs per token")
    print('lns_scale by block:', ' '.join(f'{block.lns_scale:.3f}' for block in model.blocks))


def check_inputs(cfg, dist):
    """Everything about the data and out_dir that can be wrong, before anything is built or written."""
    if cfg.gradient_accumulation_steps % dist.world_size:
        raise UserError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple of the "
                        f"number of processes ({dist.world_size}) to keep the global batch; change one of them")
    data_dir = resolve_data_dir(cfg)
    meta = read_meta(data_dir, cfg.dataset)
    config = model_config(cfg, meta['vocab_size'])
    if meta['vocab_size'] > config.vocab_size:
        raise UserError(f"dataset {cfg.dataset!r} has {meta['vocab_size']} token ids but the model's vocab_size is "
                        f"{config.vocab_size}; raise vocab_size or leave it unset")
    if cfg.block_size > config.block_size:
        raise UserError(f"block_size {cfg.block_size} exceeds the model's block_size {config.block_size}")
    for split in ('train', 'val'):
        tokens = open_tokens(data_dir, split)
        if len(tokens) <= cfg.block_size:
            raise UserError(f"{split}.bin in {data_dir} has fewer tokens than block_size {cfg.block_size}; "
                            f"lower block_size or prepare more data")
        largest = int(tokens[:CHECKED_TOKENS].max())  # a prefix: enough to catch data from another tokenizer
        if largest >= config.vocab_size:
            raise UserError(f"{split}.bin in {data_dir} holds token id {largest}, beyond the model's vocab_size "
                            f"{config.vocab_size}; prepare the data again or raise vocab_size")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UserError(f"out_dir {cfg.out_dir} exists and is not a folder; choose another out_dir")
    return data_dir, meta, config


def load_resume_checkpoint(cfg, config, device):
    ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if not os.path.exists(ckpt_path):
        raise UserError(f"init_from=resume but there is no {ckpt_path}; train from scratch first")
    try:
        checkpoint = read_checkpoint(ckpt_path, map_location=device)
    except ValueError as error:
        raise UserError(str(error)) from None
    try:  # resolved again, so that settings added since the checkpoint take their defaults
        saved = GPTConfig.from_dict(checkpoint['model_config']).to_dict()
    except ValueError as error:
        raise UserError(f"{ckpt_path} holds a model this version cannot build: {error}") from None
    if saved != config.to_dict():
        differences = [f"{k}={saved.get(k)!r} (asked: {v!r})" for k, v in config.to_dict().items() if saved.get(k) != v]
        raise UserError(f"{ckpt_path} holds a different model: {', '.join(differences)}; "
                        f"resume with the checkpoint's settings or use another out_dir")
    return checkpoint


def train(cfg, dist):
    data_dir, meta, config = check_inputs(cfg, dist)
    device = resolve_device(cfg.device, dist)
    checkpoint = load_resume_checkpoint(cfg, config, device) if cfg.init_from == 'resume' else None
    log_path = os.path.join(cfg.out_dir, 'log.jsonl')

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model = GPT(config).to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    torch.manual_seed(cfg.seed + dist.rank)  # dropout differs between processes
    autocast, scaler = mixed_precision(cfg.dtype, device)
    # every process draws the same data offsets and takes its own share of the micro-steps: no two processes
    # see the same windows, and N processes see exactly what one process with N times the micro-steps would
    sampler = torch.Generator().manual_seed(cfg.seed)
    eval_generator = torch.Generator().manual_seed(cfg.seed + 1)  # the same evaluation batches every time
    eval_offsets = {split: [random_offsets(open_tokens(data_dir, split), cfg.batch_size, cfg.block_size,
                                           eval_generator) for _ in range(cfg.eval_iters)]
                    for split in ('train', 'val')}

    iter_num, best_val_loss = 0, float('inf')
    if checkpoint is not None:
        model.load_state_dict(checkpoint['model'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        scaler.load_state_dict(checkpoint['scaler'])
        ranks = checkpoint['rng']
        restore_rng_state(ranks[dist.rank] if len(ranks) == dist.world_size else ranks[0], sampler)
        if len(ranks) != dist.world_size:
            torch.manual_seed(cfg.seed + dist.rank + checkpoint['iter_num'])
        iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
        if dist.master:
            truncate_log(log_path, iter_num)
            print(f"resuming from {os.path.join(cfg.out_dir, 'ckpt.pt')} at iteration {iter_num}")
        checkpoint = None  # free its memory
    start_iter = iter_num
    if dist.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print_startup(cfg, config, model, device, dist)
    train_model = torch.compile(model) if cfg.compile else model
    if dist.world_size > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == 'cuda' else None)
    if cfg.wandb_log and dist.master:
        import wandb
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))

    micro_steps = cfg.gradient_accumulation_steps // dist.world_size
    my_micro_steps = slice(dist.rank * micro_steps, (dist.rank + 1) * micro_steps)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    flops_per_iter = model.flops_per_token(cfg.block_size) * tokens_per_iter
    _, peak = peak_flops(device)
    step_seconds, steps_timed = 0.0, 0  # training time since the last log line, evaluation excluded
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr

        if (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and not (
                iter_num == start_iter and start_iter > 0):
            losses = estimate_loss(model, data_dir, eval_offsets, cfg.block_size, device, autocast, dist)
            if not math.isfinite(losses['val']):
                raise UserError(f"validation loss is {losses['val']} at iteration {iter_num}; stopped without "
                                f"saving (lower learning_rate or set grad_clip)")
            improved = losses['val'] < best_val_loss
            best_val_loss = min(best_val_loss, losses['val'])
            save = iter_num > 0 and (improved or cfg.always_save_checkpoint)
            rng_states = [rng_state(sampler)]
            if save and dist.world_size > 1:
                rng_states = [None] * dist.world_size
                torch.distributed.all_gather_object(rng_states, rng_state(sampler))
            if dist.master:
                print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                append_log(log_path, {'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val']})
                if cfg.wandb_log:
                    wandb.log({'iter': iter_num, 'train/loss_eval': losses['train'], 'val/loss': losses['val']})
                if save:
                    save_checkpoint(cfg.out_dir, {
                        'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                        'scaler': scaler.state_dict(), 'model_config': config.to_dict(), 'train_config': asdict(cfg),
                        'data_meta': meta, 'iter_num': iter_num, 'best_val_loss': best_val_loss,
                        'rng': rng_states}, cfg.keep_last_n)
        if iter_num >= cfg.max_iters:
            break

        step_start = time.time()
        tokens = open_tokens(data_dir, 'train')
        offsets = random_offsets(tokens, cfg.gradient_accumulation_steps * cfg.batch_size, cfg.block_size, sampler)
        loss_sum = torch.zeros((), device=device)
        for micro_step, batch in enumerate(offsets.view(-1, cfg.batch_size)[my_micro_steps]):
            if dist.world_size > 1:  # average gradients across processes only after the last micro-step
                train_model.require_backward_grad_sync = micro_step == micro_steps - 1
            x, y = read_windows(tokens, batch, cfg.block_size)
            with autocast:
                _, loss = train_model(to_device(x, device), to_device(y, device))
            scaler.scale(loss / micro_steps).backward()
            loss_sum += loss.detach()
        loss_value = all_reduce_sum([loss_sum.item()], dist, device)[0] / cfg.gradient_accumulation_steps
        if not math.isfinite(loss_value):
            raise UserError(f"training loss is {loss_value} at iteration {iter_num}; stopped without saving "
                            f"(lower learning_rate or set grad_clip)")
        logging = (iter_num + 1) % cfg.log_interval == 0
        grad_norm = None
        if cfg.grad_clip > 0 or logging:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float('inf')).item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        step_seconds += time.time() - step_start
        steps_timed += 1

        if logging and dist.master:
            seconds_per_iter = step_seconds / steps_timed
            record = {'iter': iter_num, 'loss': loss_value, 'lr': lr, 'grad_norm': grad_norm,
                      'ms_per_iter': 1000 * seconds_per_iter, 'tokens_per_sec': tokens_per_iter / seconds_per_iter,
                      'mfu': flops_per_iter / seconds_per_iter / (peak * dist.world_size) if peak else None}
            mfu = f"{record['mfu']:.1%}" if peak else 'unknown'
            print(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, grad norm {grad_norm:.3f}, "
                  f"{record['ms_per_iter']:.1f} ms/iter, {record['tokens_per_sec']:,.0f} tokens/s, MFU {mfu}")
            append_log(log_path, record)
            if cfg.wandb_log:
                wandb.log({f'train/{k}': v for k, v in record.items() if v is not None})
        if logging:
            step_seconds, steps_timed = 0.0, 0
    if dist.world_size > 1:  # leave together: a process that tears down its group while rank 0 still saves can abort
        torch.distributed.barrier()
    return best_val_loss


def main(argv):
    dist = None
    try:
        cfg = parse_config(argv)
        dist = setup_distributed()
        train(cfg, dist)
    except UserError as error:
        if dist is None or dist.master:
            print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if dist is not None and dist.world_size > 1:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
