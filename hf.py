"""
Hugging Face folders, both ways: from_hf reads a pretrained GPT-2, Llama, Mistral or Qwen2 folder into our GPT;
to_hf writes one of our models as a folder that transformers loads with its stock classes and no custom code.
load_model, for sample.py, eval_layers.py and tasks.py, takes any of them (our run folder or checkpoint, a Hugging
Face folder, a hub id) and gives the model with its tokenizer.

    python hf.py RUN_OR_CHECKPOINT HF_FOLDER        e.g.  python hf.py out/lns hf/lns

then, in Python: transformers.AutoModelForCausalLM.from_pretrained('hf/lns') (GPT2LMHeadModel or LlamaForCausalLM).

LayerNorm Scaling costs nothing in the export: N(x)/sqrt(l) is a norm whose weight (and bias) is divided by sqrt(l),
so an LNS model is a Pre-LN model with rescaled norm weights. A factor on a sublayer's output (lns_position
'sublayer', LayerScale, SkipInit) folds the same way into that sublayer's output projection. Post-LN, DeepNorm,
Mix-LN and Peri-LN put norms where the stock classes have none, so they cannot be exported.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from configurator import UserError, run_main
from dataloader import resolve_data_dir
from model import GPT, GPTConfig, read_checkpoint

HF_MODEL_TYPES = ('gpt2', 'llama', 'mistral', 'qwen2')
EXPORTABLE_SCHEMES = ('pre', 'lns')
# every file to_hf may write; a folder holding only these is a previous export and may be replaced
EXPORT_FILES = ('config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'vocab.json',
                'merges.txt')
# GPT-2's BPE files as tiktoken caches them (file name: sha1 of the URL) with the sha256 tiktoken checks
GPT2_BPE_FILES = {
    'vocab.json': ('https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json',
                   '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783'),
    'merges.txt': ('https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe',
                   '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5'),
}
GPT2_END_OF_TEXT = 50256
UNSEEN_CHARACTER = '<a character this model never saw in training>'
# (ours, GPT-2's) names of the weights in each block
GPT2_BLOCK_NAMES = [('attn_norm', 'ln_1'), ('mlp_norm', 'ln_2'), ('attn.qkv', 'attn.c_attn'),
                    ('attn.proj', 'attn.c_proj'), ('mlp.fc', 'mlp.c_fc'), ('mlp.proj', 'mlp.c_proj')]


# ----------------------------------------------------------------------------- from Hugging Face

def config_from_hf(hf):
    """The GPTConfig (Pre-LN, no dropout) of a Hugging Face config.json dict; ValueError for a setting we do not
    reproduce."""
    model_type = hf.get('model_type')
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; from_hf reads {', '.join(HF_MODEL_TYPES)}")
    if model_type == 'gpt2':
        # (setting, value, the values we reproduce); reorder_and_upcast_attn only changes precision, so it is allowed
        checks = [('activation_function', hf.get('activation_function', 'gelu_new'), ('gelu_new', 'gelu_pytorch_tanh')),
                  ('scale_attn_weights', hf.get('scale_attn_weights', True), (True,)),
                  ('scale_attn_by_inverse_layer_idx', hf.get('scale_attn_by_inverse_layer_idx', False), (False,)),
                  ('add_cross_attention', hf.get('add_cross_attention', False), (False,))]
    else:
        # transformers 5 writes rope_parameters, older versions rope_theta and rope_scaling (None for plain RoPE)
        rope = hf.get('rope_scaling') or hf.get('rope_parameters') or {}
        head_dim = hf['hidden_size'] // hf['num_attention_heads']
        checks = [('hidden_act', hf.get('hidden_act', 'silu'), ('silu',)),
                  ('rope type', rope.get('rope_type', rope.get('type', 'default')), ('default',)),
                  ('head_dim', hf.get('head_dim') or head_dim, (head_dim,))]
    for setting, value, supported in checks:
        if value not in supported:
            raise ValueError(f"{model_type} checkpoints with {setting}={value!r} are not supported; "
                             f"from_hf reproduces {setting}={' or '.join(map(repr, supported))}")
    if model_type == 'gpt2':
        return GPTConfig(arch='gpt', norm_scheme='pre', n_layer=hf['n_layer'], n_head=hf['n_head'], n_embd=hf['n_embd'],
                         ffn_hidden=hf.get('n_inner'), block_size=hf['n_positions'], vocab_size=hf['vocab_size'],
                         bias=True, norm_eps=hf.get('layer_norm_epsilon', 1e-5),
                         tie_embeddings=hf.get('tie_word_embeddings', True))
    # our `bias` covers the attention output and the MLP together, so Llama's two bias flags must agree
    attention_bias, mlp_bias = hf.get('attention_bias', False), hf.get('mlp_bias', False)
    if attention_bias != mlp_bias:
        raise ValueError(f"{model_type} checkpoints with attention_bias={attention_bias!r} and mlp_bias={mlp_bias!r} "
                         f"are not supported; from_hf reproduces biases on both or on neither")
    # Mistral (and Qwen2 with use_sliding_window) attend to the last sliding_window tokens only; up to that length
    # this equals full causal attention, so block_size stops there and longer inputs are refused, not approximated
    block_size = hf['max_position_embeddings']
    if (model_type == 'mistral' or hf.get('use_sliding_window')) and hf.get('sliding_window'):
        block_size = min(block_size, hf['sliding_window'])
    return GPTConfig(arch='llama', norm_scheme='pre', n_layer=hf['num_hidden_layers'], n_head=hf['num_attention_heads'],
                     n_kv_head=hf.get('num_key_value_heads'), n_embd=hf['hidden_size'],
                     ffn_hidden=hf['intermediate_size'], block_size=block_size, vocab_size=hf['vocab_size'],
                     bias=attention_bias, qkv_bias=attention_bias or model_type == 'qwen2',
                     norm_eps=hf.get('rms_norm_eps', 1e-6),
                     rope_theta=hf.get('rope_theta') or rope.get('rope_theta', 10000.0),
                     tie_embeddings=hf.get('tie_word_embeddings', False))


def state_dict_from_hf(model_type, tensors, config):
    """Our state dict from Hugging Face tensors: renamed, GPT-2's Conv1D matrices transposed, and Llama's separate
    projections concatenated into our fused ones; ValueError naming the first missing or unexpected weight."""
    # a ...LMHeadModel / ...ForCausalLM nests the body under 'transformer.' / 'model.'; a bare body model does not
    tensors = {name.removeprefix('transformer.').removeprefix('model.'): t for name, t in tensors.items()}

    def take(name):
        if name not in tensors:
            raise ValueError(f"the {model_type} checkpoint has no weight {name!r}; is it complete and of this model?")
        return tensors.pop(name)

    state = {}
    if model_type == 'gpt2':
        state['tok_emb.weight'], state['pos_emb.weight'] = take('wte.weight'), take('wpe.weight')
        state['final_norm.weight'], state['final_norm.bias'] = take('ln_f.weight'), take('ln_f.bias')
        for i in range(config.n_layer):
            for ours, theirs in GPT2_BLOCK_NAMES:
                weight = take(f'h.{i}.{theirs}.weight')
                # Conv1D stores its matrix as (in, out), nn.Linear as (out, in); c_attn's columns are [q | k | v]
                state[f'blocks.{i}.{ours}.weight'] = weight if ours.endswith('norm') else weight.t()
                state[f'blocks.{i}.{ours}.bias'] = take(f'h.{i}.{theirs}.bias')
            for buffer in ('attn.bias', 'attn.masked_bias'):  # causal-mask buffers that older checkpoints carry
                tensors.pop(f'h.{i}.{buffer}', None)
    else:
        state['tok_emb.weight'], state['final_norm.weight'] = take('embed_tokens.weight'), take('norm.weight')
        for i in range(config.n_layer):
            ours, theirs = f'blocks.{i}.', f'layers.{i}.'
            state[ours + 'attn_norm.weight'] = take(theirs + 'input_layernorm.weight')
            state[ours + 'mlp_norm.weight'] = take(theirs + 'post_attention_layernorm.weight')
            # our fused projections stack the rows: qkv = [q; k; v] (see Attention), fc = [gate; up] (see MLP)
            state[ours + 'attn.qkv.weight'] = torch.cat([take(f'{theirs}self_attn.{p}_proj.weight') for p in 'qkv'])
            if config.qkv_bias:
                state[ours + 'attn.qkv.bias'] = torch.cat([take(f'{theirs}self_attn.{p}_proj.bias') for p in 'qkv'])
            state[ours + 'attn.proj.weight'] = take(theirs + 'self_attn.o_proj.weight')
            state[ours + 'mlp.fc.weight'] = torch.cat([take(f'{theirs}mlp.{p}_proj.weight') for p in ('gate', 'up')])
            state[ours + 'mlp.proj.weight'] = take(theirs + 'mlp.down_proj.weight')
            if config.bias:
                state[ours + 'attn.proj.bias'] = take(theirs + 'self_attn.o_proj.bias')
                state[ours + 'mlp.fc.bias'] = torch.cat([take(f'{theirs}mlp.{p}_proj.bias') for p in ('gate', 'up')])
                state[ours + 'mlp.proj.bias'] = take(theirs + 'mlp.down_proj.bias')
            tensors.pop(theirs + 'self_attn.rotary_emb.inv_freq', None)  # a buffer older checkpoints carry
    # a tied head is the token embedding, whether or not the checkpoint also saved it
    state['lm_head.weight'] = state['tok_emb.weight'] if config.tie_embeddings else take('lm_head.weight')
    tensors.pop('lm_head.weight', None)
    if tensors:
        raise ValueError(f"the {model_type} checkpoint has an unexpected weight {sorted(tensors)[0]!r}, "
                         f"which the {config.n_layer}-layer model its config.json describes does not use")
    return state


def from_hf(folder, device='cpu', dtype=torch.float32):
    """Our GPT (Pre-LN) with the weights of a Hugging Face gpt2, llama, mistral or qwen2 model folder: config.json
    and model.safetensors, or shards listed in model.safetensors.index.json. Reads safetensors, not transformers."""
    from safetensors.torch import load_file
    config_path = os.path.join(folder, 'config.json')
    if not os.path.isfile(config_path):
        raise ValueError(f"no config.json in {folder}; from_hf expects a Hugging Face model folder "
                         f"(config.json and model.safetensors)")
    with open(config_path) as f:
        hf = json.load(f)
    config = config_from_hf(hf)
    index_path = os.path.join(folder, 'model.safetensors.index.json')
    if os.path.isfile(index_path):
        with open(index_path) as f:
            files = sorted(set(json.load(f)['weight_map'].values()))
    elif os.path.isfile(os.path.join(folder, 'model.safetensors')):
        files = ['model.safetensors']
    else:
        raise ValueError(f"no model.safetensors or model.safetensors.index.json in {folder}; from_hf reads safetensors "
                         f"only, so convert a pytorch_model.bin checkpoint to safetensors first")
    tensors = {}
    for file in files:
        tensors.update(load_file(os.path.join(folder, file)))
    with torch.device(device):
        model = GPT(config)
    model.load_state_dict(state_dict_from_hf(hf['model_type'], tensors, config), strict=True)
    return model.to(dtype=dtype)


# ----------------------------------------------------------------------------- to Hugging Face

def hf_model_type(config):
    """'gpt2' for the gpt arch; for llama, 'qwen2' when only query/key/value carry biases (Qwen2's layout, which
    Llama's classes cannot express), else 'llama'."""
    if config.arch == 'gpt':
        return 'gpt2'
    return 'qwen2' if config.qkv_bias and not config.bias else 'llama'


def config_to_hf(config, end_of_text=None):
    """The config.json dict of our Pre-LN-equivalent model for transformers' stock class."""
    common = dict(vocab_size=config.vocab_size, tie_word_embeddings=config.tie_embeddings, initializer_range=0.02,
                  bos_token_id=end_of_text, eos_token_id=end_of_text, pad_token_id=None)
    if config.arch == 'gpt':
        # GPT-2 has biases everywhere and no grouped-query attention; zero biases and repeated key/value heads
        # (see tensors_to_hf) compute the same as ours without them
        return dict(model_type='gpt2', architectures=['GPT2LMHeadModel'], n_layer=config.n_layer,
                    n_head=config.n_head, n_embd=config.n_embd, n_inner=config.ffn_hidden,
                    n_positions=config.block_size, activation_function='gelu_new',
                    layer_norm_epsilon=config.norm_eps, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
                    attn_pdrop=config.dropout, scale_attn_weights=True, **common)
    model_type = hf_model_type(config)
    architecture = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM'}[model_type]
    if model_type == 'qwen2':
        biases = dict(use_sliding_window=False)
    else:  # Llama's attention_bias covers q, k, v and o, so zeros fill the ones ours lacks
        biases = dict(attention_bias=config.bias or config.qkv_bias, mlp_bias=config.bias)
    return dict(model_type=model_type, architectures=[architecture], num_hidden_layers=config.n_layer,
                num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
                head_dim=config.n_embd // config.n_head, hidden_size=config.n_embd,
                intermediate_size=config.ffn_hidden, max_position_embeddings=config.block_size, hidden_act='silu',
                rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, rope_scaling=None,
                attention_dropout=config.dropout, **biases, **common)


def folded_state_dict(model):
    """Our state dict as a Pre-LN model without residual gains: each norm's weight and bias times its LNS factor;
    each output projection's rows and bias times the factor and gain on its sublayer's output."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.blocks):
        prefix = f'blocks.{i}.'
        # the LNS factors model.Block multiplies by: plain floats, 1/sqrt(l) where its lns_position puts them, else 1
        for norm, factor in (('attn_norm', block.attn_lns_scale), ('mlp_norm', block.mlp_lns_scale)):
            for kind in ('weight', 'bias'):
                if prefix + f'{norm}.{kind}' in state:
                    state[prefix + f'{norm}.{kind}'] *= factor
        for sublayer in ('attn', 'mlp'):
            # branch output = (W z + b) * gain * factor, so W's rows and b take gain * factor
            gain = state.pop(prefix + f'{sublayer}_gain', torch.tensor(1.0)).float() * block.sublayer_lns_scale
            weight = state[prefix + f'{sublayer}.proj.weight']
            state[prefix + f'{sublayer}.proj.weight'] = (weight.float() * gain.reshape(-1, 1)).to(weight.dtype)
            if prefix + f'{sublayer}.proj.bias' in state:
                bias = state[prefix + f'{sublayer}.proj.bias']
                state[prefix + f'{sublayer}.proj.bias'] = (bias.float() * gain.reshape(-1)).to(bias.dtype)
    return state


def repeat_key_value_heads(t, config):
    """The rows [q; k; v] of a fused qkv weight or bias with each key/value head repeated for the
    n_head/n_kv_head query heads it serves in a row (see Attention), for a class without grouped-query attention."""
    head_dim, group = config.n_embd // config.n_head, config.n_head // config.n_kv_head
    q, k, v = t.split([config.n_embd, config.n_kv_head * head_dim, config.n_kv_head * head_dim])
    k, v = (x.unflatten(0, (config.n_kv_head, head_dim)).repeat_interleave(group, dim=0).flatten(0, 1) for x in (k, v))
    return torch.cat([q, k, v])


def tensors_to_hf(config, state):
    """Hugging Face tensors (names and layouts of the stock class) from a folded state dict of ours."""
    head_dim = config.n_embd // config.n_head

    def bias_of(name, size):  # a zero bias where ours has none, for a class that always has one
        return state.get(name, torch.zeros(size, dtype=state[name.replace('bias', 'weight')].dtype))

    tensors = {}
    if config.arch == 'gpt':
        tensors['transformer.wte.weight'] = state['tok_emb.weight']
        tensors['transformer.wpe.weight'] = state['pos_emb.weight']
        tensors['transformer.ln_f.weight'] = state['final_norm.weight']
        tensors['transformer.ln_f.bias'] = bias_of('final_norm.bias', config.n_embd)
        for i in range(config.n_layer):
            for ours, theirs in GPT2_BLOCK_NAMES:
                weight = state[f'blocks.{i}.{ours}.weight']
                bias = bias_of(f'blocks.{i}.{ours}.bias', weight.shape[0])
                if ours == 'attn.qkv' and config.n_kv_head != config.n_head:
                    weight, bias = repeat_key_value_heads(weight, config), repeat_key_value_heads(bias, config)
                # Conv1D stores its matrix as (in, out), nn.Linear as (out, in)
                tensors[f'transformer.h.{i}.{theirs}.weight'] = weight if ours.endswith('norm') else weight.t()
                tensors[f'transformer.h.{i}.{theirs}.bias'] = bias
    else:
        attention_bias = hf_model_type(config) == 'qwen2' or config.bias or config.qkv_bias
        tensors['model.embed_tokens.weight'] = state['tok_emb.weight']
        tensors['model.norm.weight'] = state['final_norm.weight']
        sizes = [config.n_embd, config.n_kv_head * head_dim, config.n_kv_head * head_dim]
        for i in range(config.n_layer):
            ours, theirs = f'blocks.{i}.', f'model.layers.{i}.'
            tensors[theirs + 'input_layernorm.weight'] = state[ours + 'attn_norm.weight']
            tensors[theirs + 'post_attention_layernorm.weight'] = state[ours + 'mlp_norm.weight']
            for p, weight in zip('qkv', state[ours + 'attn.qkv.weight'].split(sizes)):
                tensors[f'{theirs}self_attn.{p}_proj.weight'] = weight
            if attention_bias:
                for p, bias in zip('qkv', bias_of(ours + 'attn.qkv.bias', sum(sizes)).split(sizes)):
                    tensors[f'{theirs}self_attn.{p}_proj.bias'] = bias
            tensors[theirs + 'self_attn.o_proj.weight'] = state[ours + 'attn.proj.weight']
            gate, up = state[ours + 'mlp.fc.weight'].chunk(2)
            tensors[theirs + 'mlp.gate_proj.weight'], tensors[theirs + 'mlp.up_proj.weight'] = gate, up
            tensors[theirs + 'mlp.down_proj.weight'] = state[ours + 'mlp.proj.weight']
            if hf_model_type(config) == 'llama' and attention_bias:
                tensors[theirs + 'self_attn.o_proj.bias'] = bias_of(ours + 'attn.proj.bias', config.n_embd)
            if config.bias:
                gate, up = state[ours + 'mlp.fc.bias'].chunk(2)
                tensors[theirs + 'mlp.gate_proj.bias'], tensors[theirs + 'mlp.up_proj.bias'] = gate, up
                tensors[theirs + 'mlp.down_proj.bias'] = state[ours + 'mlp.proj.bias']
    if not config.tie_embeddings:  # a tied head is the embedding; the stock classes tie it on loading
        tensors['lm_head.weight'] = state['lm_head.weight']
    return {name: t.contiguous() for name, t in tensors.items()}


def gpt2_bpe_files():
    """Paths of GPT-2's vocab.json and merges.txt in tiktoken's cache, or None when they are not there."""
    cache = os.environ.get('TIKTOKEN_CACHE_DIR') or os.environ.get('DATA_GYM_CACHE_DIR') or os.path.join(
        tempfile.gettempdir(), 'data-gym-cache')
    paths = {}
    for name, (url, sha256) in GPT2_BPE_FILES.items():
        path = os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())
        if not os.path.isfile(path):
            return None
        with open(path, 'rb') as f:
            if hashlib.sha256(f.read()).hexdigest() != sha256:
                return None
        paths[name] = path
    return paths


def write_tokenizer(folder, data_meta, block_size):
    """The tokenizer files of our dataset's tokenizer, for AutoTokenizer; returns a sentence on what was written."""
    tokenizer = (data_meta or {}).get('tokenizer')
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        return "no tokenizer files: pip install tokenizers to write them"
    if tokenizer == 'char':
        # one token per character: a BPE with the characters as its vocabulary and no merges, decoded by joining.
        # Its unknown token is not in the vocabulary, so that a character the model never saw makes encoding fail
        # (tokenizers: "Unk token ... not found") instead of being dropped from the text without a word
        bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(data_meta['chars'])}, merges=[],
                                   unk_token=UNSEEN_CHARACTER))
        bpe.decoder = decoders.Fuse()
        bpe.save(os.path.join(folder, 'tokenizer.json'))
        settings = {'tokenizer_class': 'PreTrainedTokenizerFast'}
    elif tokenizer == 'gpt2':
        paths = gpt2_bpe_files()
        if paths is None:
            return ("no tokenizer files: GPT-2's vocab.json and merges.txt are not in tiktoken's cache (set "
                    "TIKTOKEN_CACHE_DIR); the model reads GPT-2 BPE, e.g. AutoTokenizer for openai-community/gpt2")
        for name, path in paths.items():
            shutil.copyfile(path, os.path.join(folder, name))
        bpe = Tokenizer(models.BPE.from_file(os.path.join(folder, 'vocab.json'), os.path.join(folder, 'merges.txt')))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.add_special_tokens([AddedToken('<|endoftext|>', special=True)])
        bpe.save(os.path.join(folder, 'tokenizer.json'))
        settings = {'tokenizer_class': 'GPT2Tokenizer', 'bos_token': '<|endoftext|>', 'eos_token': '<|endoftext|>',
                    'unk_token': '<|endoftext|>', 'add_prefix_space': False}
    elif tokenizer is None:
        return "no tokenizer files: the checkpoint records no tokenizer"
    else:
        return f"no tokenizer files: to_hf writes char and gpt2 tokenizers, not {tokenizer!r}"
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
        json.dump({**settings, 'model_max_length': block_size}, f, indent=1)
    return f"tokenizer: {tokenizer}"


