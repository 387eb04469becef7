"""
GPT-2 and Llama decoder-only transformers with a choice of normalization scheme, for studying
"The Curse of Depth in Large Language Models" (Sun et al., 2025, arXiv 2502.05795).

norm_scheme (x = residual stream entering block l, l = 1..L, N = the architecture's norm, A = attention, F = MLP):
  pre       h = x + A(N(x));               y = h + F(N(h))
  lns       h = x + A(N(x) / sqrt(l));     y = h + F(N(h) / sqrt(l))        (LayerNorm Scaling, the paper's method)
  post      h = N(x + A(x));               y = N(h + F(h))
  deepnorm  h = N(a*x + A(x));             y = N(a*h + F(h)), a = (2L)^(1/4), with DeepNet's init
  mix       post for blocks 1..floor(mix_ratio * L), pre after them (Mix-LN)
  peri      h = x + N2(A(N1(x)));          y = h + N4(F(N3(h)))             (Peri-LN / Sandwich-LN)
Every scheme ends with a final norm before the output head (as the paper's code does, Post-LN included).

Block numbers l are 1-based everywhere in this file, as in the paper's formulas.
"""

import inspect
import math
import os
import zipfile
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

ARCHS = ('gpt', 'llama')
NORM_SCHEMES = ('pre', 'lns', 'post', 'deepnorm', 'mix', 'peri')
INIT_SCHEMES = ('normal', 'scaled', 'depth')
LNS_POSITIONS = ('both_norms', 'attn_norm', 'mlp_norm', 'sublayer')
LNS_MODES = ('fixed', 'gain_init')


