"""
Which layers matter? The paper's layer analyses, for our checkpoints and for pretrained Hugging Face models.

    python eval_layers.py out/pre out/lns --plot plots --json layers.json
    python eval_layers.py path/to/gpt2 --text ../shared/data/wikitext-2/valid.txt
    python eval_layers.py path/to/Qwen2.5-0.5B --task hellaswag --task_limit 200 --plot plots

MODEL is a run folder (with ckpt.pt), a checkpoint file, a Hugging Face model folder (config.json and
*.safetensors: GPT-2, Llama, Mistral, Qwen2) or, with huggingface_hub installed, a hub id. Every model is
measured on the same windows of the same tokens: the first --tokens of --data's validation split, of --text, or,
with neither, of the validation split the checkpoints were trained on (refused if that folder was prepared again
since, as the fingerprint a checkpoint records shows):
- layer drop: the loss with block l skipped (the other blocks keep their own 1/sqrt(l) under LNS), for every l;
  with --last_k K also with the last 1..K blocks skipped together;
- angular distance arccos(cos(x_l, x_{l+n}))/pi between the residual streams entering blocks l and l+n, per
  token, averaged over tokens, for n = 1..--max_distance (x_{L+1} is the last block's output);
- per block: the variance of the residual stream after it, its mean norm, and |update| / |input|.
With --task (hellaswag, arc_easy, arc_challenge, mmlu), zero-shot multiple-choice accuracy of the full model and
with each block skipped (the paper's Figure 1); the loss analyses then run only when --data or --text is given.
Block numbers are 1-based, as in the paper.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import read_log
from hf import TokenizerUnavailable, load_model, run_names
from configurator import EVAL_DTYPES, UserError, autocast, resolve_device, run_main
from dataloader import data_fingerprint, open_tokens, read_meta
from tasks import TASKS, evaluate_task, read_task, task_requests


# ----------------------------------------------------------------------------- data


def char_difference(data_chars, model_chars):
    """How two character tables differ, in words: the characters only one of them has, or their order."""
    parts = [f"{len(only)} only in the {where} ({''.join(only[:10])!r})"
             for only, where in ((sorted(set(data_chars) - set(model_chars)), 'data'),
                                 (sorted(set(model_chars) - set(data_chars)), 'model')) if only]
    return ', '.join(parts) or 'the same characters with other ids'


def tokens_from_data_folder(folder, loaded, budget):
    meta_path, val_path = os.path.join(folder, 'meta.json'), os.path.join(folder, 'val.bin')
    if not (os.path.exists(meta_path) and os.path.exists(val_path)):
        raise UserError(f"{folder} is not a prepared data folder (meta.json and val.bin); run its prepare.py first")
    meta = read_meta(folder)
    if loaded.tokenizer != 'unknown' and meta.get('tokenizer') != loaded.tokenizer:
        raise UserError(f"{folder} holds {meta.get('tokenizer')!r} tokens but {loaded.name} reads "
                        f"{loaded.tokenizer!r} tokens; pass --text FILE, or data prepared with its tokenizer")
    if loaded.chars is not None and meta['chars'] != loaded.chars:
        raise UserError(f"{folder}'s characters are not {loaded.name}'s: {char_difference(meta['chars'], loaded.chars)}"
                        f"; pass --text FILE, or the data it was trained on")
    if meta['vocab_size'] > loaded.model.config.vocab_size:
        raise UserError(f"{folder} has {meta['vocab_size']} token ids but {loaded.name} only "
                        f"{loaded.model.config.vocab_size}; they were not made with the same tokenizer")
    size = os.path.getsize(val_path)
    if size % 2 or not size:
        raise UserError(f"{val_path} is {size:,} bytes, not whole 2-byte tokens (a copy cut short?); prepare the "
                        f"data again")
    return np.array(open_tokens(folder, 'val')[:budget + 1], dtype=np.int64)


def tokens_from_text(path, loaded, budget):
    if loaded.encode is None:
        raise UserError(f"no tokenizer for {loaded.name} is available offline; add its tokenizer.json to the "
                        f"folder, or pass --data with a folder of its token ids (val.bin, and meta.json whose "
                        f"tokenizer is {loaded.tokenizer!r})")
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path} as UTF-8 text ({error})") from None
    try:
        ids = loaded.encode(text)
    except TokenizerUnavailable as error:
        raise UserError(f"{error}, or pass --data with a folder of its token ids") from None
    except UserError as error:
        raise UserError(f"{error}; use text from the same corpus or --data") from None
    return np.array(ids[:budget + 1], dtype=np.int64)


def measured_on(data, text):
    """What the losses are measured on, in a few words for a plot's axis: the text file, or the data folder's
    validation split."""
    return os.path.basename(text) if text else f"{os.path.basename(os.path.normpath(data or ''))}'s validation split"


def read_tokens(data, text, loaded, budget):
    """The first budget + 1 tokens of the data folder's validation split, or of the text file."""
    return tokens_from_data_folder(data, loaded, budget) if data else tokens_from_text(text, loaded, budget)


