"""
A run's folder: its checkpoints (written in the background, atomically, with every process's random state), its
log.jsonl, and reading them back to resume.
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

import torch

from configurator import UserError
from model import read_checkpoint


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


def out_dir_problem(out_dir, init_from, overwrite):
    """Why out_dir cannot take a run, in one sentence, or None."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        return f"out_dir {out_dir} exists and is not a folder; choose another out_dir"
    found = existing_run(out_dir)
    if init_from == 'scratch' and found and not overwrite:
        return (f"{out_dir} already holds a run ({found}); resume it with --init_from=resume, or start over with "
                f"--overwrite=True, which deletes it (or choose another --out_dir)")
    return None


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


def check_same_data(checkpoint, meta, fingerprint, data_dir, out_dir):
    """Refuses to resume the checkpoint's run on other data than it trained on."""
    saved_meta = checkpoint.get('data_meta')
    if saved_meta is not None and saved_meta != meta:
        keys = sorted(k for k in set(saved_meta) | set(meta) if saved_meta.get(k) != meta.get(k))
        raise UserError(f"{data_dir} holds other data than the run in {out_dir} trained on (its meta.json differs "
                        f"in {', '.join(keys)}); point data_dir at the data it trained on (or prepare that again), "
                        f"or start a new run")
    if checkpoint.get('data_fingerprint', fingerprint) != fingerprint:
        raise UserError(f"train.bin or val.bin in {data_dir} differ from the data the run in {out_dir} trained on "
                        f"(meta.json is the same); point data_dir at the run's data, or start a new run")


def restore_state(checkpoint, model, optimizer, scaler, train_generator, seed, dist, out_dir):
    """Weights, optimizer, scaler and random states from a checkpoint loaded on the CPU; the log cut back to its
    iteration (the records after it are of steps taken again now)."""
    model.load_state_dict(checkpoint['model'])  # copies onto the model's device
    optimizer.load_state_dict(checkpoint['optimizer'])  # moves the state to its parameters' device
    scaler.load_state_dict(checkpoint['scaler'])
    ranks = checkpoint['rng']
    restore_rng_state(ranks[dist.rank] if len(ranks) == dist.world_size else ranks[0], train_generator)
    if len(ranks) != dist.world_size:  # another process count: the data order is kept, dropout draws fresh
        torch.manual_seed(seed + dist.rank + checkpoint['iter_num'])
    if dist.master:
        truncate_log(os.path.join(out_dir, 'log.jsonl'), checkpoint['iter_num'])
        print(f"resuming from {os.path.join(out_dir, 'ckpt.pt')} at iteration {checkpoint['iter_num']}")


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
