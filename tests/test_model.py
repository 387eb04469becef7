"""model.py against the paper's formulas: each test is named after what it checks."""

import copy
import math

import pytest
import torch

from model import GPT, GPTConfig, Norm, apply_rope, rope_cos_sin
from reference import randomize, reference_logits, tiny_config, tokens

ARCHS = ['gpt', 'llama']


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('norm_scheme', ['pre', 'lns'])
def test_forward_matches_formula_reference(arch, norm_scheme):
    model = randomize(GPT(tiny_config(arch, norm_scheme)))
    idx = tokens(model.config)
    logits, _ = model(idx)
    torch.testing.assert_close(logits, reference_logits(model, idx), rtol=1e-5, atol=1e-5)


def lns_and_pre_with_the_same_weights(arch):
    lns = randomize(GPT(tiny_config(arch, 'lns')))
    pre = GPT(tiny_config(arch, 'pre'))
    pre.load_state_dict(lns.state_dict())
    return lns, pre, tokens(lns.config)


@pytest.mark.parametrize('arch', ARCHS)
def test_lns_equals_pre_with_block_l_norm_weights_times_inverse_sqrt_l(arch):
    lns, pre, idx = lns_and_pre_with_the_same_weights(arch)
    assert not torch.allclose(lns(idx)[0], pre(idx)[0], atol=1e-3)
    with torch.no_grad():
        for depth, block in enumerate(pre.blocks, start=1):
            for norm in (block.attn_norm, block.mlp_norm):
                norm.weight.mul_(1 / math.sqrt(depth))
                if norm.bias is not None:
                    norm.bias.mul_(1 / math.sqrt(depth))
    torch.testing.assert_close(lns(idx)[0], pre(idx)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('arch', ARCHS)
def test_pre_and_lns_share_block_1_and_differ_after_it(arch):
    lns, pre, idx = lns_and_pre_with_the_same_weights(arch)
    _, _, lns_residuals = lns(idx, return_residuals=True)
    _, _, pre_residuals = pre(idx, return_residuals=True)
    torch.testing.assert_close(lns_residuals[1], pre_residuals[1], rtol=0, atol=0)
    for depth in range(2, lns.config.n_layer + 1):
        assert (lns_residuals[depth] - pre_residuals[depth]).abs().max() > 1e-3, f"block {depth} is unscaled"


def test_lns_factor_is_a_plain_float_outside_the_state_dict():
    model = GPT(tiny_config('llama', 'lns', n_layer=6))
    for depth, block in enumerate(model.blocks, start=1):
        assert type(block.lns_scale) is float and block.lns_scale == 1 / math.sqrt(depth)
        assert block.attn_lns_scale == block.mlp_lns_scale == block.lns_scale and block.sublayer_lns_scale == 1.0
    assert not any('scale' in name for name in model.state_dict())
    # building on the meta device and materialising it (as large runs do) cannot wipe a Python float
    with torch.device('meta'):
        meta_model = GPT(tiny_config('llama', 'lns', n_layer=6))
    meta_model.to_empty(device='cpu')
    assert [b.lns_scale for b in meta_model.blocks] == [b.lns_scale for b in model.blocks]
    assert all(block.lns_scale == 1.0 for block in GPT(tiny_config('llama', 'pre', n_layer=6)).blocks)


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('skipped', [1, 3, 4])
def test_skipping_block_k_equals_the_model_without_it_with_factors_kept(arch, skipped):
    model = randomize(GPT(tiny_config(arch, 'lns')))
    idx = tokens(model.config)
    logits, _ = model(idx, skip_layers={skipped})
    torch.testing.assert_close(logits, reference_logits(model, idx, skip={skipped}), rtol=1e-5, atol=1e-5)
    deleted = copy.deepcopy(model)
    del deleted.blocks[skipped - 1]
    torch.testing.assert_close(logits, deleted(idx)[0], rtol=1e-5, atol=1e-5)
    # renumbering the remaining blocks (1/sqrt(1), 1/sqrt(2), ...) would be a different model
    renumbered = GPT(tiny_config(arch, 'lns', n_layer=3))
    renumbered.load_state_dict(deleted.state_dict())
    if skipped < 4:
        assert not torch.allclose(logits, renumbered(idx)[0], atol=1e-3)


def test_skip_layers_are_1_based_block_numbers():
    model = GPT(tiny_config('llama'))
    with pytest.raises(ValueError, match='from 1 to 4'):
        model(tokens(model.config), skip_layers={0})
    with pytest.raises(ValueError, match='from 1 to 4'):
        model(tokens(model.config), skip_layers={5})


def test_residuals_hold_embeddings_then_each_block_output():
    model = randomize(GPT(tiny_config('llama', 'lns')))
    idx = tokens(model.config)
    logits, _, residuals = model(idx, return_residuals=True)
    assert len(residuals) == model.config.n_layer + 1
    torch.testing.assert_close(residuals[0], model.tok_emb(idx))
    torch.testing.assert_close(logits, model.lm_head(model.final_norm(residuals[-1])))
    _, _, skipped = model(idx, skip_layers={2}, return_residuals=True)
    assert torch.equal(skipped[2], skipped[1])


def test_rope_scores_depend_only_on_relative_position():
    head_dim, generator = 16, torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=generator), torch.randn(head_dim, generator=generator)
    cos, sin = rope_cos_sin(40, head_dim, 10000.0, 'cpu')

    def score(query_pos, key_pos):
        return (apply_rope(q, cos[query_pos], sin[query_pos]) @ apply_rope(k, cos[key_pos], sin[key_pos])).item()

    for shift in (1, 7, 25):
        assert score(5 + shift, 2 + shift) == pytest.approx(score(5, 2), abs=1e-4)
        assert score(9 + shift, 9 + shift) == pytest.approx(score(9, 9), abs=1e-4)
    assert abs(score(5, 2) - score(5, 4)) > 1e-3