def recorded_data_folder(loaded):
    """The one data folder that every model was trained on (its validation split is the default); UserError when a
    model records none, when they differ, when the folder is not prepared, or when it was prepared again since (its
    fingerprint is not the one a model recorded)."""
    for m in loaded:
        if m.trained_on is None:
            raise UserError(f"{m.name} records no training data; pass --data FOLDER or --text FILE")
    folders = {os.path.realpath(m.trained_on): m for m in loaded}
    if len(folders) > 1:
        first, second = list(folders.values())[:2]
        raise UserError(f"{first.name} was trained on {first.trained_on} but {second.name} on {second.trained_on}; "
                        f"pass --data or --text to measure them on the same tokens")
    folder = loaded[0].trained_on
    if not all(os.path.exists(os.path.join(folder, name)) for name in ('meta.json', 'val.bin')):
        raise UserError(f"{loaded[0].name} was trained on {folder}, which is missing or not prepared (meta.json and "
                        f"val.bin); prepare it there, or pass --data or --text")
    recorded = [m for m in loaded if m.data_fingerprint]
    if recorded and not os.path.exists(os.path.join(folder, 'train.bin')):
        print(f"note: {folder} has no train.bin, so whether it is still the data {recorded[0].name} trained on "
              f"cannot be checked", file=sys.stderr)
    elif recorded:
        fingerprint = data_fingerprint(folder)
        for m in recorded:
            if m.data_fingerprint != fingerprint:
                readable = m.chars is None or read_meta(folder).get('chars') == m.chars  # its tokens mean the same
                raise UserError(f"{folder} was prepared again since {m.name} trained on it (its data fingerprint "
                                f"differs), so the run trained on other data; " + (
                                    f"pass --data {folder} to measure on it anyway, or --text FILE" if readable else
                                    "its characters are not the run's either: pass --text FILE to measure it"))
    return folder


def windows(tokens, block_size):
    """Non-overlapping (input, target) windows of block_size tokens, from the start of the tokens."""
    count = (len(tokens) - 1) // block_size
    if count < 1:
        raise UserError(f"only {len(tokens)} tokens: fewer than one window of {block_size}; lower --block_size")
    t = torch.from_numpy(tokens)
    x = torch.stack([t[i * block_size:(i + 1) * block_size] for i in range(count)])
    y = torch.stack([t[i * block_size + 1:(i + 1) * block_size + 1] for i in range(count)])
    return x, y


# ----------------------------------------------------------------------------- the analyses

