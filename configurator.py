"""
The settings of train.py, sample.py and bench.py, from config files and --key=value arguments, and the checks of
train.py's (their ranges, and what a resumed run takes); the one error a user can fix and the one main wrapper, for
every script; the processes, devices and precisions a run uses.
"""

import ast
import datetime
import difflib
import importlib.util
import inspect
import os
import sys
import textwrap
import types
from contextlib import nullcontext
from dataclasses import dataclass
from typing import get_args

import torch


class UserError(Exception):
    """A problem the user can fix: run_main prints its one-sentence message and exits with exit_status."""
    exit_status = 1


def run_main(run, argv, usage=None):
    """Every script's exit status: run(argv), 0 when it returns; a UserError's one sentence on stderr and its
    exit_status. With usage, -h or --help prints usage() instead (argparse scripts answer those themselves)."""
    if usage is not None and ('-h' in argv or '--help' in argv):
        print(usage())
        return 0
    try:
        run(argv)
    except UserError as error:
        # every process reports its own error: on a multi-node run the failing rank may not be rank 0
        rank = int(os.environ.get('RANK', 0))
        print(f"{f'[rank {rank}] ' if rank else ''}error: {error}", file=sys.stderr)
        return error.exit_status
    return 0


# ----------------------------------------------------------------------------- settings

def read_settings(argv, setting_types, example='--max_iters=500'):
    """{setting: value} from command-line arguments: config files and --key=value, applied in order
    (a file that overrides an earlier --key=value is announced); each value checked against setting_types, a
    {name: type} of the script's settings."""
    values, given = {}, {}  # given: the value of each --key=value so far
    for arg in argv:
        if arg.startswith('--'):
            key, has_value, raw = arg[2:].partition('=')
            if not has_value or not key:
                raise UserError(f"malformed argument {arg!r}; write --key=value, e.g. {example}")
            values[key] = given[key] = check_value(key, parse_literal(raw, setting_types.get(key)), f"--{key}",
                                                   setting_types)
        elif arg.endswith('.py'):
            for key, value in read_config_file(arg).items():
                values[key] = check_value(key, value, arg, setting_types)
                if key in given and given.pop(key) != values[key] and os.environ.get('RANK', '0') == '0':
                    print(f"note: {arg} sets {key}={values[key]!r} over the earlier --{key}; arguments apply in "
                          f"order, so give --key=value after the config files")
        else:
            raise UserError(f"unexpected argument {arg!r}; give a config file ending in .py or --key=value")
    return values


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


def parse_literal(raw, declared):
    """The value a --key=value's text stands for: the text itself for a str setting, else True/False/None (any
    case) or a Python literal, else the text (which check_value then refuses, naming what was expected)."""
    if declared is not None and str in (get_args(declared) or (declared,)):
        return raw
    words = {'true': True, 'false': False, 'none': None}
    if raw.lower() in words:
        return words[raw.lower()]
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def check_value(key, value, source, setting_types):
    """Returns value as the type declared for key (an int is fine for a float); UserError otherwise."""
    if key not in setting_types:
        close = difflib.get_close_matches(key, setting_types, n=1)
        hint = f"did you mean {close[0]}?" if close else "run with --help to see the known settings"
        raise UserError(f"unknown setting {key!r} in {source}; {hint}")
    declared = setting_types[key]
    for kind in get_args(declared) or (declared,):
        if kind is type(None) and value is None:
            return None
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, bool):
            continue
        if kind is not type(None) and isinstance(value, kind):
            return value
    names = [t.__name__ for t in get_args(declared) or (declared,)]
    expected = ' or '.join('None' if n == 'NoneType' else 'an int' if n == 'int' else f"a {n}" for n in names)
    raise UserError(f"{key} expects {expected}, but {source} gives {value!r}")


def resumed_settings(saved, now, explicit, given, own, launch, out_dir):
    """The settings a resumed run goes on with: its own (`saved`), but the `launch` ones as given `now` and those the
    command line names (`explicit`), which may not change what makes the run itself (`own`: its model and seed);
    and the settings the command line changed, with their saved values, and a line on those that config files gave
    (`given`) and the run keeps."""
    refused = [k for k in own if k in explicit and now[k] is not None and now[k] != own[k]]
    if refused:
        raise UserError(f"{out_dir} holds a run with " + ', '.join(f"{k}={own[k]!r} (asked: {now[k]!r})"
                        for k in refused) + f"; a run keeps its model and seed: resume without --{' --'.join(refused)}"
                        f", or start a new run in another out_dir")
    settings = {k: v for k, v in saved.items() if k in now and k not in launch}
    changed = {k: settings[k] for k in explicit if k in settings and now[k] != settings[k]}
    kept = [k for k in given - explicit if k in settings and now[k] != settings[k]]
    lines = [f"note: config files do not change a resumed run; it keeps its own "
             f"{', '.join(f'{k}={settings[k]!r}' for k in kept)} over the files' "
             f"{', '.join(f'{k}={now[k]!r}' for k in kept)} (a --key=value changes one)"] if kept else []
    return {**settings, **{k: now[k] for k in (*explicit, *launch)}}, changed, lines


def settings_usage(doc, config_class, model_settings):
    """--help of a script that reads settings: its docstring, the settings class's own source (every setting with its
    default and comment), and the model's settings with their defaults."""
    source = inspect.getsource(config_class).split('    def ')[0]
    model = ', '.join(f"{key}={value!r}" for key, value in model_settings.items())
    return (f"{doc.strip()}\n\nThe trainer's settings, with their defaults:\n{source.rstrip()}\n\nThe model's "
            f"settings (model.GPTConfig's fields, documented there), with their defaults:\n"
            + textwrap.fill(model, width=116, initial_indent='    ', subsequent_indent='    '))


