"""
HellaSwag, ARC, MMLU: reading, requests, scoring. The zero-shot multiple-choice benchmarks of eval_layers.py --task.

Each benchmark is read in its own format (its public file, downloaded once into data/tasks/downloads, or a local
copy); each choice becomes one request of token ids, scored by the summed log-likelihood of its tokens given the
prompt; acc takes the choice of largest sum, acc_norm of largest sum per UTF-8 byte, as the common harnesses do.
"""

import csv
import io
import json
import math
import os
import re
import shutil
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from hf import TokenizerUnavailable
from configurator import UserError


@dataclass
class Example:
    context: str
    continuations: list     # each choice as it is scored after the context, with its leading space
    label: int              # the index of the correct continuation


def records(path, task, parse):
    """parse(record) for each line of a jsonl file; UserError naming the first line that is not a task example."""
    examples = []
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                example = parse(json.loads(line))
                if not 0 <= example.label < len(example.continuations):
                    raise ValueError(f"label {example.label} of {len(example.continuations)} choices")
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
                raise UserError(f"line {number} of {path} is not a {task} example ({type(error).__name__}: "
                                f"{error}); give the benchmark's own file") from None
            examples.append(example)
    return examples


def hellaswag_text(text):
    """HellaSwag's clean-up as the common harnesses do it: WikiHow's ' [title]' markers become sentence breaks,
    other bracketed markers go, double spaces become one."""
    text = text.strip().replace(' [title]', '. ')
    return re.sub(r'\[.*?\]', '', text).replace('  ', ' ')


def parse_hellaswag(record):
    """A line of hellaswag_val.jsonl: the activity label and both parts of the context, then each ending."""
    context = record['activity_label'] + ': ' + record['ctx_a'] + ' ' + record['ctx_b'].capitalize()
    return Example(hellaswag_text(context), [' ' + hellaswag_text(ending) for ending in record['endings']],
                   int(record['label']))


def parse_arc(record):
    """An ARC question as AI2 distributes it ({'question': {'stem', 'choices': [{'text', 'label'}]}, 'answerKey'})
    or as the Hugging Face dataset's rows hold it ({'question', 'choices': {'text': [], 'label': []}, 'answerKey'})."""
    question = record['question']
    if isinstance(question, dict):
        stem = question['stem']
        texts, labels = [c['text'] for c in question['choices']], [c['label'] for c in question['choices']]
    else:
        stem, texts, labels = question, record['choices']['text'], record['choices']['label']
    return Example(f"Question: {stem}\nAnswer:", [' ' + text for text in texts], labels.index(record['answerKey']))


def read_mmlu(path):
    """MMLU's test files (rows: question, four choices, answer letter; no header), one per subject, named
    <subject>_test.csv: one of them, a folder of them, or the benchmark's data.tar. Zero-shot prompt of the MMLU
    paper; each choice is scored as its letter."""
    if os.path.isdir(path):
        files = [(name, read_text(os.path.join(path, name))) for name in sorted(os.listdir(path))
                 if name.endswith('.csv')]
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            files = [(os.path.basename(member.name), tar.extractfile(member).read().decode('utf-8'))
                     for member in sorted(tar.getmembers(), key=lambda m: m.name)
                     if member.isfile() and member.name.endswith('_test.csv') and '/test/' in member.name]
    else:
        files = [(os.path.basename(path), read_text(path))]
    examples = []
    for name, text in files:
        subject = name.removesuffix('.csv').removesuffix('_test').replace('_', ' ')
        for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if len(row) != 6 or row[5].strip() not in ('A', 'B', 'C', 'D'):
                raise UserError(f"row {number} of {name} is not an MMLU question (question, four choices, answer "
                                f"letter); give the benchmark's own file")
            question, *choices, answer = row
            options = ''.join(f"\n{letter}. {choice}" for letter, choice in zip('ABCD', choices))
            examples.append(Example(f"The following are multiple choice questions (with answers) about {subject}."
                                    f"\n\n{question.strip()}{options}\nAnswer:", [' A', ' B', ' C', ' D'],
                                    'ABCD'.index(answer.strip())))
    return examples


