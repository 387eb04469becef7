"""
Text from a model, as nanoGPT's sample.py writes it: a run folder of train.py, a checkpoint file, or a Hugging Face
folder (one that hf.py exported, or a pretrained GPT-2, Llama, Mistral or Qwen2 with its tokenizer.json).

    python sample.py out/lns --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py out/lns --skip_layers=2,5          the same model without blocks 2 and 5
    python sample.py hf/lns --start=FILE:prompt.txt --temperature=0

--skip_layers replaces blocks (1-based, as in the paper) by the identity, as eval_layers.py's layer drop does:
under the curse of depth, a model reads almost as well without one of its deep blocks as with it.
"""

import os
import sys
from dataclasses import dataclass, fields
from typing import Optional, get_type_hints

import torch

from hf import TokenizerUnavailable, load_model
from configurator import EVAL_DTYPES, UserError, autocast, read_settings, resolve_device, run_main


@dataclass
class SampleConfig:
    start: str = '\n'               # the prompt, or FILE:path to read it from a file
    num_samples: int = 3
    max_new_tokens: int = 200
    temperature: float = 0.8        # below 1 sharpens the distribution, above 1 flattens it; 0 takes the argmax
    top_k: Optional[int] = 200      # sample among the k most likely tokens only; None: among all
    seed: int = 1337
    skip_layers: str = ''           # block numbers to replace by the identity, comma-separated, e.g. 2,5
    device: str = 'auto'            # 'auto' (cuda when available), 'cpu', 'cuda', ...
    dtype: str = 'float32'          # or 'bfloat16' (autocast)


def parse_options(argv):
    """The model and a SampleConfig from `MODEL --key=value ...` (train.py's dialect; MODEL is every other argument);
    UserError in one sentence for anything else."""
    models = [arg for arg in argv if not arg.startswith('--')]
    values = read_settings([arg for arg in argv if arg.startswith('--')], get_type_hints(SampleConfig),
                           example='--num_samples=5')
    # `--skip_layers=2, 3` reaches us as '--skip_layers=2,' and a second "model" '3'
    numbers = [arg for arg in models if set(arg) <= set('0123456789,') and not os.path.exists(arg)]
    if len(models) > 1 and numbers and 'skip_layers' in values:
        blocks = ','.join(part for text in [values['skip_layers']] + numbers for part in text.split(',') if part)
        raise UserError(f"--skip_layers takes block numbers separated by commas without spaces, e.g. "
                        f"--skip_layers={blocks} ({numbers[0]!r} is not a model)")
    if len(models) != 1:
        raise UserError(f"give one model (a run folder, checkpoint or Hugging Face folder), not {len(models)}")
    cfg = SampleConfig(**values)
    for key in ('num_samples', 'max_new_tokens'):
        if getattr(cfg, key) < 1:
            raise UserError(f"--{key} must be at least 1, not {getattr(cfg, key)}")
    if cfg.temperature < 0:
        raise UserError(f"--temperature must be 0 or more, not {cfg.temperature}")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise UserError(f"--top_k must be at least 1 (or None), not {cfg.top_k}")
    if cfg.dtype not in EVAL_DTYPES:
        raise UserError(f"--dtype must be {' or '.join(EVAL_DTYPES)}, not {cfg.dtype!r}")
    return models[0], cfg


def parse_skip_layers(text, n_layer):
    """'2,5' -> (2, 5); UserError unless every number is a block from 1 to n_layer."""
    try:
        blocks = tuple(int(part) for part in text.split(',') if part.strip())
    except ValueError:
        raise UserError(f"--skip_layers expects block numbers separated by commas, e.g. 2,5, not {text!r}") from None
    if not all(1 <= block <= n_layer for block in blocks):
        raise UserError(f"--skip_layers must name blocks from 1 to {n_layer}, not {text}")
    return blocks


def read_start(start):
    if not start.startswith('FILE:'):
        return start
    try:
        with open(start[len('FILE:'):], encoding='utf-8') as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read the prompt file {start[len('FILE:'):]} ({error})") from None


def sample(spec, cfg):
    """Prints cfg.num_samples texts, each the prompt followed by what the model writes after it."""
    device = resolve_device(cfg.device)
    loaded = load_model(spec, device)
    model = loaded.model.eval()
    skip_layers = parse_skip_layers(cfg.skip_layers, model.config.n_layer)
    if loaded.encode is None or loaded.decode is None:
        raise UserError(f"no tokenizer for {loaded.name} is available offline; add its tokenizer.json to the folder")
    prompt = read_start(cfg.start)
    try:
        ids = loaded.encode(prompt)
    except TokenizerUnavailable:
        raise
    except UserError as error:
        raise UserError(f"{error}; write --start with characters from its training text") from None
    if not ids:
        raise UserError("the prompt has no tokens; give a non-empty --start")
    skipping = f", without block{'s' if len(skip_layers) > 1 else ''} {', '.join(map(str, skip_layers))}" \
        if skip_layers else ''
    print(f"{loaded.name}: {loaded.description}{skipping}", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    texts = []
    with autocast(cfg.dtype, device):
        for _ in range(cfg.num_samples):
            y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                               generator=generator, skip_layers=skip_layers)
            texts.append(loaded.decode(y[0].tolist()))
            print(texts[-1])
            print('---------------')
    return texts


def usage():
    """The module docstring and every option with its default."""
    options = '\n'.join(f"    --{f.name}={f.default!r}" for f in fields(SampleConfig))
    return f"usage: python sample.py MODEL [--key=value ...]\n{__doc__}\noptions, with their defaults:\n{options}"


def main(argv):
    return run_main(lambda argv: sample(*parse_options(argv)), argv, usage)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