def angular_distance(a, b):
    """arccos(cos(a, b)) / pi along the last dimension: 0 for the same direction, 1 for opposite ones."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


@torch.no_grad()
def analyze(model, x, y, batch_size, device, autocast, max_distance, last_k, progress=True):
    """Every per-model number of the module docstring, each averaged over all tokens of (x, y)."""
    model.eval()
    L = model.config.n_layer
    N = min(max_distance, L)
    tokens = x.numel()
    base_loss = 0.0
    drop_loss = [0.0] * L                # loss with block l (index l-1) skipped
    cumulative_loss = [0.0] * min(last_k, L)
    # sums on the model's device: the residuals' sums are tensors there, which a CPU tensor cannot take in place
    distance = torch.zeros(L, N, dtype=torch.float64, device=device)  # [l-1, n-1]: block l's input vs block l+n's
    square_sum, value_sum, norm_sum, update_sum = torch.zeros(4, L + 1, dtype=torch.float64, device=device)
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    for xb, yb in tqdm(batches, desc='batches', leave=False, disable=None if progress else True):
        xb, yb = xb.to(device), yb.to(device)
        weight = xb.numel() / tokens
        with autocast:
            _, loss, residuals = model(xb, yb, return_residuals=True)
        base_loss += loss.item() * weight
        residuals = [r.double() for r in residuals]
        for l, r in enumerate(residuals):
            value_sum[l] += r.sum()
            square_sum[l] += r.pow(2).sum()
            norm_sum[l] += r.norm(dim=-1).sum()
            if l > 0:
                update_sum[l] += ((r - residuals[l - 1]).norm(dim=-1) / residuals[l - 1].norm(dim=-1)).sum()
        for l in range(1, L + 1):
            for n in range(1, min(N, L + 1 - l) + 1):
                distance[l - 1, n - 1] += angular_distance(residuals[l - 1], residuals[l - 1 + n]).sum()
        for l in range(1, L + 1):
            with autocast:
                drop_loss[l - 1] += model(xb, yb, skip_layers={l})[1].item() * weight
        for k in range(1, len(cumulative_loss) + 1):
            with autocast:
                cumulative_loss[k - 1] += model(xb, yb, skip_layers=set(range(L - k + 1, L + 1)))[1].item() * weight
    positions = tokens  # residual vectors per block
    elements = positions * model.config.n_embd
    variance = (square_sum / elements - (value_sum / elements).pow(2)).tolist()
    mean_norm = (norm_sum / positions).tolist()
    update_ratio = (update_sum / positions).tolist()
    distance = (distance / positions)
    heatmap = [[distance[l - 1, n - 1].item() if l + n <= L + 1 else None for n in range(1, N + 1)]
               for l in range(1, L + 1)]
    layers = [{'block': l, 'loss_without': drop_loss[l - 1], 'loss_drop': drop_loss[l - 1] - base_loss,
               'perplexity_without': math.exp(drop_loss[l - 1]), 'angular_distance_next': heatmap[l - 1][0],
               'variance': variance[l], 'mean_norm': mean_norm[l], 'update_ratio': update_ratio[l]}
              for l in range(1, L + 1)]
    return {'n_layer': L, 'tokens': tokens, 'base_loss': base_loss, 'base_perplexity': math.exp(base_loss),
            'embedding_variance': variance[0], 'embedding_mean_norm': mean_norm[0], 'layers': layers,
            'angular_distance': heatmap,
            'cumulative_drop': [{'last_k': k, 'loss_without': cumulative_loss[k - 1],
                                 'loss_drop': cumulative_loss[k - 1] - base_loss}
                                for k in range(1, len(cumulative_loss) + 1)]}


# ----------------------------------------------------------------------------- output

def format_table(results):
    """One header line per model, then one table: per block, each model's loss drop, distance and variance, and
    its task accuracies with the block removed."""
    lines = [f"[{i}] {r['name']}: {summary(r)}" for i, r in enumerate(results, start=1)]
    loss, task = 'layers' in results[0], 'task' in results[0]
    titles = ([('drop', 8), ('ang.next', 8), ('variance', 10)] if loss else []) + \
             ([('acc', 6), ('acc_norm', 8)] if task else [])
    header = f"{'block':>5}" + ''.join(f" | [{i}]" + ''.join(f" {t:>{w}}" for t, w in titles)
                                        for i in range(1, len(results) + 1))
    legend = []
    if loss:
        legend.append("drop: loss increase with the block removed; ang.next: angular distance between the block's "
                      "input and output; variance: residual stream after the block")
    if task:
        legend.append(f"acc, acc_norm: {results[0]['task']['name']} accuracy with the block removed")
    lines += [''] + legend + [header, '-' * len(header)]
    for l in range(1, max(r['n_layer'] for r in results) + 1):
        row = f"{l:>5}"
        for i, r in enumerate(results, start=1):
            cells = ''
            if l <= r['n_layer']:
                if loss:
                    layer = r['layers'][l - 1]
                    cells += (f" {layer['loss_drop']:>+8.4f} {layer['angular_distance_next']:>8.3f} "
                              f"{layer['variance']:>10.4g}")
                if task:
                    layer = r['task']['layers'][l - 1]
                    cells += f" {layer['acc']:>6.3f} {layer['acc_norm']:>8.3f}"
            row += f" | {'':{len(str(i)) + 2}}" + cells.ljust(sum(w + 1 for _, w in titles))
        lines.append(row.rstrip())
    last_k = max(len(r.get('cumulative_drop', [])) for r in results)
    if last_k:
        header = f"{'last k':>6}" + ''.join(f" | [{i}] {'drop':>8}" for i in range(1, len(results) + 1))
        lines += ['', 'drop: loss increase with the last k blocks removed together', header, '-' * len(header)]
        for k in range(1, last_k + 1):
            cells = [f"{r['cumulative_drop'][k - 1]['loss_drop']:>+8.4f}" if k <= len(r['cumulative_drop'])
                     else ' ' * 8 for r in results]
            lines.append((f"{k:>6}" + ''.join(f" | {'':{len(str(i)) + 2}} {cell}"
                                              for i, cell in enumerate(cells, start=1))).rstrip())
    return '\n'.join(lines)


def summary(r):
    """The model, and its full-model numbers: loss and perplexity, task accuracies with standard errors."""
    parts = [r['description']]
    if 'base_loss' in r:
        parts.append(f"{r['tokens']:,} tokens, loss {r['base_loss']:.4f}, perplexity {r['base_perplexity']:.2f}")
    if 'task' in r:
        t = r['task']
        parts.append(f"{t['name']} on {t['examples']} examples (chance {t['chance']:.3f}): "
                     f"acc {with_error(t['acc'], t['acc_stderr'])}, "
                     f"acc_norm {with_error(t['acc_norm'], t['acc_norm_stderr'])}")
    return '; '.join(parts)


def with_error(value, stderr):
    return f"{value:.3f}" if stderr is None else f"{value:.3f} ± {stderr:.3f}"


def variance_during_training(log_path):
    """The per-block residual variance train.py logged at each evaluation: [{'iter', 'block_variance'}, ...]. A last
    line cut short (a run killed mid-write, a full disk) is skipped with a note; UserError for any other bad line."""
    return [{'iter': r['iter'], 'block_variance': r['block_variance']} for r in read_log(log_path, sys.stderr)
            if isinstance(r, dict) and 'block_variance' in r]


def write_plots(results, folder, measured_on='the validation split'):
    """PNGs with titles, axes and legends; every range follows the data. Layer drop, angular distance (heatmaps
    and n = 1) and variance with the loss analyses, whose losses are measured_on (words for the axis); accuracy per
    removed block with a task."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    os.makedirs(folder, exist_ok=True)
    paths = []
    if 'layers' in results[0]:
        paths += plot_loss_analyses(plt, results, folder, measured_on)
    if 'task' in results[0]:
        paths.append(plot_task(plt, results, folder))
    if any(r.get('variance_during_training') for r in results):
        paths.append(plot_variance_during_training(plt, results, folder))
    return paths