@dataclass
class GPTConfig:
    # the defaults are train.py's default run, a small deep Llama with LNS (GPT-2 small: arch='gpt',
    # norm_scheme='pre', n_head=12, n_embd=768)
    # 'gpt': GPT-2 (LayerNorm, learned positions, GELU); 'llama': RMSNorm, RoPE, SwiGLU, grouped-query attention
    arch: str = 'llama'
    norm_scheme: str = 'lns'             # see the module docstring
    n_layer: int = 12
    n_head: int = 4
    n_kv_head: Optional[int] = None      # key/value heads for grouped-query attention; None: n_head
    n_embd: int = 128
    ffn_hidden: Optional[int] = None     # MLP hidden size; None: 4*n_embd (gpt), 8/3*n_embd to a multiple of 8 (llama)
    block_size: int = 1024               # longest sequence the model accepts
    vocab_size: int = 50304              # GPT-2's 50257 tokens padded to a multiple of 64
    bias: Optional[bool] = None          # biases in Linear and LayerNorm; None: True (gpt), False (llama)
    qkv_bias: Optional[bool] = None      # biases on the query/key/value projection; None: as bias (Qwen2: True alone)
    dropout: float = 0.0
    norm_eps: Optional[float] = None     # None: 1e-5 (gpt LayerNorm), 1e-6 (llama RMSNorm)
    rope_theta: float = 10000.0          # llama only
    tie_embeddings: Optional[bool] = None  # the output head shares the token embedding; None: True (gpt), False (llama)
    mix_ratio: float = 0.25              # mix: the first floor(mix_ratio * n_layer) blocks are post, the rest pre
    lns_position: str = 'both_norms'     # lns only (paper Table 8): where 1/sqrt(l) goes, see Block
    lns_mode: str = 'fixed'              # lns only: 'fixed', the paper's constant factor after the norm; 'gain_init',
                                         # the norm weights start at the factor and train (as GPAS and ProRes do it)
    # alternatives to LNS that the paper compares (Table 6); they combine with any norm_scheme
    init_scheme: str = 'normal'          # 'normal': 0.02 everywhere; 'scaled': residual-output projections
                                         # 0.02/sqrt(2L); 'depth': those 0.02/sqrt(2l)
    layerscale: bool = False             # a learnable per-channel scale on each residual branch (CaiT)
    layerscale_init: Optional[float] = None  # None: CaiT's rule, 0.1 up to 18 blocks, 1e-5 up to 24, 1e-6 beyond
    skipinit: bool = False               # a learnable scalar on each residual branch, initialised 1/sqrt(L)
    # the authors' code differs from the paper's text here (see README, "Paper scale")
    embedding_init_std: float = 0.02     # std of the token (and position) embeddings' init (public LNS code: 0.632)
    train_norm_gains: bool = True        # False: norm weights stay at 1 (pure bf16 training leaves them there)

    def __post_init__(self):
        self.fill_defaults()
        self.validate()

    def fill_defaults(self):
        """Settings left None take the architecture's defaults (see each field's comment)."""
        llama = self.arch == 'llama'
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None:
            self.ffn_hidden = 8 * math.ceil(8 * self.n_embd / 3 / 8) if llama else 4 * self.n_embd
        if self.bias is None:
            self.bias = not llama
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.norm_eps is None:
            self.norm_eps = 1e-6 if llama else 1e-5
        if self.tie_embeddings is None:
            self.tie_embeddings = not llama
        if self.layerscale_init is None:
            self.layerscale_init = 0.1 if self.n_layer <= 18 else 1e-5 if self.n_layer <= 24 else 1e-6

    def validate(self):
        """ValueError, in one sentence naming the valid choices, for a setting or combination the model cannot be."""
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, not {self.arch!r}")
        for name, choices in (('norm_scheme', NORM_SCHEMES), ('init_scheme', INIT_SCHEMES),
                              ('lns_position', LNS_POSITIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, not {getattr(self, name)!r}")
        if self.lns_position != 'both_norms' and self.norm_scheme != 'lns':
            raise ValueError(f"lns_position only applies to norm_scheme='lns', not {self.norm_scheme!r}; "
                             f"leave it 'both_norms'")
        if self.lns_mode not in LNS_MODES:
            raise ValueError(f"lns_mode must be one of {', '.join(LNS_MODES)}, not {self.lns_mode!r}")
        if self.lns_mode == 'gain_init' and (self.norm_scheme != 'lns' or self.lns_position == 'sublayer'):
            raise ValueError("lns_mode='gain_init' puts 1/sqrt(l) into the norm weights, so it needs "
                             "norm_scheme='lns' with the factor on a norm (not lns_position='sublayer')")
        if self.norm_scheme == 'deepnorm' and self.init_scheme != 'normal':
            raise ValueError("deepnorm brings its own init; leave init_scheme='normal' with it")
        if self.layerscale and self.skipinit:
            raise ValueError("layerscale and skipinit both scale the residual branches; choose one")
        if not 0.0 <= self.mix_ratio <= 1.0:
            raise ValueError(f"mix_ratio must be in [0, 1], not {self.mix_ratio}")
        for name in ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'ffn_hidden', 'block_size', 'vocab_size'):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, not {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.arch == 'llama' and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head size; n_embd/n_head is {self.n_embd // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, not {self.norm_eps}")
        if self.embedding_init_std <= 0:
            raise ValueError(f"embedding_init_std must be positive, not {self.embedding_init_std}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        """The config a checkpoint saved."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model setting(s) {', '.join(unknown)}; "
                             f"known ones are {', '.join(sorted(known))}")
        return cls(**values)


def block_layout(config, index):
    """Where block l = index puts its norms: 'norm_before' each sublayer (pre, lns, mix after the boundary),
    'norm_after' each residual addition (post, deepnorm, mix's first floor(mix_ratio * L) blocks) or
    'norm_around' each sublayer (peri). Mix-LN's count of Post-LN blocks rounds down, as the
    Mix-LN paper's floor(alpha L) does: at mix_ratio 0.25, 2 blocks give none, 6 give 1 and 10 give 2 (Python's
    round() would give 0, 2 and 2, sending halves to the even neighbour)."""
    if config.norm_scheme == 'mix':
        # to 6 decimals before rounding down, so that 0.29 * 100 = 28.999999999999996 still counts 29 blocks
        return 'norm_after' if index <= math.floor(round(config.mix_ratio * config.n_layer, 6)) else 'norm_before'
    return {'pre': 'norm_before', 'lns': 'norm_before', 'post': 'norm_after', 'deepnorm': 'norm_after',
            'peri': 'norm_around'}[config.norm_scheme]


def deepnorm_constants(n_layer):
    """DeepNet's decoder-only constants (Wang et al., 2022): residual multiplier a = (2L)^(1/4) and init gain
    b = (8L)^(-1/4)."""
    return (2 * n_layer) ** 0.25, (8 * n_layer) ** -0.25


class Norm(nn.Module):
    """LayerNorm (gpt) or RMSNorm (llama; statistics in fp32, output in the input's dtype)."""

    def __init__(self, config):
        super().__init__()
        self.rms = config.arch == 'llama'
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.n_embd), requires_grad=config.train_norm_gains)
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if config.bias and not self.rms else None

    def forward(self, x):
        if self.rms:
            return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)
        return F.layer_norm(x, (x.size(-1),), self.weight, self.bias, self.eps)