def read_text(path):
    with open(path, encoding='utf-8') as f:
        return f.read()


@dataclass
class Task:
    read: Callable          # path -> list of Example
    file: str               # the name of the download in TASK_CACHE
    url: str                # the benchmark's public file, or pages of rows from Hugging Face's dataset viewer
    source: str             # the file in words, for a user who fetches it by hand
    paged: bool = False     # url serves JSON pages of rows (saved as jsonl), not a file


# the public sources: HellaSwag's repository, MMLU's release; ARC's AI2 archive bundles a large corpus, so its rows
# come from the Hugging Face copy through the dataset viewer's API
ARC_ROWS = 'https://datasets-server.huggingface.co/rows?dataset=allenai%2Fai2_arc&split=test&config='
TASKS = {
    'hellaswag': Task(lambda path: records(path, 'hellaswag', parse_hellaswag), 'hellaswag_val.jsonl',
                      'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl',
                      "that file (hellaswag_val.jsonl of github.com/rowanz/hellaswag)"),
    'arc_easy': Task(lambda path: records(path, 'arc_easy', parse_arc), 'arc_easy_test.jsonl',
                     ARC_ROWS + 'ARC-Easy', "ARC-Easy's test questions as jsonl (AI2's ARC-Easy-Test.jsonl, or the "
                     "rows of the Hugging Face dataset allenai/ai2_arc)", paged=True),
    'arc_challenge': Task(lambda path: records(path, 'arc_challenge', parse_arc), 'arc_challenge_test.jsonl',
                          ARC_ROWS + 'ARC-Challenge', "ARC-Challenge's test questions as jsonl (AI2's "
                          "ARC-Challenge-Test.jsonl, or the rows of the Hugging Face dataset allenai/ai2_arc)",
                          paged=True),
    'mmlu': Task(read_mmlu, 'mmlu_data.tar', 'https://people.eecs.berkeley.edu/~hendrycks/data.tar',
                 "that file (MMLU's data.tar)"),
}
TASK_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'tasks', 'downloads')


