"""
A run's folder: its checkpoints (written in the background, atomically, with every process's random state), its
log.jsonl, and reading them back to resume; and the one loader of a model with its tokenizer, from a run folder, a
checkpoint file, a Hugging Face folder or a hub id, for eval_layers.py and sample.py.
"""

import contextlib
import errno
import fcntl
import glob
import json
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from configurator import UserError
from dataloader import resolve_data_dir
from model import GPT, read_checkpoint


# ----------------------------------------------------------------------------- a run folder

RUN_FILES = ('ckpt.pt', 'ckpt-*.pt', 'ckpt*.tmp', 'log.jsonl')  # what a run leaves in out_dir


def existing_run(out_dir):
    """What of a run out_dir holds, in words ('ckpt.pt, log.jsonl to iteration 300'), or None when it holds no
    checkpoint (a start stopped before its first save left at most a log, which a new run may replace)."""
    found = sorted({os.path.basename(path) for pattern in RUN_FILES
                    for path in glob.glob(os.path.join(glob.escape(out_dir), pattern))})
    if not any(name.endswith('.pt') for name in found):
        return None
    iters = [record['iter'] for record in read_log(os.path.join(out_dir, 'log.jsonl'))]
    return ', '.join(found) + (f" to iteration {max(iters)}" if iters else '')


@contextlib.contextmanager
def run_lock(out_dir):
    """Holds out_dir/train.lock while a run trains there, so that a second training into the same folder is refused.
    The kernel's lock (flock) goes with the process: a killed run leaves none behind (the file, which the next run
    locks anew). A refused run leaves no folder it made; an out_dir that is a file is left to the checks that name
    it."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        yield
        return
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'train.lock')
    with open(path, 'w') as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another training is writing to {out_dir} now; wait for it to end, or choose another "
                            f"out_dir") from None
        try:
            yield
        finally:
            os.remove(path)  # still held: no other run is using it
            if created and not os.listdir(out_dir):
                os.rmdir(out_dir)


def delete_run(out_dir):
    for pattern in RUN_FILES:
        for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            os.remove(path)


def load_resume_checkpoint(out_dir):
    """out_dir/ckpt.pt, loaded into CPU memory: RNG states must stay CPU tensors (set_rng_state takes no others),
    and no GPU holds a second copy of the weights and optimizer state. Memory-mapped, so that the processes of a
    node share one copy in the page cache instead of reading one each."""
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(ckpt_path):
        raise UserError(f"init_from=resume but there is no {ckpt_path} (a run stopped before its first save keeps "
                        f"none); train from scratch first")
    try:
        return read_checkpoint(ckpt_path, mmap=True)
    except ValueError as error:
        earlier = sorted(glob.glob(os.path.join(glob.escape(out_dir), 'ckpt-*.pt')))
        raise UserError(f"{error}; nothing was loaded or changed, and " + (
            f"earlier checkpoints remain ({', '.join(map(os.path.basename, earlier))}): copy one over ckpt.pt to "
            f"resume from it" if earlier else "no earlier checkpoint remains (keep_last_n keeps some)")) from None


def read_log(path, note_file=None):
    """The records of a log.jsonl ([] when there is none). A last line cut short (a kill or a full disk mid-write)
    is left out, with a word; a damaged line before it is a UserError naming it."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    records = []
    for number, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != lines[-1][0]:
                raise UserError(f"line {number} of {path} is not JSON; mend or delete that line") from None
            print(f"note: the last line of {path} was cut short (a run killed mid-write); it is left out",
                  file=note_file or sys.stdout)
    return records


def truncate_log(path, last_iter):
    """Drops log records after last_iter (written by a run that died after its last checkpoint), and a last line
    that a kill cut short."""
    records = [record for record in read_log(path) if record['iter'] <= last_iter]
    write_atomically(path, lambda f: f.writelines((json.dumps(record) + '\n').encode() for record in records))


_log_lock = threading.Lock()  # the checkpoint writer's thread logs too


def append_log(path, record):
    """One line of strict JSON (a non-finite number is written as null); a failed write (a full disk) is cut back
    off the log and ends the run in one sentence."""
    line = json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()})
    data = (line + '\n').encode()
    with _log_lock, open(path, 'ab', buffering=0) as f:
        size = f.tell()
        try:
            if f.write(data) != len(data):  # unbuffered: a full disk may take part of the line
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            with contextlib.suppress(OSError):
                f.truncate(size)
            raise UserError(f"cannot write {path} ({error.strerror}); free space, then resume from the last "
                            f"checkpoint with --init_from=resume") from None