def check_train_settings(cfg, values):
    """Refuses train.py's settings (cfg, a TrainConfig, made of the given `values`) that are out of range or do not go
    together, naming the first wrong one; the model's are GPTConfig's to check."""
    if values.get('global_batch_size') is not None and 'gradient_accumulation_steps' in values:
        raise UserError(f"global_batch_size ({values['global_batch_size']}) fixes the sequences per step and the "
                        f"trainer derives the micro-steps from it; drop gradient_accumulation_steps (lower batch_size "
                        f"to use less memory), or set --global_batch_size=None to count micro-steps yourself")
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


# ----------------------------------------------------------------------------- processes and devices

DTYPES = ('float32', 'bfloat16', 'float16', 'pure_bfloat16')  # training's
EVAL_DTYPES = ('float32', 'bfloat16')  # eval_layers.py's and sample.py's, over float32 weights


def autocast(dtype, device):
    """The context a forward pass runs in: torch.autocast for bfloat16 and float16 over float32 weights; none for
    float32, nor for pure_bfloat16, whose weights are bf16 themselves."""
    return nullcontext() if dtype in ('float32', 'pure_bfloat16') else torch.autocast(device.type,
                                                                                       dtype=getattr(torch, dtype))


def mixed_precision(dtype, device, tf32=True):
    """(autocast context, grad scaler) for dtype; also sets whether float32 matmuls on a GPU may use TF32 (a CPU's
    float32 stays exact)."""
    if device.type == 'cuda':
        torch.set_float32_matmul_precision('high' if tf32 else 'highest')
    return autocast(dtype, device), torch.amp.GradScaler(device.type, enabled=dtype == 'float16')


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    ddp: bool = False  # launched by torchrun: the model is wrapped in DDP, even with one process

    @property
    def master(self):
        return self.rank == 0


def setup_distributed(cfg):
    """(Distributed, device). Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set) joins the process group: NCCL when
    the resolved device is a GPU, gloo otherwise (so --device=cpu works under torchrun on a GPU node)."""
    if 'RANK' not in os.environ:
        return Distributed(), resolve_device(cfg.device, Distributed())
    dist = Distributed(int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE']), True)
    device = resolve_device(cfg.device, dist)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    # an explicit timeout: how long a process waits in a collective (for a slow rank, a long evaluation) before
    # the job fails, instead of NCCL's default of 10 minutes
    # device_id binds the group to this process's GPU: NCCL starts now, and barriers know the device
    torch.distributed.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo',
                                         timeout=datetime.timedelta(minutes=cfg.ddp_timeout_minutes),
                                         device_id=device if device.type == 'cuda' else None)
    return dist, device


def resolve_device(name, dist=None):
    """The torch device --device names ('auto': cuda when torch sees a GPU, else cpu; 'cuda' under torchrun: this
    process's GPU); UserError for any other than the cpu and the CUDA GPUs torch sees (mps, a GPU not there, a typo)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == 'auto':
        name = 'cuda' if gpus else 'cpu'
    if name == 'cuda' and dist is not None and dist.ddp:
        name = f'cuda:{dist.local_rank}'
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or not (device.type == 'cpu' or device.type == 'cuda' and (device.index or 0) < gpus):
        available = f"cpu and cuda (cuda:0 to cuda:{gpus - 1})" if gpus else "only cpu (it sees no CUDA GPU)"
        raise UserError(f"device {name!r} is not available here, where torch has {available}; use --device=cpu"
                        f"{' or --device=cuda' if gpus else ''}")
    return device


def synchronize(device):
    """Waits for the GPU's queued work; only where the loop waits anyway (logging, evaluating, saving)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def from_rank_0(value, dist):
    """Rank 0's value, in every process (a collective: all of them call it)."""
    if dist.ddp:
        shared = [value]
        torch.distributed.broadcast_object_list(shared, src=0)
        return shared[0]
    return value


def all_reduce(tensor, dist, op=None):
    """The tensor reduced over all processes (sum by default), in place; the tensor itself in a single process."""
    if dist.ddp:
        torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM)
    return tensor


# dense tensor-core peaks of one GPU in FLOP/s, from the vendors' datasheets: (the words of the device name, the
# 16-bit peak (bf16, or fp16 where the GPU has no bf16), the TF32 peak). A key matches when all its words are whole
# words of the name, so 'L4' does not match 'NVIDIA L40S'; longer keys are tried first.
PEAK_FLOPS = [(('H200', 'NVL'), 835e12, 418e12), (('H200',), 989e12, 495e12),
              (('H100', 'PCIe'), 756e12, 378e12), (('H100', 'NVL'), 835e12, 418e12), (('H100',), 989e12, 495e12),
              (('A100',), 312e12, 156e12), (('L40S',), 362e12, 183e12), (('L40',), 181e12, 90e12),
              (('L4',), 121e12, 60e12), (('A10',), 125e12, 62e12), (('V100',), 125e12, None)]


NO_BF16 = ('V100',)  # Volta has fp16 tensor cores only: bf16 runs without them


def peak_flops(device, dtype='bfloat16'):
    """(name, peak FLOP/s for dtype's matmuls) of the device, with peak None where unknown (every CPU, unlisted
    GPUs, bf16 on a V100, float32 on GPUs without TF32)."""
    if device.type != 'cuda':
        return 'cpu', None
    name = torch.cuda.get_device_name(device)
    words = set(name.replace('-', ' ').split())
    for key, half, tf32 in PEAK_FLOPS:
        if set(key) <= words:
            if dtype == 'float32':
                return name, tf32
            return name, None if 'bfloat16' in dtype and key[0] in NO_BF16 else half
    return name, None