def check_exportable(config):
    if config.norm_scheme not in EXPORTABLE_SCHEMES:
        raise ValueError(f"norm_scheme {config.norm_scheme!r} cannot be exported: transformers' GPT-2 and Llama "
                         f"classes are Pre-LN, which only {' and '.join(EXPORTABLE_SCHEMES)} models (with any "
                         f"lns_position, init_scheme, layerscale or skipinit) reduce to")


@torch.no_grad()
def to_hf(model, folder, data_meta=None):
    """Writes `model` as a Hugging Face folder (config.json, model.safetensors, tokenizer files when data_meta names
    a tokenizer we can write) and returns a sentence about the tokenizer. The folder is written beside its
    destination, read back with from_hf and checked logit for logit, then renamed into place, so a failed export
    leaves an existing folder as it was."""
    from safetensors.torch import save_file
    config = model.config
    check_exportable(config)
    folder = os.path.normpath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder} is a file; choose a folder for the export")
    if os.path.isdir(folder) and not set(os.listdir(folder)) <= set(EXPORT_FILES):
        raise ValueError(f"{folder} already holds files that an export does not write; choose a new folder")
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(folder)}.', dir=parent)
    try:
        gpt2_tokens = (data_meta or {}).get('tokenizer') == 'gpt2' and config.vocab_size > GPT2_END_OF_TEXT
        end_of_text = GPT2_END_OF_TEXT if gpt2_tokens else None
        with open(os.path.join(staging, 'config.json'), 'w') as f:
            json.dump(config_to_hf(config, end_of_text), f, indent=1)
        save_file(tensors_to_hf(config, folded_state_dict(model)), os.path.join(staging, 'model.safetensors'),
                  metadata={'format': 'pt'})
        tokenizer_note = write_tokenizer(staging, data_meta, config.block_size)
        check_logits(model, staging)
        follow_umask(staging)
        replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer_note


