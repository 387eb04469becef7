"""
Which layers matter? The paper's layer analyses, for our checkpoints and for pretrained Hugging Face models.

    python eval_layers.py out/pre out/lns --data data/shakespeare_char --plot plots --json layers.json
    python eval_layers.py path/to/gpt2 --text ../shared/data/wikitext-2/valid.txt

MODEL is a run folder (with ckpt.pt), a checkpoint file, a Hugging Face model folder (config.json and
*.safetensors: GPT-2, Llama, Mistral, Qwen2) or, with huggingface_hub installed, a hub id. Every model is
measured on the same windows of the same tokens (the first --tokens of the validation data):
- layer drop: the loss with block l skipped (the other blocks keep their own 1/sqrt(l) under LNS), for every l;
  with --last_k K also with the last 1..K blocks skipped together;
- angular distance arccos(cos(x_l, x_{l+n}))/pi between the residual streams entering blocks l and l+n, per
  token, averaged over tokens, for n = 1..--max_distance (x_{L+1} is the last block's output);
- per block: the variance of the residual stream after it, its mean norm, and |update| / |input|.
Block numbers are 1-based, as in the paper.
"""

import argparse
import json
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from model import GPT, read_checkpoint


class UserError(Exception):
    """A problem the user can fix; main() prints its one-sentence message and exits non-zero."""


@dataclass
class LoadedModel:
    name: str
    model: GPT
    tokenizer: str                      # 'char', 'gpt2', a Hugging Face model's folder name, or 'unknown'
    encode: Optional[Callable] = None   # text -> token ids, when a tokenizer is available offline
    description: str = ''


# ----------------------------------------------------------------------------- models and tokenizers

def gpt2_encode():
    import tiktoken
    try:
        encoding = tiktoken.get_encoding('gpt2')
    except Exception as error:
        raise UserError(f"tiktoken's gpt2 encoding is not available offline ({type(error).__name__}); "
                        f"set TIKTOKEN_CACHE_DIR or pass --data with a prepared folder") from None
    return encoding.encode_ordinary


def char_encode(chars, name):
    index = {c: i for i, c in enumerate(chars)}

    def encode(text):
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise UserError(f"the text has characters {''.join(unknown[:10])!r} that {name} never saw in training; "
                            f"use text from the same corpus or --data")
        return [index[c] for c in text]
    return encode


def load_our_checkpoint(path, name, device):
    try:
        checkpoint = read_checkpoint(path)
        model = GPT.from_checkpoint(checkpoint).to(device)
    except ValueError as error:
        raise UserError(str(error)) from None
    meta = checkpoint.get('data_meta') or {}
    tokenizer = meta.get('tokenizer', 'unknown')
    encode = None
    if tokenizer == 'char':
        encode = char_encode(meta['chars'], name)
    elif tokenizer == 'gpt2':
        encode = lambda text: gpt2_encode()(text)  # noqa: E731 (loaded only when text is given)
    config = model.config
    description = (f"{config.arch} {config.norm_scheme}, {config.n_layer} blocks, {model.num_params():,} parameters, "
                   f"iteration {checkpoint.get('iter_num', '?')}")
    return LoadedModel(name, model, tokenizer, encode, description)


def load_hf_folder(folder, name, device):
    from hf import from_hf
    try:
        model = from_hf(folder, device=device)
    except ValueError as error:
        raise UserError(str(error)) from None
    with open(os.path.join(folder, 'config.json')) as f:
        model_type = json.load(f).get('model_type')
    tokenizer, encode = os.path.basename(os.path.normpath(folder)), None
    if model_type == 'gpt2':
        tokenizer, encode = 'gpt2', (lambda text: gpt2_encode()(text))
    elif os.path.exists(os.path.join(folder, 'tokenizer.json')):
        encode = lambda text: hf_tokenizer(folder)(text)  # noqa: E731
    description = f"Hugging Face {model_type}, {model.config.n_layer} blocks, {model.num_params():,} parameters"
    return LoadedModel(name, model, tokenizer, encode, description)