def test_rope_rotates_pairs_i_and_i_plus_half_by_position_times_frequency():
    # the rotate-half layout of Hugging Face Llama: pair (x[i], x[i + d/2]) is one complex number
    head_dim, theta, position = 8, 10000.0, 5
    x = torch.randn(head_dim)
    cos, sin = rope_cos_sin(position + 1, head_dim, theta, 'cpu')
    rotated = apply_rope(x, cos[position], sin[position])
    half = head_dim // 2
    for i in range(half):
        angle = position * theta ** (-2 * i / head_dim)
        z = complex(x[i], x[i + half]) * complex(math.cos(angle), math.sin(angle))
        assert rotated[i].item() == pytest.approx(z.real, abs=1e-5)
        assert rotated[i + half].item() == pytest.approx(z.imag, abs=1e-5)


def test_rmsnorm_output_has_unit_rms_before_its_weight():
    config = tiny_config('llama')
    norm = Norm(config)
    x = torch.randn(3, 5, config.n_embd) * 7 + 2
    y = norm(x)
    torch.testing.assert_close(y.pow(2).mean(-1).sqrt(), torch.ones(3, 5), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, config.n_embd))
    torch.testing.assert_close(norm(x), y * norm.weight, rtol=1e-5, atol=1e-5)


def test_rmsnorm_computes_in_fp32_for_bf16_input():
    config = tiny_config('llama')
    norm = Norm(config)
    x = (torch.randn(4, config.n_embd) * 100).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    exact = x.float() / x.float().pow(2).mean(-1, keepdim=True).add(config.norm_eps).sqrt()
    torch.testing.assert_close(y, exact.bfloat16(), rtol=0, atol=0)


def test_llama_defaults_follow_the_paper_recipe():
    config = GPTConfig(arch='llama', n_embd=1024, n_head=16)
    assert (config.bias, config.tie_embeddings, config.norm_eps, config.n_kv_head) == (False, False, 1e-6, 16)
    assert config.ffn_hidden == 2736  # the paper's 350M hidden size: 8/3 * 1024 rounded up to a multiple of 8
    gpt = GPTConfig(arch='gpt', n_embd=768, n_head=12)
    assert (gpt.bias, gpt.tie_embeddings, gpt.norm_eps, gpt.ffn_hidden) == (True, True, 1e-5, 4 * 768)


def test_grouped_query_attention_equals_full_attention_with_repeated_key_value_heads():
    grouped = randomize(GPT(tiny_config('llama', n_kv_head=2)))
    full = GPT(tiny_config('llama', n_kv_head=4))
    state = grouped.state_dict()
    head_dim, n_embd = 8, 32
    for depth in range(4):
        weight = state[f'blocks.{depth}.attn.qkv.weight']
        q, k, v = weight.split([n_embd, 2 * head_dim, 2 * head_dim])
        repeat = lambda w: w.view(2, head_dim, n_embd).repeat_interleave(2, dim=0).reshape(4 * head_dim, n_embd)
        state[f'blocks.{depth}.attn.qkv.weight'] = torch.cat([q, repeat(k), repeat(v)])
    full.load_state_dict(state)
    idx = tokens(grouped.config)
    torch.testing.assert_close(grouped(idx)[0], full(idx)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('arch', ARCHS)
def test_attention_is_causal(arch):
    model = randomize(GPT(tiny_config(arch)))
    idx = tokens(model.config)
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % model.config.vocab_size
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :8], after[:, :8])
    assert not torch.allclose(before[:, 8:], after[:, 8:])