def plot_variance_during_training(plt, results, folder, curves=6):
    """The paper's Figure 4 across training: per run, the residual stream's variance after each block at up to
    `curves` evaluations spread over the run, from the variance train.py logs at every evaluation."""
    runs = [r for r in results if r.get('variance_during_training')]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.5), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], runs):
        logged = r['variance_during_training']
        picked = sorted({round(i) for i in np.linspace(0, len(logged) - 1, min(curves, len(logged)))})
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(picked)))
        for color, i in zip(colors, picked):
            variance = logged[i]['block_variance']
            ax.plot(np.arange(1, len(variance) + 1), variance, marker='o', color=color,
                    label=f"iteration {logged[i]['iter']}")
        ax.set(title=r['name'], xlabel='after block l', ylabel='variance of the residual stream', yscale='log')
        ax.legend()
        whole_blocks(ax.xaxis)
    fig.suptitle('Residual-stream variance by depth during training')
    return save_figure(fig, folder, 'variance_during_training.png')


def plot_loss_analyses(plt, results, folder, measured_on):
    paths = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        blocks = np.arange(1, r['n_layer'] + 1)
        ax.bar(blocks + (i - (len(results) - 1) / 2) * width, [layer['loss_drop'] for layer in r['layers']],
               width=width, label=r['name'])
    ax.set(title='Loss increase when one block is removed', xlabel='block removed (l)',
           ylabel=f'loss increase on {measured_on} (nats)')
    ax.axhline(0, color='black', linewidth=0.6)
    ax.legend()
    whole_blocks(ax.xaxis)
    paths.append(save_figure(fig, folder, 'layer_drop.png'))

    heatmaps = [np.array([[np.nan if v is None else v for v in row] for row in r['angular_distance']])
                for r in results]
    # one color scale for all models, spanning the distances measured
    low, high = min(np.nanmin(h) for h in heatmaps), max(np.nanmax(h) for h in heatmaps)
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results) + 1, 4.5), squeeze=False)
    for ax, r, heatmap in zip(axes[0], results, heatmaps):
        image = ax.imshow(heatmap.T, origin='lower', aspect='auto', vmin=low, vmax=max(high, low + 1e-6),
                          cmap='viridis', extent=(0.5, heatmap.shape[0] + 0.5, 0.5, heatmap.shape[1] + 0.5))
        ax.set(title=r['name'], xlabel='block l', ylabel='distance n (blocks)')
        whole_blocks(ax.xaxis, ax.yaxis)
    fig.colorbar(image, ax=axes[0].tolist(), label='angular distance (0 = same direction, 1 = opposite)')
    fig.suptitle('Angular distance between the inputs of blocks l and l+n')
    paths.append(save_figure(fig, folder, 'angular_distance.png', tight=False))

    fig, (ax_distance, ax_variance) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        blocks = np.arange(1, r['n_layer'] + 1)
        ax_distance.plot(blocks, [layer['angular_distance_next'] for layer in r['layers']], marker='o',
                         label=r['name'])
        ax_variance.plot(np.arange(0, r['n_layer'] + 1),
                         [r['embedding_variance']] + [layer['variance'] for layer in r['layers']], marker='o',
                         label=r['name'])
    ax_distance.set(title="Angular distance between each block's input and output", xlabel='block l',
                    ylabel='angular distance (0 = unchanged direction)')
    ax_variance.set(title='Variance of the residual stream by depth', xlabel='after block l (0 = embeddings)',
                    ylabel='variance', yscale='log')
    for ax in (ax_distance, ax_variance):
        ax.legend()
        whole_blocks(ax.xaxis)
    paths.append(save_figure(fig, folder, 'depth_profile.png'))
    return paths