def rng_state(train_generator):
    # 'sampler': the training generator's state (it draws where each batch's sequences start)
    state = {'sampler': train_generator.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def gather_rng_states(train_generator, dist):
    """Every process's random state, gathered on every process (a collective: all of them call it)."""
    if not dist.ddp:
        return [rng_state(train_generator)]
    states = [None] * dist.world_size
    torch.distributed.all_gather_object(states, rng_state(train_generator))
    return states


def restore_rng_state(state, train_generator):
    train_generator.set_state(state['sampler'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


class CheckpointWriter:
    """Saves checkpoints in the background: save() copies the state into CPU memory (all that training waits for),
    then a thread writes it with save_checkpoint, atomically, while training goes on. One write at a time: a save
    waits for the previous write, and close() for the last one. A failed write raises on the next save or close."""

    def __init__(self, out_dir, keep_last_n, log_path, saved_iter=None):
        self.out_dir, self.keep_last_n, self.log_path = out_dir, keep_last_n, log_path
        self.saved_iter = saved_iter  # the iteration ckpt.pt holds (a resumed run's), kept as ckpt-<it>.pt
        self.thread, self.error = None, None
        self.buffers = {}  # the CPU copy of each tensor, by its place in the state: allocated once, reused

    def save(self, state):
        self.wait()  # the buffers are free again once the last write has ended
        start = time.perf_counter()
        state = self.copy(state)  # copies: the live tensors keep changing while the thread writes
        copied = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            copied = torch.cuda.Event()  # the copies run on the stream, ahead of the next step's changes
            copied.record()
        copy_seconds = time.perf_counter() - start
        self.thread = threading.Thread(target=self._write, args=(state, copy_seconds, copied),
                                       name='checkpoint-writer')
        self.thread.start()

    def copy(self, value, place=()):
        """value with each tensor copied into its buffer, pinned for a GPU tensor so that the copy does not block
        (8 to 16 GB at 1B: fresh pageable memory on every save would stall rank 0 while the others wait)."""
        if isinstance(value, torch.Tensor):
            buffer = self.buffers.get(place)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = self.buffers[place] = torch.empty(value.shape, dtype=value.dtype, pin_memory=value.is_cuda)
            return buffer.copy_(value.detach(), non_blocking=value.is_cuda)
        if isinstance(value, dict):
            return {key: self.copy(item, (*place, key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.copy(item, (*place, i)) for i, item in enumerate(value))
        return value

    def _write(self, state, copy_seconds, copied):
        try:
            start = time.perf_counter()
            if copied is not None:
                copied.synchronize()
            save_checkpoint(self.out_dir, state, self.keep_last_n, previous=self.saved_iter)
            self.saved_iter = state['iter_num']
            write_seconds = time.perf_counter() - start
            print(f"saved ckpt.pt at iteration {state['iter_num']}: {copy_seconds:.2f} s copying to CPU memory "
                  f"(training waited), {write_seconds:.2f} s writing in the background")
            append_log(self.log_path, {'iter': state['iter_num'], 'checkpoint_copy_seconds': copy_seconds,
                                       'checkpoint_write_seconds': write_seconds})
        except BaseException as error:  # handed to the training thread
            self.error = error

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            # torch reports a full disk as "[enforce fail at inline_container.cc:...] . ... file write failed"
            reason = error.strerror if isinstance(error, OSError) else str(error).split('] . ')[-1].strip()
            raise UserError(f"writing a checkpoint to {self.out_dir} failed ({reason}); its ckpt.pt, if any, is "
                            f"the last complete save: free space (a full disk?), then resume with "
                            f"--init_from=resume") from error

    def close(self):
        self.wait()


def save_checkpoint(out_dir, state, keep_last_n=0, previous=None):
    """Writes out_dir/ckpt.pt atomically. With keep_last_n, the checkpoint it replaces (that of iteration
    `previous`) stays as ckpt-<previous>.pt, and the keep_last_n newest of those are kept: ckpt.pt never shares its
    file with a numbered one, so copying a numbered checkpoint over it changes nothing else."""
    latest = os.path.join(out_dir, 'ckpt.pt')

    def keep_previous():
        if not keep_last_n or previous is None or not os.path.exists(latest):
            return
        numbered = os.path.join(out_dir, f"ckpt-{previous:07d}.pt")
        if not os.path.exists(numbered):
            try:
                os.link(latest, numbered)  # a second name for the file ckpt.pt is about to leave: no copy
            except OSError:
                shutil.copyfile(latest, numbered)
    write_atomically(latest, lambda f: torch.save(state, f), before_replace=keep_previous)
    numbered_files = sorted(glob.glob(os.path.join(glob.escape(out_dir), 'ckpt-*.pt')))
    for old in numbered_files[:len(numbered_files) - keep_last_n]:
        os.remove(old)


def write_atomically(path, write, before_replace=None):
    """write(file) into a temporary file, fsync, then rename (calling before_replace() just before): a crash
    mid-write never leaves a partial `path`."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)  # a full disk keeps no half-written file
        raise
    if before_replace is not None:
        before_replace()
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- a model and its tokenizer

@dataclass
class LoadedModel:
    name: str
    model: GPT
    tokenizer: str                      # 'char', 'gpt2', a Hugging Face model's folder name, or 'unknown'
    encode: Optional[Callable] = None   # text -> token ids, when a tokenizer is available offline
    decode: Optional[Callable] = None   # token ids -> text
    description: str = ''
    chars: Optional[str] = None         # a character-level tokenizer's characters, in id order
    trained_on: Optional[str] = None    # the data folder the checkpoint was trained on, when it records one
    training_log: Optional[str] = None  # the run's log.jsonl beside the checkpoint, when there is one
    data_fingerprint: Optional[str] = None  # dataloader.data_fingerprint of trained_on when it trained, if recorded


class TokenizerUnavailable(UserError):
    """A tokenizer whose tables are not on this machine: each script adds its own way around, if it has one."""


def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as error:
        raise TokenizerUnavailable(f"tiktoken's gpt2 encoding is not available offline ({type(error).__name__}); "
                                   f"set TIKTOKEN_CACHE_DIR to a folder holding its cached files") from None


def gpt2_encode():
    return gpt2_encoding().encode_ordinary


def gpt2_decode(ids):
    encoding = gpt2_encoding()
    # a vocabulary padded for speed (50304) has ids that no text maps to; a barely trained model may sample them
    return encoding.decode([i for i in ids if i < encoding.n_vocab])


def char_encode(chars, name):
    index = {c: i for i, c in enumerate(chars)}

    def encode(text):
        unknown = sorted(set(text) - set(index))
        if unknown:
            shown = repr(''.join(unknown[:10])) + (' and others' if len(unknown) > 10 else '')
            raise UserError(f"the text has {len(unknown)} distinct character{'s' if len(unknown) > 1 else ''} "
                            f"{shown} that {name} never saw in training")
        return [index[c] for c in text]
    return encode


def char_decode(chars):
    return lambda ids: ''.join(chars[i] if i < len(chars) else '\ufffd' for i in ids)


def load_our_checkpoint(path, name, device):
    try:
        checkpoint = read_checkpoint(path)
        model = GPT.from_checkpoint(checkpoint).to(device)
    except ValueError as error:
        raise UserError(str(error)) from None
    meta = checkpoint.get('data_meta') or {}
    tokenizer, chars = meta.get('tokenizer', 'unknown'), meta.get('chars')
    encode = decode = None
    if tokenizer == 'char':
        if not isinstance(chars, str):
            raise UserError(f"{path} records a character tokenizer without its characters; it was not written by "
                            f"train.py, or its data folder's meta.json lacked them")
        encode, decode = char_encode(chars, name), char_decode(chars)
    elif tokenizer == 'gpt2':  # tiktoken's tables are loaded only when text is encoded or decoded
        encode, decode = (lambda text: gpt2_encode()(text)), gpt2_decode
    train_config = checkpoint.get('train_config') or {}
    trained_on = (resolve_data_dir(train_config.get('data_dir'), train_config['dataset'])
                  if train_config.get('dataset') else train_config.get('data_dir') or None)
    config = model.config
    description = (f"{config.arch} {config.norm_scheme}, {config.n_layer} blocks, {model.num_params():,} parameters, "
                   f"iteration {checkpoint.get('iter_num', '?')}")
    log = os.path.join(os.path.dirname(os.path.abspath(path)), 'log.jsonl')
    return LoadedModel(name, model, tokenizer, encode, decode, description, chars if tokenizer == 'char' else None,
                       trained_on, log if os.path.isfile(log) else None, checkpoint.get('data_fingerprint'))


def load_hf_folder(folder, name, device):
    from hf import from_hf
    try:
        model = from_hf(folder, device=device)
    except ValueError as error:
        raise UserError(str(error)) from None
    with open(os.path.join(folder, 'config.json')) as f:
        model_type = json.load(f).get('model_type')
    tokenizer, encode, decode = os.path.basename(os.path.normpath(folder)), None, None
    chars = exported_chars(folder) if os.path.exists(os.path.join(folder, 'tokenizer.json')) else None
    if chars is not None:
        # hf.py's export of a character-level run, read with the run's own table: the tokenizers library would drop
        # a character it never saw (in folders exported before hf.py made it refuse them), this table refuses it
        tokenizer, encode, decode = 'char', char_encode(chars, name), char_decode(chars)
    elif os.path.exists(os.path.join(folder, 'tokenizer.json')):
        # the folder's own tokenizer; GPT-2's (50257 tokens) reads the same ids as data prepared with tiktoken
        encode, decode, vocab_size = hf_tokenizer(folder)
        if model_type == 'gpt2' and vocab_size == 50257:
            tokenizer = 'gpt2'
    elif model_type == 'gpt2':
        tokenizer, encode, decode = 'gpt2', (lambda text: gpt2_encode()(text)), gpt2_decode
    description = f"Hugging Face {model_type}, {model.config.n_layer} blocks, {model.num_params():,} parameters"
    return LoadedModel(name, model, tokenizer, encode, decode, description, chars)


def exported_chars(folder):
    """The characters, in id order, of a folder's tokenizer.json when it is a character table as hf.py writes one (a
    BPE whose vocabulary is single characters numbered 0..n-1, with no merges, normalizer or pre-tokenizer); else
    None."""
    path = os.path.join(folder, 'tokenizer.json')
    try:
        with open(path, encoding='utf-8') as f:
            spec = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"cannot read {path} as JSON ({error}); export the model again") from None
    model = spec.get('model') if isinstance(spec, dict) else None
    vocab = model.get('vocab') if isinstance(model, dict) else None
    if (not isinstance(vocab, dict) or model.get('type') != 'BPE' or model.get('merges') or spec.get('normalizer')
            or spec.get('pre_tokenizer') or spec.get('added_tokens') or not all(len(c) == 1 for c in vocab)
            or sorted(vocab.values()) != list(range(len(vocab)))):
        return None
    return ''.join(sorted(vocab, key=vocab.get))


def hf_tokenizer(folder):
    """encode, decode and vocabulary size of a folder's tokenizer.json."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError(f"{folder} has a tokenizer.json but the tokenizers package is not installed; "
                        f"pip install tokenizers to read it") from None
    tokenizer = Tokenizer.from_file(os.path.join(folder, 'tokenizer.json'))
    return (lambda text: tokenizer.encode(text, add_special_tokens=False).ids, tokenizer.decode,
            tokenizer.get_vocab_size())


def load_model(spec, device, name=None):
    """Our run folder or checkpoint file, a Hugging Face folder, or a hub id; name defaults to run_names'."""
    name = name or run_names([spec])[0]
    if os.path.isdir(spec) and os.path.exists(os.path.join(spec, 'ckpt.pt')):
        return load_our_checkpoint(os.path.join(spec, 'ckpt.pt'), name, device)
    if os.path.isdir(spec) and os.path.exists(os.path.join(spec, 'config.json')):
        return load_hf_folder(spec, name, device)
    if os.path.isfile(spec):
        return load_our_checkpoint(spec, name, device)
    if os.path.isdir(spec):
        raise UserError(f"{spec} has neither ckpt.pt (a run of train.py) nor config.json (a Hugging Face model)")
    if spec.count('/') == 1 and not looks_local(spec):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise UserError(f"{spec} is not a local path; to download it as a hub id, pip install "
                            f"huggingface_hub") from None
        try:
            folder = snapshot_download(spec, allow_patterns=['*.json', '*.safetensors'])
        except Exception as error:
            raise UserError(f"could not download {spec} from the hub ({type(error).__name__}); "
                            f"download it yourself and pass the folder") from None
        return load_hf_folder(folder, name, device)
    raise UserError(f"{spec} does not exist (no such folder or file); give a run folder, a ckpt.pt, a Hugging Face "
                    f"folder or a hub id (owner/name)")


def looks_local(spec):
    """Whether an 'owner/name' that does not exist here was meant as a local path, not a hub id: it starts with '.',
    '/' or '~', ends in .pt, or its first folder exists here (out/lns2, when out/ exists, is a missing run, not a
    model of a hub user named 'out')."""
    return spec.startswith(('.', '/', '~')) or spec.endswith('.pt') or os.path.exists(spec.split('/')[0])


def run_names(specs):
    """Short names for tables and legends: a run's folder name (for a checkpoint file other than ckpt.pt, the folder
    and the file's stem), with parent folders added to names that coincide; a hub id stays whole."""
    paths, depths = [], []
    for spec in specs:
        parts = os.path.normpath(os.path.abspath(spec)).split(os.sep) if os.path.exists(spec) else [spec]
        if os.path.isfile(spec) and parts[-1] != 'ckpt.pt':
            parts, depth = parts[:-1] + [os.path.splitext(parts[-1])[0]], 2
        else:
            parts, depth = (parts[:-1] if os.path.isfile(spec) else parts), 1
        paths.append(parts)
        depths.append(depth)
    while True:
        names = ['/'.join(parts[-depth:]) for parts, depth in zip(paths, depths)]
        clashing = [i for i, name in enumerate(names) if names.count(name) > 1 and depths[i] < len(paths[i])]
        if not clashing:
            return names
        for i in clashing:
            depths[i] += 1