def test_loss_is_mean_cross_entropy_and_ignores_minus_one():
    model = randomize(GPT(tiny_config('llama')))
    idx = tokens(model.config)
    targets = tokens(model.config, seed=2)
    targets[0, :5] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    expected = -torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_initial_loss_is_near_uniform_over_the_vocabulary():
    model = GPT(tiny_config('llama', vocab_size=200))
    idx = tokens(model.config, batch=8)
    _, loss = model(idx, idx)
    assert loss.item() == pytest.approx(math.log(200), abs=0.05)


def test_init_is_normal_002_for_every_matrix_and_embedding():
    model = GPT(GPTConfig(arch='llama', norm_scheme='lns', n_layer=2, n_head=4, n_embd=256, vocab_size=512))
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.03), name
            assert abs(p.mean().item()) < 1e-3, name
        else:
            assert torch.equal(p, torch.ones_like(p)), name


@pytest.mark.parametrize('arch', ARCHS)
def test_num_params_counts_every_tensor_once(arch):
    config = tiny_config(arch, n_kv_head=2 if arch == 'llama' else None)
    model = GPT(config)
    d, L, V, hidden, T = config.n_embd, config.n_layer, config.vocab_size, config.ffn_hidden, config.block_size
    head_dim = d // config.n_head
    if arch == 'llama':  # qkv with 2 of 4 kv heads, output, SwiGLU's three matrices, two RMSNorm weights
        per_block = d * (4 + 2 * 2) * head_dim + d * d + 3 * d * hidden + 2 * d
        embeddings, head, final = V * d, V * d, d
    else:  # with biases, LayerNorm weight and bias, tied head
        per_block = (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d) + 4 * d
        embeddings, head, final = V * d + T * d, 0, 2 * d
    assert model.num_params() == embeddings + L * per_block + final + head
    assert model.num_params(exclude_embeddings=True) == L * per_block + final + (V * d if arch == 'llama' else V * d)
    n = model.num_params(exclude_embeddings=True)
    assert model.flops_per_token(T) == 6 * n + 12 * L * d * T


def test_generate_greedy_appends_the_argmax_tokens():
    model = randomize(GPT(tiny_config('llama')))
    idx = tokens(model.config, batch=1, seq=4)
    out = model.generate(idx, 3, temperature=0)
    assert out.shape == (1, 7) and torch.equal(out[:, :4], idx)
    for step in range(3):
        expected = model(out[:, :4 + step])[0][:, -1].argmax(-1)
        assert out[0, 4 + step] == expected
    top1 = model.generate(idx, 3, temperature=1.0, top_k=1)
    assert torch.equal(top1, out)


@pytest.mark.parametrize('arch', ARCHS)
def test_generate_conditions_on_the_last_block_size_tokens(arch):
    model = randomize(GPT(tiny_config(arch, block_size=8)))
    idx = tokens(model.config, batch=1, seq=12)
    out = model.generate(idx, 3, temperature=0)
    assert out.shape == (1, 15) and torch.equal(out[:, :12], idx)
    next_from = lambda window: model(window)[0][0, -1].argmax().item()
    for step in range(3):
        context = out[:, :12 + step]
        assert out[0, 12 + step] == next_from(context[:, -8:]), f"token {step + 1}"
    # the first 8 tokens would predict differently, so the window the model saw is the last one
    assert next_from(idx[:, :8]) != next_from(idx[:, -8:])


def test_optimizer_decays_matrices_only():
    model = GPT(tiny_config('gpt'))
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = optimizer.param_groups
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert all(p.dim() >= 2 for p in decay['params']) and all(p.dim() < 2 for p in no_decay['params'])
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))


@pytest.mark.parametrize('overrides, words', [
    (dict(arch='bert'), ['gpt', 'llama']),
    (dict(norm_scheme='LNS'), ['pre', 'lns']),
    (dict(norm_scheme='preln'), ['pre', 'lns']),
    (dict(n_embd=30), ['n_embd', 'n_head']),
    (dict(n_kv_head=3), ['n_head', 'n_kv_head']),
    (dict(n_layer=0), ['n_layer']),
    (dict(dropout=1.0), ['dropout']),
])
def test_invalid_config_raises_value_error_naming_valid_choices(overrides, words):
    values = dict(arch='llama', n_layer=2, n_head=4, n_embd=32)
    values.update(overrides)
    with pytest.raises(ValueError) as error:
        GPTConfig(**values)
    assert all(word in str(error.value) for word in words)


def test_a_saved_config_with_an_unknown_lns_position_is_refused_naming_the_known_ones():
    saved = GPTConfig(norm_scheme='lns', lns_position='attn_norm', n_layer=2, n_head=2, n_embd=16).to_dict()
    assert GPTConfig.from_dict(saved).lns_position == 'attn_norm'
    with pytest.raises(ValueError, match="lns_position must be one of both_norms, attn_norm, mlp_norm, sublayer"):
        GPTConfig.from_dict({**saved, 'lns_position': 'norm'})