def rope_cos_sin(seq_len, head_dim, theta, device):
    """cos and sin tables of shape (seq_len, head_dim) in the rotate-half layout of Hugging Face Llama."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotates each (i, i + head_dim/2) pair of x (batch, heads, seq, head_dim) by its position's angle."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return (x * cos + rotated_half * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        # query, key and value projections fused into one matmul: n_head + 2*n_kv_head heads of head_dim
        self.qkv_sizes = [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]
        self.qkv = nn.Linear(config.n_embd, sum(self.qkv_sizes), bias=config.qkv_bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, rope):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.qkv_sizes, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_head != self.n_head:  # grouped-query attention: each key/value head serves a group of query heads
            group = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.arch == 'llama'
        # gpt: proj(gelu(fc(x))); llama: proj(silu(gate(x)) * up(x)) with gate and up fused into fc
        self.fc = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * config.ffn_hidden, bias=config.bias)
        self.proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        return self.proj(F.gelu(self.fc(x), approximate='tanh'))


class Block(nn.Module):
    """Block l of L. Its layout says where the norms sit: 'norm_before' each sublayer (pre, lns, mix after its
    boundary), 'norm_after' each residual addition (post, deepnorm, mix's first blocks) or 'norm_around' each
    sublayer, before and after (peri)."""

    def __init__(self, config, index):
        super().__init__()
        self.index = index  # l, 1-based
        self.layout = block_layout(config, index)
        self.attn_norm, self.mlp_norm = Norm(config), Norm(config)
        self.attn, self.mlp = Attention(config), MLP(config)
        if self.layout == 'norm_around':
            self.attn_out_norm, self.mlp_out_norm = Norm(config), Norm(config)
        # LayerNorm Scaling, every factor a plain float outside the state dict (1 where LNS is off)
        self.lns_scale = 1.0 / math.sqrt(index) if config.norm_scheme == 'lns' else 1.0
        # lns_position (paper Table 8): on both norm outputs (the method), on one of them, or on A(.) and F(.) instead
        attn_factor = self.lns_scale if config.lns_position in ('both_norms', 'attn_norm') else 1.0
        mlp_factor = self.lns_scale if config.lns_position in ('both_norms', 'mlp_norm') else 1.0
        self.sublayer_lns_scale = self.lns_scale if config.lns_position == 'sublayer' else 1.0
        # lns_mode 'gain_init': the factors are the norms' initial weights instead (init_weights), which then train
        gain_init = config.lns_mode == 'gain_init'
        self.attn_lns_scale, self.mlp_lns_scale = (1.0, 1.0) if gain_init else (attn_factor, mlp_factor)
        self.norm_weight_init = (attn_factor, mlp_factor) if gain_init else (1.0, 1.0)
        self.deepnorm_alpha = deepnorm_constants(config.n_layer)[0] if config.norm_scheme == 'deepnorm' else 1.0
        # learnable gains on the residual branches: LayerScale per channel, SkipInit one scalar
        self.attn_gain = self.mlp_gain = None
        if config.layerscale:
            self.attn_gain = nn.Parameter(torch.full((config.n_embd,), config.layerscale_init))
            self.mlp_gain = nn.Parameter(torch.full((config.n_embd,), config.layerscale_init))
        elif config.skipinit:
            self.attn_gain = nn.Parameter(torch.tensor(1 / math.sqrt(config.n_layer)))
            self.mlp_gain = nn.Parameter(torch.tensor(1 / math.sqrt(config.n_layer)))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope):
        if self.layout == 'norm_before':  # pre, lns, and mix after its boundary
            # h = x + A(N(x) * s); y = h + F(N(h) * s), s = lns_scale (1/sqrt(l) under lns where lns_position puts it)
            h = x + self.residual_branch(self.attn(self.attn_norm(x) * self.attn_lns_scale, rope), self.attn_gain)
            return h + self.residual_branch(self.mlp(self.mlp_norm(h) * self.mlp_lns_scale), self.mlp_gain)
        if self.layout == 'norm_after':  # post and mix's first blocks (a = 1); deepnorm (a = (2L)^(1/4))
            # h = N(a*x + A(x)); y = N(a*h + F(h))
            a = self.deepnorm_alpha
            h = self.attn_norm(a * x + self.residual_branch(self.attn(x, rope), self.attn_gain))
            return self.mlp_norm(a * h + self.residual_branch(self.mlp(h), self.mlp_gain))
        # peri: h = x + N2(A(N1(x))); y = h + N4(F(N3(h)))
        h = x + self.residual_branch(self.attn_out_norm(self.attn(self.attn_norm(x), rope)), self.attn_gain)
        return h + self.residual_branch(self.mlp_out_norm(self.mlp(self.mlp_norm(h))), self.mlp_gain)

    def residual_branch(self, y, gain):
        """What a sublayer's output y adds to the residual stream: dropout(y) * gain * sublayer_lns_scale, each
        factor multiplied only where it is on (gain: layerscale or skipinit; sublayer_lns_scale: lns_position
        'sublayer')."""
        y = self.dropout(y)
        if gain is not None:
            y = y * gain
        return y * self.sublayer_lns_scale if self.sublayer_lns_scale != 1.0 else y

    def effective_norm_gain(self):
        """The mean gain of the block's norms as the residual stream feels it: weight times the LNS factor."""
        gains = [self.attn_norm.weight * self.attn_lns_scale, self.mlp_norm.weight * self.mlp_lns_scale]
        if self.layout == 'norm_around':
            gains += [self.attn_out_norm.weight, self.mlp_out_norm.weight]
        return sum(gain.float().mean().item() for gain in gains) / len(gains)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.arch == 'gpt' else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, index) for index in range(1, config.n_layer + 1))
        self.final_norm = Norm(config)  # never scaled
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.activation_checkpointing = False  # True: recompute block activations in backward, to save memory
        self.loss_chunk_tokens = 0  # N: the training loss over N tokens at a time (forward without logits)
        self.init_weights()

    @classmethod
    def on_device(cls, config, device):
        """The model made on `device`, its weights drawn from that device's generator; on a GPU without a float32
        copy in CPU memory first (5.4 GB per process at 1B): made on the meta device (shapes only), then moved."""
        if device.type == 'cpu':
            return cls(config)
        with torch.device('meta'):
            model = cls(config)
        model.to_empty(device=device)
        model.init_weights()
        return model

    @torch.no_grad()
    def init_weights(self):
        """normal(0, 0.02) for every matrix, normal(0, embedding_init_std) for the embeddings, zero biases, unit
        norm weights (under lns_mode 'gain_init' a block's two norms start at its LNS factors), LayerScale's gains at
        layerscale_init and SkipInit's at 1/sqrt(L); then init_scheme's residual-output projections, or DeepNet's
        Xavier init under deepnorm. Every tensor is set here, so a model made on the meta device and moved with
        to_empty is initialised by this alone."""
        for module in self.modules():
            if isinstance(module, Norm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.embedding_init_std)
            elif isinstance(module, nn.Linear) and module.weight is not self.tok_emb.weight:  # tied: the embedding
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        L = self.config.n_layer
        for block in self.blocks:
            nn.init.constant_(block.attn_norm.weight, block.norm_weight_init[0])
            nn.init.constant_(block.mlp_norm.weight, block.norm_weight_init[1])
            if block.attn_gain is not None:  # LayerScale's per-channel gains, or SkipInit's scalar
                for gain in (block.attn_gain, block.mlp_gain):
                    nn.init.constant_(gain, self.config.layerscale_init if self.config.layerscale else 1 / math.sqrt(L))
            residual_outputs = (block.attn.proj.weight, block.mlp.proj.weight)
            if self.config.init_scheme == 'scaled':
                for weight in residual_outputs:
                    nn.init.normal_(weight, mean=0.0, std=0.02 / math.sqrt(2 * L))
            elif self.config.init_scheme == 'depth':
                for weight in residual_outputs:
                    nn.init.normal_(weight, mean=0.0, std=0.02 / math.sqrt(2 * block.index))
            if self.config.norm_scheme == 'deepnorm':
                # Xavier-normal per projection (each slice of a fused matrix has its own fan-out):
                # gain 1 for query and key, b = (8L)^(-1/4) for value, attention output and the MLP
                b = deepnorm_constants(L)[1]
                q, k, v = block.attn.qkv.weight.split(block.attn.qkv_sizes)
                nn.init.xavier_normal_(q, gain=1.0)
                nn.init.xavier_normal_(k, gain=1.0)
                nn.init.xavier_normal_(v, gain=b)
                nn.init.xavier_normal_(block.attn.proj.weight, gain=b)
                for weight in block.mlp.fc.weight.chunk(2 if block.mlp.swiglu else 1):
                    nn.init.xavier_normal_(weight, gain=b)
                nn.init.xavier_normal_(block.mlp.proj.weight, gain=b)

    def num_params(self, exclude_embeddings=False):
        """Parameter count, shared tensors once. exclude_embeddings drops the input embedding tables
        (token and position); a head tied to the token embedding still counts, since it is a matmul."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if not self.config.tie_embeddings:
                total -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                total -= self.pos_emb.weight.numel()
        return total

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token, PaLM style (Chowdhery et al., 2022, appendix B): 6N for the matmuls of
        the N non-embedding parameters, plus 12 * n_layer * n_embd * seq_len for attention scores and values."""
        seq_len = seq_len or self.config.block_size
        return 6 * self.num_params(exclude_embeddings=True) + 12 * self.config.n_layer * self.config.n_embd * seq_len

    def forward(self, idx, targets=None, skip_layers=(), return_residuals=False, return_logits=True):
        """idx: (batch, seq) token ids. targets: same shape, -1 where no loss is wanted.
        skip_layers: block numbers (1-based) to replace by the identity; the other blocks keep their own 1/sqrt(l).
        Returns (logits, loss), plus with return_residuals a list of L+1 tensors: the residual stream entering
        block 1 (the embeddings), then after each block l (before the final norm). return_logits=False gives None
        for the logits, so that training does not keep them (batch x seq x vocab) alive through the backward."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        skip = set(skip_layers)
        if not skip <= set(range(1, self.config.n_layer + 1)):
            raise ValueError(f"skip_layers must be block numbers from 1 to {self.config.n_layer}, not {sorted(skip)}")
        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        else:
            cos, sin = rope_cos_sin(T, self.config.n_embd // self.config.n_head, self.config.rope_theta, idx.device)
            rope = (cos.to(x.dtype), sin.to(x.dtype))
        x = self.dropout(x)
        residuals = [x]
        for block in self.blocks:
            if block.index in skip:
                pass
            elif self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
            residuals.append(x)
        x = self.final_norm(x)
        if targets is not None and not return_logits and self.loss_chunk_tokens:
            # chunk by chunk, each chunk's logits recomputed in the backward pass: never all of the (tokens x vocab)
            # float32 logits at once (at 350M, 524M of them per micro-step)
            x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
            n = self.loss_chunk_tokens
            sums = [torch.utils.checkpoint.checkpoint(self.loss_sum, chunk, chunk_targets, use_reentrant=False)
                    for chunk, chunk_targets in zip(x.split(n), targets.split(n))]
            loss = torch.stack(sums).sum() / (targets >= 0).sum()
            return (None, loss, residuals) if return_residuals else (None, loss)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        if not return_logits:
            logits = None
        return (logits, loss, residuals) if return_residuals else (logits, loss)

    def loss_sum(self, x, targets):
        return F.cross_entropy(self.lm_head(x).float(), targets, ignore_index=-1, reduction='sum')

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, skip_layers=()):
        """Appends max_new_tokens sampled tokens to idx (batch, seq); temperature 0 picks the most likely token.
        skip_layers: block numbers (1-based) replaced by the identity, as in forward."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:], skip_layers=skip_layers)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float('-inf'))
                next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
        return idx

    def depth_diagnostics(self, x, y):
        """Per block l = 1..L, on one batch in eval mode (autocast as the caller's): the variance of the residual
        stream after the block (the paper's Figure 4), the mean effective gain of its norms (weight times the LNS
        factor), and the gradient norm of its parameters. torch.autograd.grad leaves .grad alone, so training (DDP
        too) is untouched."""
        self.eval()
        with torch.enable_grad():
            _, loss, residuals = self(x, y, return_residuals=True, return_logits=False)
            params = [[p for p in block.parameters() if p.requires_grad] for block in self.blocks]
            grads = torch.autograd.grad(loss, [p for block in params for p in block], allow_unused=True)
        grad_norms, i = [], 0
        for block in params:
            block_grads = [g.float() for g in grads[i:i + len(block)] if g is not None]
            grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in block_grads])).item()
                              if block_grads else 0.0)
            i += len(block)
        self.train()
        return {'block_variance': [r.float().var(unbiased=False).item() for r in residuals[1:]],
                'block_norm_gain': [block.effective_norm_gain() for block in self.blocks],
                'block_grad_norm': grad_norms}

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices and embeddings only, not on 1-D tensors (norm weights, biases)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0},
        ]
        fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if fused else {}))

    @classmethod
    def from_checkpoint(cls, checkpoint):
        """Builds the model a checkpoint dict (see read_checkpoint) describes, with its weights."""
        model = cls(GPTConfig.from_dict(checkpoint['model_config']))
        model.load_state_dict(checkpoint['model'])
        return model


