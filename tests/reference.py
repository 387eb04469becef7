"""Slow reference forwards written from the paper's formulas, independent of model.py's Block and Norm.

They reuse only the embeddings, the sublayers A (attention) and F (MLP), the learnable residual gains and the
output head of a model; every norm, every residual connection and every factor is written out here."""

import math
from fractions import Fraction

import torch

from model import GPT, GPTConfig, rope_cos_sin


def tiny_config(arch, norm_scheme='pre', **overrides):
    values = dict(arch=arch, norm_scheme=norm_scheme, n_layer=4, n_head=4, n_embd=32, block_size=16, vocab_size=50)
    values.update(overrides)
    return GPTConfig(**values)


@torch.no_grad()
def randomize(model, seed=0):
    """Non-trivial values everywhere, so that norm weights, biases and gains matter (at init they are 1 and 0)."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        p.copy_(1 + 0.3 * noise if name.endswith('norm.weight') or name.endswith('gain') else 0.1 * noise)
    return model


def tokens(config, batch=2, seq=12, seed=1):
    return torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def reference_norm(config, norm, x):
    """LayerNorm (gpt) or RMSNorm in fp32 (llama) written out, with the module's own weight and bias, unscaled."""
    if config.arch == 'llama':
        x32 = x.float()
        return (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + config.norm_eps)).type_as(x) * norm.weight
    mean = x.mean(-1, keepdim=True)
    variance = (x - mean).pow(2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(variance + config.norm_eps) * norm.weight
    return y + norm.bias if norm.bias is not None else y


@torch.no_grad()
def reference_residuals(model, idx, skip=()):
    """The residual stream entering block 1, then after each block l = 1..L, from the formulas:
    pre       h = x + A(N(x));             y = h + F(N(h))
    lns       pre with N(.) * 1/sqrt(l) (lns_position 'both_norms'; 'attn_norm'/'mlp_norm' one; 'sublayer' A(.), F(.))
    post      h = N(x + A(x));             y = N(h + F(h))
    deepnorm  h = N(a*x + A(x));           y = N(a*h + F(h)), a = (2L)^(1/4)
    mix       post for the blocks l <= mix_ratio * L (mix_ratio read as the decimal written), pre after
    peri      h = x + N2(A(N1(x)));        y = h + N4(F(N3(h)))
    What a sublayer adds to the residual stream (A(.), F(.), or N2(A(.)) and N4(F(.)) under peri) is multiplied
    by the block's layerscale or skipinit gain when one is on."""
    config = model.config
    scheme, L, T = config.norm_scheme, config.n_layer, idx.size(1)
    x = model.tok_emb(idx)
    rope = None
    if config.arch == 'gpt':
        x = x + model.pos_emb.weight[:T]
    else:
        rope = rope_cos_sin(T, config.n_embd // config.n_head, config.rope_theta, idx.device)

    def post_ln(depth):
        return scheme in ('post', 'deepnorm') or scheme == 'mix' and depth <= Fraction(str(config.mix_ratio)) * L

    a = (2 * L) ** 0.25 if scheme == 'deepnorm' else 1.0
    residuals = [x]
    for depth, block in enumerate(model.blocks, start=1):
        if depth not in skip:
            def N(norm, z):
                return reference_norm(config, norm, z)

            def A(z):
                return block.attn(z, rope)

            F = block.mlp
            g_attn = 1.0 if block.attn_gain is None else block.attn_gain
            g_mlp = 1.0 if block.mlp_gain is None else block.mlp_gain
            if scheme == 'peri':
                h = x + g_attn * N(block.attn_out_norm, A(N(block.attn_norm, x)))
                x = h + g_mlp * N(block.mlp_out_norm, F(N(block.mlp_norm, h)))
            elif post_ln(depth):
                h = N(block.attn_norm, a * x + g_attn * A(x))
                x = N(block.mlp_norm, a * h + g_mlp * F(h))
            else:
                s = 1 / math.sqrt(depth) if scheme == 'lns' else 1.0
                position = config.lns_position
                s_attn_norm = s if position in ('both_norms', 'attn_norm') else 1.0
                s_mlp_norm = s if position in ('both_norms', 'mlp_norm') else 1.0
                s_sublayer = s if position == 'sublayer' else 1.0
                h = x + s_sublayer * g_attn * A(N(block.attn_norm, x) * s_attn_norm)
                x = h + s_sublayer * g_mlp * F(N(block.mlp_norm, h) * s_mlp_norm)
        residuals.append(x)
    return residuals


@torch.no_grad()
def reference_logits(model, idx, skip=()):
    x = reference_residuals(model, idx, skip)[-1]
    return model.lm_head(reference_norm(model.config, model.final_norm, x))


def build(config, seed=0):
    return randomize(GPT(config), seed)