def download(task, path):
    """The task's file, downloaded once to path (written under another name, then renamed; removed if it fails)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + '.partial'
    try:
        with open(partial, 'wb') as f:
            if task.paged:
                offset, total = 0, 1
                while offset < total:
                    with urllib.request.urlopen(f"{task.url}&offset={offset}&length=100", timeout=60) as response:
                        page = json.load(response)
                    if not page['rows']:
                        break
                    total = page['num_rows_total']
                    f.write(''.join(json.dumps(row['row']) + '\n' for row in page['rows']).encode())
                    offset += len(page['rows'])
            else:
                with urllib.request.urlopen(task.url, timeout=60) as response:
                    shutil.copyfileobj(response, f)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


def read_task(name, task_file, limit):
    """The task's examples from task_file or from the cached download; with limit, that many spread evenly over
    the file (every k-th), so that a subset of MMLU spans its subjects."""
    task = TASKS[name]
    path = task_file or os.path.join(TASK_CACHE, task.file)
    if task_file and not os.path.exists(task_file):
        raise UserError(f"--task_file {task_file} does not exist; give a local copy of {name}'s file")
    if not os.path.exists(path):
        print(f"downloading {name} from {task.url}", file=sys.stderr)
        try:
            download(task, path)
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"could not download {name} from {task.url} ({error}); place {task.source} at {path}, "
                            f"or pass --task_file FILE") from None
    try:
        examples = task.read(path)
    except (OSError, UnicodeDecodeError, tarfile.TarError) as error:
        raise UserError(f"cannot read {path} as {name}'s file ({error})") from None
    if not examples:
        raise UserError(f"{path} holds no {name} examples; give the benchmark's own file")
    if limit and limit < len(examples):
        examples = [examples[i * len(examples) // limit] for i in range(limit)]
    return examples


def task_requests(examples, loaded, task, block_size):
    """(token ids, continuation length) for each choice of each example, in order: the context's tokens, then the
    continuation's as the tokens of context + continuation beyond the context's own (as the common harnesses split
    them), cut from the left to block_size + 1 tokens."""
    if loaded.encode is None:
        raise UserError(f"no tokenizer for {loaded.name} is available offline, so it cannot read {task}; add its "
                        f"tokenizer.json to the folder")
    requests = []
    for number, example in enumerate(examples, start=1):
        try:
            context = loaded.encode(example.context)
            continuations = [loaded.encode(example.context + c)[len(context):] for c in example.continuations]
        except TokenizerUnavailable:  # not the example's fault: the sentence says what to install or set
            raise
        except UserError as error:
            raise UserError(f"{task} example {number}: {error}; a character-level model reads only text made of its "
                            f"training characters") from None
        if not context or not all(continuations):
            raise UserError(f"{task} example {number} has an empty context or choice once tokenized")
        for continuation in continuations:
            ids = (context + continuation)[-(block_size + 1):]
            requests.append((ids, min(len(continuation), len(ids) - 1)))
    return requests


@torch.no_grad()
def choice_loglikelihoods(model, requests, batch_size, device, autocast, skip_layers=(), progress=None):
    """The summed log-probability of each request's continuation tokens given the tokens before them. Batches are
    padded on the right, which a causal model never sees from earlier positions."""
    scores = []
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        x = torch.zeros(len(batch), max(len(ids) for ids, _ in batch) - 1, dtype=torch.long)
        for row, (ids, _) in enumerate(batch):
            x[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        with autocast:
            logits, _ = model(x.to(device), skip_layers=skip_layers)
        log_probs = logits.float().log_softmax(dim=-1).cpu()
        for row, (ids, count) in enumerate(batch):
            positions = torch.arange(len(ids) - 1 - count, len(ids) - 1)
            scores.append(log_probs[row, positions, torch.tensor(ids[-count:])].sum().item())
        if progress is not None:
            progress.update(1)
    return scores


def accuracies(examples, scores):
    """acc: how often the choice of highest summed log-likelihood is correct; acc_norm: the same with each sum
    divided by the continuation's length in UTF-8 bytes. Standard errors of the mean over examples."""
    correct, correct_norm, start = [], [], 0
    for example in examples:
        sums = np.array(scores[start:start + len(example.continuations)])
        lengths = np.array([len(c.encode('utf-8')) for c in example.continuations])
        correct.append(float(np.argmax(sums) == example.label))
        correct_norm.append(float(np.argmax(sums / lengths) == example.label))
        start += len(example.continuations)
    return {'acc': float(np.mean(correct)), 'acc_stderr': standard_error(correct),
            'acc_norm': float(np.mean(correct_norm)), 'acc_norm_stderr': standard_error(correct_norm)}


def standard_error(values):
    """Sample standard deviation / sqrt(n), as the common harnesses report; None for a single example."""
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def evaluate_task(model, task, examples, requests, batch_size, device, autocast, progress=True):
    """Accuracy of the full model and with each block skipped in turn (the paper's Figure 1)."""
    model.eval()
    L = model.config.n_layer
    batches = math.ceil(len(requests) / batch_size)
    with tqdm(total=(L + 1) * batches, desc=task, leave=False, disable=None if progress else True) as bar:
        full = accuracies(examples, choice_loglikelihoods(model, requests, batch_size, device, autocast,
                                                          progress=bar))
        layers = []
        for l in range(1, L + 1):
            scores = choice_loglikelihoods(model, requests, batch_size, device, autocast, {l}, progress=bar)
            without = accuracies(examples, scores)
            layers.append({'block': l, **without, 'acc_drop': full['acc'] - without['acc'],
                           'acc_norm_drop': full['acc_norm'] - without['acc_norm']})
    chance = float(np.mean([1 / len(example.continuations) for example in examples]))
    return {'name': task, 'examples': len(examples), 'chance': chance, **full, 'layers': layers}