def read_checkpoint(path, mmap=False):
    """Loads a checkpoint written by train.py (tensors and plain types only) into CPU memory, or with mmap maps
    the file (tensors read from the page cache on first use); ValueError in one sentence otherwise, for a file
    that is missing, not a checkpoint, or damaged (each record's CRC-32 in the file is checked first, so a
    checkpoint with bytes changed on disk is never loaded). Move the model, not the checkpoint, to a GPU: RNG
    states must stay on the CPU."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}; train one first or check the path")
    if not zipfile.is_zipfile(path):
        with open(path, 'rb') as f:
            cut = f.read(4) == b'PK\x03\x04'  # how every zip file, and so every checkpoint, starts
        raise ValueError(f"{path} is " + ('cut short or damaged (a write that did not finish?)' if cut else
                                          'not a checkpoint (not a file torch.save wrote)'))
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        damaged = str(error)
    if damaged is not None:
        raise ValueError(f"{path} is damaged ({damaged} fails its checksum: the file changed after it was written)")
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception:  # torch's text would advise weights_only=False, which is never the fix for our checkpoints
        raise ValueError(f"{path} is not a checkpoint written by train.py (it holds more than tensors and plain "
                         f"values)") from None
    if not isinstance(checkpoint, dict) or not {'model', 'model_config'} <= set(checkpoint):
        raise ValueError(f"{path} is not a checkpoint written by train.py (no model weights and model_config)")
    return checkpoint