def hf_tokenizer(folder):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError(f"{folder} has a tokenizer.json but the tokenizers package is not installed; "
                        f"pip install tokenizers, or pass --data with token ids") from None
    tokenizer = Tokenizer.from_file(os.path.join(folder, 'tokenizer.json'))
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def load_model(spec, device):
    """Our run folder or checkpoint file, a Hugging Face folder, or a hub id."""
    name = os.path.basename(os.path.normpath(spec)) if os.path.exists(spec) else spec
    if os.path.isdir(spec) and os.path.exists(os.path.join(spec, 'ckpt.pt')):
        return load_our_checkpoint(os.path.join(spec, 'ckpt.pt'), spec, device)
    if os.path.isdir(spec) and os.path.exists(os.path.join(spec, 'config.json')):
        return load_hf_folder(spec, name, device)
    if os.path.isfile(spec):
        return load_our_checkpoint(spec, spec, device)
    if os.path.isdir(spec):
        raise UserError(f"{spec} has neither ckpt.pt (a run of train.py) nor config.json (a Hugging Face model)")
    if spec.count('/') == 1 and not spec.startswith(('.', '/')):
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
        return load_hf_folder(folder, spec, device)
    raise UserError(f"{spec} does not exist; give a run folder, a ckpt.pt, a Hugging Face folder or a hub id")


# ----------------------------------------------------------------------------- data

def tokens_from_data_folder(folder, loaded, budget):
    meta_path, val_path = os.path.join(folder, 'meta.json'), os.path.join(folder, 'val.bin')
    if not (os.path.exists(meta_path) and os.path.exists(val_path)):
        raise UserError(f"{folder} is not a prepared data folder (meta.json and val.bin); run its prepare.py first")
    with open(meta_path) as f:
        meta = json.load(f)
    if loaded.tokenizer != 'unknown' and meta.get('tokenizer') != loaded.tokenizer:
        raise UserError(f"{folder} holds {meta.get('tokenizer')!r} tokens but {loaded.name} reads "
                        f"{loaded.tokenizer!r} tokens; pass --text FILE, or data prepared with its tokenizer")
    if meta['vocab_size'] > loaded.model.config.vocab_size:
        raise UserError(f"{folder} has {meta['vocab_size']} token ids but {loaded.name} only "
                        f"{loaded.model.config.vocab_size}; they were not made with the same tokenizer")
    return np.array(np.memmap(val_path, dtype=np.uint16, mode='r')[:budget + 1], dtype=np.int64)


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
    return np.array(loaded.encode(text)[:budget + 1], dtype=np.int64)


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
    distance = torch.zeros(L, N, dtype=torch.float64)   # [l-1, n-1]: block l's input against block l+n's
    square_sum = torch.zeros(L + 1, dtype=torch.float64)
    value_sum = torch.zeros(L + 1, dtype=torch.float64)
    norm_sum = torch.zeros(L + 1, dtype=torch.float64)
    update_sum = torch.zeros(L + 1, dtype=torch.float64)
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
    """One header line per model, then one table: per block, each model's drop, distance and variance."""
    lines = []
    for i, r in enumerate(results, start=1):
        lines.append(f"[{i}] {r['name']}: {r['description']}; {r['tokens']:,} tokens, loss {r['base_loss']:.4f}, "
                     f"perplexity {r['base_perplexity']:.2f}")
    header = f"{'block':>5}" + ''.join(f" | [{i}] {'drop':>8} {'ang.next':>8} {'variance':>10}"
                                        for i in range(1, len(results) + 1))
    lines += ['', 'drop: loss increase with the block removed; ang.next: angular distance between the block\'s input '
              'and output; variance: residual stream after the block', header, '-' * len(header)]
    for l in range(1, max(r['n_layer'] for r in results) + 1):
        row = f"{l:>5}"
        for r in results:
            if l <= r['n_layer']:
                layer = r['layers'][l - 1]
                row += (f" | {'':3} {layer['loss_drop']:>+8.4f} {layer['angular_distance_next']:>8.3f} "
                        f"{layer['variance']:>10.4g}")
            else:
                row += ' | ' + ' ' * 32
        lines.append(row)
    return '\n'.join(lines)


