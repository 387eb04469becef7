"""
A run's folder: its checkpoints (written in the background, atomically, with every process's random state), its
log.jsonl, and reading them back to resume.
"""

import glob
import json
import os
import shutil
import threading
import time

import torch

from configurator import UserError
from model import read_checkpoint


RUN_FILES = ('ckpt.pt', 'ckpt-*.pt', 'ckpt*.tmp', 'log.jsonl')  # what a run leaves in out_dir


def existing_run(out_dir):
    """What of a run out_dir holds, in words ('ckpt.pt, log.jsonl to iteration 300'), or None."""
    found = sorted({os.path.basename(path) for pattern in RUN_FILES
                    for path in glob.glob(os.path.join(glob.escape(out_dir), pattern))})
    if not found:
        return None
    iters = [record['iter'] for record in read_log(os.path.join(out_dir, 'log.jsonl'))]
    return ', '.join(found) + (f" to iteration {max(iters)}" if iters else '')


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
        raise UserError(f"init_from=resume but there is no {ckpt_path}; train from scratch first")
    try:
        return read_checkpoint(ckpt_path, mmap=True)
    except ValueError as error:
        raise UserError(str(error)) from None


def read_log(path):
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
                raise UserError(f"line {number} of {path} is not a JSON record; mend or delete that line") from None
            print(f"note: the last line of {path} was cut short (a run killed mid-write); it is left out")
    return records


def truncate_log(path, last_iter):
    """Drops log records after last_iter (written by a run that died after its last checkpoint), and a last line
    that a kill cut short."""
    records = [record for record in read_log(path) if record['iter'] <= last_iter]
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.writelines(json.dumps(record) + '\n' for record in records)
    os.replace(tmp, path)


_log_lock = threading.Lock()  # the checkpoint writer's thread logs too


def append_log(path, record):
    with _log_lock, open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


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


class CheckpointWriter:
    """Saves checkpoints in the background: save() copies the state into CPU memory (all that training waits for),
    then a thread writes it with save_checkpoint, atomically, while training goes on. One write at a time: a save
    waits for the previous write, and close() for the last one. A failed write raises on the next save or close."""

    def __init__(self, out_dir, keep_last_n, log_path):
        self.out_dir, self.keep_last_n, self.log_path = out_dir, keep_last_n, log_path
        self.thread, self.error = None, None

    def save(self, state):
        self.wait()
        start = time.perf_counter()
        state = to_cpu(state)  # copies: the live tensors keep changing while the thread writes
        copy_seconds = time.perf_counter() - start
        self.thread = threading.Thread(target=self._write, args=(state, copy_seconds), name='checkpoint-writer')
        self.thread.start()

    def _write(self, state, copy_seconds):
        try:
            start = time.perf_counter()
            save_checkpoint(self.out_dir, state, self.keep_last_n)
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
            raise UserError(f"writing a checkpoint to {self.out_dir} failed: {error}") from error

    def close(self):
        self.wait()


def to_cpu(state):
    """A copy of a (nested) state dict with every tensor copied into CPU memory."""
    if isinstance(state, torch.Tensor):
        return state.detach().to('cpu', copy=True)
    if isinstance(state, dict):
        return {key: to_cpu(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(value) for value in state)
    return state


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


def write_atomically(path, state):
    """torch.save to a temporary file, fsync, then rename: a crash mid-write never leaves a partial `path`."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