def plot_task(plt, results, folder):
    """Accuracy with each block removed (points with standard errors), each model's full accuracy (dashed) and
    chance (dotted), for acc and acc_norm side by side."""
    task = results[0]['task']
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ('acc', 'acc_norm')):
        for r in results:
            layers = r['task']['layers']
            line = ax.errorbar([layer['block'] for layer in layers], [layer[metric] for layer in layers],
                               yerr=[layer[f'{metric}_stderr'] or 0 for layer in layers], marker='o', capsize=2,
                               label=r['name'])
            ax.axhline(r['task'][metric], color=line[0].get_color(), linestyle='--', linewidth=1)
        ax.axhline(task['chance'], color='gray', linestyle=':', linewidth=1, label='chance')
        ax.set(title=f"{task['name']} {metric} with one block removed ({task['examples']} examples)",
               xlabel='block removed (l)', ylabel=f'{metric} (dashed: full model)')
        ax.legend()
        whole_blocks(ax.xaxis)
    return save_figure(fig, folder, f"{task['name']}_accuracy.png")


def whole_blocks(*axes):
    """Ticks at whole block numbers only."""
    from matplotlib.ticker import MaxNLocator
    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True))


def save_figure(fig, folder, name, tight=True):
    import matplotlib.pyplot as plt
    if tight:
        fig.tight_layout()
    path = os.path.join(folder, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('models', nargs='+', help='run folders, ckpt.pt files, Hugging Face folders or hub ids')
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--data', help="a prepared data folder; its val.bin is used (default: the validation split "
                                       "the checkpoints were trained on)")
    source.add_argument('--text', help="a text file, tokenized with each model's tokenizer")
    parser.add_argument('--tokens', type=int, default=32768, help='token budget per model (default 32768)')
    parser.add_argument('--block_size', type=int, help="window length (default: min(256, each model's block_size))")
    parser.add_argument('--batch_size', type=int, default=8)
    parser.add_argument('--max_distance', type=int, default=8, help='largest n in the angular-distance heatmap')
    parser.add_argument('--last_k', type=int, default=0, help='also remove the last 1..K blocks together')
    parser.add_argument('--task', choices=sorted(TASKS), help='zero-shot multiple-choice accuracy per removed block')
    parser.add_argument('--task_file', help="a local copy of the task's file in its benchmark's format: hellaswag, "
                        "hellaswag_val.jsonl (activity_label, ctx_a, ctx_b, endings, label per line); arc_*, AI2's "
                        "jsonl ({question: {stem, choices: [{text, label}]}, answerKey}) or the Hugging Face rows "
                        "({question, choices: {text, label}, answerKey}); mmlu, a <subject>_test.csv (question, four "
                        "choices, answer letter; no header), a folder of them, or the release's data.tar")
    parser.add_argument('--task_limit', type=int, help='evaluate this many examples, spread over the file')
    parser.add_argument('--device', default='auto', help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N'")
    parser.add_argument('--dtype', default='float32', choices=EVAL_DTYPES)
    parser.add_argument('--json', help='write every number, with the settings, to this file')
    parser.add_argument('--plot', help='write PNG figures into this folder')
    args = parser.parse_args(argv)
    for name in ('tokens', 'batch_size', 'max_distance'):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.last_k < 0:
        raise UserError("--last_k must be 0 or more")
    for name in ('block_size', 'task_limit'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if (args.task_file or args.task_limit) and not args.task:
        raise UserError("--task_file and --task_limit need --task NAME")
    return args


def check_outputs(json_path, plot_folder):
    """Refuses a --json or --plot that could not be written, before any model is measured: a --json whose folder
    does not exist (it is not created, as a mistyped path should not be) and a --plot that is a file."""
    if json_path:
        folder = os.path.dirname(os.path.abspath(json_path))
        if os.path.isdir(json_path):
            raise UserError(f"--json {json_path} is a folder; give the path of a file to write")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UserError(f"--json {json_path} cannot be written: {folder} is not an existing folder that you may "
                            f"write to; create it or choose another path")
    if plot_folder:
        existing = os.path.abspath(plot_folder)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise UserError(f"--plot {plot_folder} cannot be a folder: {existing} is a file; choose another path")
        if not os.access(existing, os.W_OK):
            raise UserError(f"--plot {plot_folder} cannot be written: you may not write to {existing}")


def run(args):
    device = resolve_device(args.device)
    check_outputs(args.json, args.plot)
    forward_context = autocast(args.dtype, device)
    loaded = [load_model(spec, device, name) for spec, name in zip(args.models, run_names(args.models))]
    measure_loss = bool(args.data or args.text or not args.task)
    data = args.data or (recorded_data_folder(loaded) if measure_loss and not args.text else None)
    block_size = args.block_size or min([256] + [m.model.config.block_size for m in loaded])
    for m in loaded:
        if measure_loss and block_size > m.model.config.block_size:
            raise UserError(f"--block_size {block_size} exceeds {m.name}'s block_size {m.model.config.block_size}")
    examples = read_task(args.task, args.task_file, args.task_limit) if args.task else None
    # every model's windows, task requests and training log are read before any is measured, so that input one of
    # them cannot read costs no measurement
    model_windows = [windows(read_tokens(data, args.text, m, args.tokens), block_size) if measure_loss
                     else (None, None) for m in loaded]
    request_lists = [task_requests(examples, m, args.task, m.model.config.block_size) if examples else None
                     for m in loaded]
    variances = [variance_during_training(m.training_log) if m.training_log else None for m in loaded]
    if not measure_loss:
        print("note: with --task and neither --data nor --text, the loss analyses (layer drop, angular distance, "
              "variance) are not run; add --data or --text to run them too", file=sys.stderr)
    results = []
    for m, (x, y), requests, variance in zip(loaded, model_windows, request_lists, variances):
        result = {'name': m.name, 'description': m.description, 'tokenizer': m.tokenizer,
                  'norm_scheme': m.model.config.norm_scheme, 'arch': m.model.config.arch,
                  'n_layer': m.model.config.n_layer}
        if measure_loss:
            print(f"{m.name}: {x.numel():,} tokens of {data or args.text} in {len(x)} windows of {block_size}",
                  file=sys.stderr)
            if args.last_k > m.model.config.n_layer:
                print(f"note: --last_k {args.last_k} exceeds {m.name}'s {m.model.config.n_layer} blocks; removing "
                      f"its last 1..{m.model.config.n_layer}", file=sys.stderr)
            result.update(analyze(m.model, x, y, args.batch_size, device, forward_context, args.max_distance,
                                  args.last_k))
        if variance is not None:
            result['variance_during_training'] = variance
        if examples:
            print(f"{m.name}: {args.task}, {len(examples)} examples, {len(requests)} choices, "
                  f"{m.model.config.n_layer + 1} passes", file=sys.stderr)
            result['task'] = evaluate_task(m.model, args.task, examples, requests, args.batch_size, device,
                                            forward_context)
        results.append(result)
    print(format_table(results))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ('json', 'plot')}
        with open(args.json, 'w') as f:
            json.dump({'settings': {**settings, 'data': data, 'block_size': block_size}, 'models': results}, f,
                      indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        for path in write_plots(results, args.plot, measured_on(data, args.text)):
            print(f"wrote {path}")
    return results


def main(argv):
    return run_main(lambda argv: run(parse_args(argv)), argv)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