def write_plots(results, folder):
    """PNGs with titles, axes and legends: layer drop, angular distance (heatmaps and n = 1), variance."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    os.makedirs(folder, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        blocks = np.arange(1, r['n_layer'] + 1)
        ax.bar(blocks + (i - (len(results) - 1) / 2) * width, [layer['loss_drop'] for layer in r['layers']],
               width=width, label=r['name'])
    ax.set(title='Loss increase when one block is removed', xlabel='block removed (l)',
           ylabel='validation loss increase (nats)')
    ax.axhline(0, color='black', linewidth=0.6)
    ax.legend()
    paths.append(save_figure(fig, folder, 'layer_drop.png'))

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results) + 1, 4.5), squeeze=False)
    for ax, r in zip(axes[0], results):
        heatmap = np.array([[np.nan if v is None else v for v in row] for row in r['angular_distance']])
        image = ax.imshow(heatmap.T, origin='lower', aspect='auto', vmin=0, vmax=1, cmap='viridis',
                          extent=(0.5, heatmap.shape[0] + 0.5, 0.5, heatmap.shape[1] + 0.5))
        ax.set(title=r['name'], xlabel='block l', ylabel='distance n (blocks)')
    fig.colorbar(image, ax=axes[0].tolist(), label='angular distance (0 to 1)')
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
                    ylabel='angular distance (0 = unchanged direction)', ylim=(0, None))
    ax_variance.set(title='Variance of the residual stream by depth', xlabel='after block l (0 = embeddings)',
                    ylabel='variance', yscale='log')
    for ax in (ax_distance, ax_variance):
        ax.legend()
    paths.append(save_figure(fig, folder, 'depth_profile.png'))
    return paths


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
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--data', help="a prepared data folder; its val.bin is used")
    source.add_argument('--text', help="a text file, tokenized with each model's tokenizer")
    parser.add_argument('--tokens', type=int, default=32768, help='token budget per model (default 32768)')
    parser.add_argument('--block_size', type=int, help="window length (default: min(256, each model's block_size))")
    parser.add_argument('--batch_size', type=int, default=8)
    parser.add_argument('--max_distance', type=int, default=8, help='largest n in the angular-distance heatmap')
    parser.add_argument('--last_k', type=int, default=0, help='also remove the last 1..K blocks together')
    parser.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', ...")
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--json', help='write every number, with the settings, to this file')
    parser.add_argument('--plot', help='write PNG figures into this folder')
    args = parser.parse_args(argv)
    for name in ('tokens', 'batch_size', 'max_distance'):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.block_size is not None and args.block_size < 1:
        raise UserError("--block_size must be at least 1")
    return args


def run(args):
    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                          'cpu' if args.device == 'auto' else args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == 'bfloat16' else nullcontext()
    loaded = [load_model(spec, device) for spec in args.models]
    block_size = args.block_size or min([256] + [m.model.config.block_size for m in loaded])
    for m in loaded:
        if block_size > m.model.config.block_size:
            raise UserError(f"--block_size {block_size} exceeds {m.name}'s block_size {m.model.config.block_size}")
    results = []
    for m in loaded:
        tokens = (tokens_from_data_folder(args.data, m, args.tokens) if args.data
                  else tokens_from_text(args.text, m, args.tokens))
        x, y = windows(tokens, block_size)
        print(f"{m.name}: {x.numel():,} tokens in {len(x)} windows of {block_size}", file=sys.stderr)
        result = analyze(m.model, x, y, args.batch_size, device, autocast, args.max_distance, args.last_k)
        results.append({'name': m.name, 'description': m.description, 'tokenizer': m.tokenizer,
                        'norm_scheme': m.model.config.norm_scheme, 'arch': m.model.config.arch, **result})
    print(format_table(results))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ('json', 'plot')}
        with open(args.json, 'w') as f:
            json.dump({'settings': {**settings, 'block_size': block_size}, 'models': results}, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        for path in write_plots(results, args.plot):
            print(f"wrote {path}")
    return results


def main(argv):
    try:
        run(parse_args(argv))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