def check_logits(model, folder):
    """Raises ValueError unless the folder, read back with from_hf, gives the model's logits (up to rounding)."""
    device = next(model.parameters()).device
    idx = torch.arange(min(16, model.config.block_size), device=device)[None] % model.config.vocab_size
    was_training = model.training
    model.eval()
    expected = model(idx)[0].float()
    model.train(was_training)
    written = from_hf(folder, device=device, dtype=next(model.parameters()).dtype).eval()
    difference = (written(idx)[0].float() - expected).abs().max().item()
    if difference > 1e-3 * max(1.0, expected.abs().max().item()):
        raise ValueError(f"the written folder's logits differ from the model's by {difference:.3g}; "
                         f"nothing was written, please report this model's config")


def follow_umask(folder):
    """Gives the folder and its files the modes of any other output (0o777 and 0o666 less the umask), where
    mkdtemp and safetensors create them readable by their owner only."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def replace_folder(new, folder):
    """Moves `new` to `folder`; an existing export there is swapped out first and removed only after the move."""
    old = None
    if os.path.exists(folder):
        old = tempfile.mkdtemp(prefix=f'.{os.path.basename(folder)}.old.', dir=os.path.dirname(new))
        os.rename(folder, os.path.join(old, 'folder'))
    try:
        os.rename(new, folder)
    except OSError:
        if old:
            os.rename(os.path.join(old, 'folder'), folder)
        raise
    if old:
        shutil.rmtree(old)


# ----------------------------------------------------------------------------- a model and its tokenizer, for the tools
# (sample.py, eval_layers.py, tasks.py): from our run folder or checkpoint, a Hugging Face folder, or a hub id

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


# ----------------------------------------------------------------------------- command line

def export(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('source', metavar='RUN_OR_CHECKPOINT', help='a run folder of train.py or a checkpoint file')
    parser.add_argument('folder', metavar='HF_FOLDER', help='the Hugging Face folder to write')
    parser.add_argument('--overwrite', action='store_true', help='replace an earlier export in HF_FOLDER')
    args = parser.parse_args(argv)
    path = os.path.join(args.source, 'ckpt.pt') if os.path.isdir(args.source) else args.source
    if not os.path.exists(path) and os.path.isfile(os.path.join(args.source, 'config.json')):
        swapped = os.path.isfile(os.path.join(args.folder, 'ckpt.pt')) or (
            os.path.isfile(args.folder) and args.folder.endswith('.pt'))
        raise UserError(f"{args.source} is a Hugging Face folder (config.json), not a run of train.py: " + (
            f"the two arguments are swapped; run python hf.py {args.folder} {args.source}" if swapped else
            f"hf.py writes such a folder from a run (python hf.py RUN_FOLDER {args.source}), and eval_layers.py "
            f"and sample.py read it as it is"))
    if os.path.isfile(os.path.join(args.folder, 'config.json')) and not args.overwrite:
        raise UserError(f"{args.folder} already holds an export (its config.json); pass --overwrite to replace it, "
                        f"or choose another folder")
    try:
        checkpoint = read_checkpoint(path)
        model = GPT.from_checkpoint(checkpoint)
        tokenizer_note = to_hf(model, args.folder, checkpoint.get('data_meta'))
    except (ValueError, OSError) as error:
        raise UserError(str(error)) from None
    config, architecture = model.config, config_to_hf(model.config)['architectures'][0]
    folded = ' with 1/sqrt(l) folded into the weights' if config.norm_scheme == 'lns' else ''
    print(f"wrote {args.folder}: {config.norm_scheme} {config.arch} model{folded} as {architecture}; "
          f"{tokenizer_note}")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({args.folder!r})")


def main(argv):
    return run_main(export, argv)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
