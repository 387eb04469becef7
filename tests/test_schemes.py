"""Every norm_scheme, lns_position and residual/init alternative of model.py against its formula."""

import itertools
import math

import pytest
import torch

from model import (GPT, GPTConfig, INIT_SCHEMES, LNS_MODES, LNS_POSITIONS, NORM_SCHEMES, block_layout,
                   deepnorm_constants)
from reference import build, randomize, reference_logits, reference_residuals, tiny_config, tokens

ARCHS = ['gpt', 'llama']


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('norm_scheme', NORM_SCHEMES)
def test_every_scheme_matches_its_formula(arch, norm_scheme):
    model = build(tiny_config(arch, norm_scheme))
    idx = tokens(model.config)
    _, _, residuals = model(idx, return_residuals=True)
    for depth, (ours, reference) in enumerate(zip(residuals, reference_residuals(model, idx))):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5, msg=f"{norm_scheme}, after block {depth}")
    torch.testing.assert_close(model(idx)[0], reference_logits(model, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('lns_position', LNS_POSITIONS)
def test_every_lns_position_matches_its_formula(arch, lns_position):
    model = build(tiny_config(arch, 'lns', lns_position=lns_position))
    idx = tokens(model.config)
    torch.testing.assert_close(model(idx)[0], reference_logits(model, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('norm_scheme', ['pre', 'lns', 'post', 'peri'])
@pytest.mark.parametrize('gain', [dict(layerscale=True), dict(skipinit=True)])
def test_residual_gains_multiply_each_sublayer_output(norm_scheme, gain):
    model = build(tiny_config('llama', norm_scheme, **gain))
    idx = tokens(model.config)
    torch.testing.assert_close(model(idx)[0], reference_logits(model, idx), rtol=1e-5, atol=1e-5)


def _outputs_on_shared_weights(configs):
    """Logits of each config's model, every model holding the same values for the parameters they share."""
    models = [GPT(config) for config in configs]
    superset = {}
    for model in models:
        superset.update(randomize(model).state_dict())
    idx = tokens(configs[0])
    outputs = []
    for model in models:
        model.load_state_dict({k: v for k, v in superset.items() if k in model.state_dict()})
        outputs.append(model(idx)[0])
    return outputs


@pytest.mark.parametrize('arch', ARCHS)
def test_every_pair_of_schemes_gives_different_outputs_on_the_same_weights(arch):
    outputs = _outputs_on_shared_weights([tiny_config(arch, scheme) for scheme in NORM_SCHEMES])
    for (a, out_a), (b, out_b) in itertools.combinations(zip(NORM_SCHEMES, outputs), 2):
        assert (out_a - out_b).abs().max() > 1e-3, f"{a} and {b} give the same output"


def test_every_pair_of_lns_positions_gives_different_outputs():
    configs = [tiny_config('llama', 'lns', lns_position=p) for p in LNS_POSITIONS]
    outputs = _outputs_on_shared_weights(configs) + _outputs_on_shared_weights([tiny_config('llama', 'pre')])
    for (a, out_a), (b, out_b) in itertools.combinations(zip(LNS_POSITIONS + ('pre',), outputs), 2):
        assert (out_a - out_b).abs().max() > 1e-3, f"{a} and {b} give the same output"


@pytest.mark.parametrize('n_layer, a, b', [(12, 2.21336, 0.31947), (24, 2.63215, 0.26864)])
def test_deepnorm_constants(n_layer, a, b):
    # a = (2L)^(1/4): 24^(1/4), 48^(1/4); b = (8L)^(-1/4): 96^(-1/4), 192^(-1/4)
    assert deepnorm_constants(n_layer) == pytest.approx((a, b), abs=1e-5)
    with torch.device('meta'):
        model = GPT(GPTConfig(arch='llama', norm_scheme='deepnorm', n_layer=n_layer, n_head=2, n_embd=16))
    assert all(block.deepnorm_alpha == pytest.approx(a, abs=1e-5) for block in model.blocks)


# Mix-LN's Post-LN blocks are floor(mix_ratio * L): at 2, 6 and 10 blocks the product ends in a half, where
# round() (halves to even), floor and ceil disagree; 100 * 0.29 is 28.999999999999996 in floating point
@pytest.mark.parametrize('n_layer, mix_ratio, post_blocks', [(12, 0.25, 3), (24, 0.25, 6), (4, 0.25, 1),
                                                             (2, 0.25, 0), (6, 0.25, 1), (10, 0.25, 2),
                                                             (12, 0.5, 6), (7, 0.5, 3), (100, 0.29, 29)])
def test_mix_ln_uses_post_ln_for_the_first_mix_ratio_of_blocks_rounded_down(n_layer, mix_ratio, post_blocks):
    config = GPTConfig(arch='llama', norm_scheme='mix', mix_ratio=mix_ratio, n_layer=n_layer, n_head=2, n_embd=16)
    layouts = [block_layout(config, index) for index in range(1, n_layer + 1)]
    assert layouts == ['norm_after'] * post_blocks + ['norm_before'] * (n_layer - post_blocks)


@pytest.mark.parametrize('n_layer', [2, 6, 10])
def test_mix_ln_forward_matches_its_formula_where_rounding_rules_differ(n_layer):
    model = build(tiny_config('llama', 'mix', n_layer=n_layer))
    idx = tokens(model.config)
    torch.testing.assert_close(model(idx)[0], reference_logits(model, idx), rtol=1e-5, atol=1e-5)


def test_peri_has_four_norms_per_block_and_others_two():
    for scheme in NORM_SCHEMES:
        model = GPT(tiny_config('llama', scheme))
        norms = [name for name in model.blocks[0].state_dict() if name.endswith('norm.weight')]
        assert len(norms) == (4 if scheme == 'peri' else 2), scheme


def test_residual_variance_grows_much_faster_with_depth_under_pre_than_lns():
    # the paper's core observation, at initialization: 48 blocks, random tokens
    variances = {}
    for scheme in ('pre', 'lns'):
        torch.manual_seed(0)
        model = GPT(GPTConfig(arch='llama', norm_scheme=scheme, n_layer=48, n_head=4, n_embd=64, block_size=64,
                              vocab_size=256))
        idx = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            _, _, residuals = model(idx, return_residuals=True)
        variances[scheme] = [r.var().item() for r in residuals]
    growth = {scheme: v[-1] / v[0] for scheme, v in variances.items()}
    assert variances['pre'][0] == pytest.approx(variances['lns'][0])  # same embeddings
    assert growth['pre'] > 3 * growth['lns'], growth
    # and under pre the later half of the blocks still adds variance at a pace that lns has long left behind
    assert variances['pre'][48] - variances['pre'][24] > 5 * (variances['lns'][48] - variances['lns'][24])


def _std(tensor):
    return tensor.float().std().item()


def test_init_schemes_set_the_std_they_claim():
    L, d = 4, 256
    for init_scheme in INIT_SCHEMES:
        model = GPT(GPTConfig(arch='llama', n_layer=L, n_head=4, n_embd=d, vocab_size=512, init_scheme=init_scheme))
        for depth, block in enumerate(model.blocks, start=1):
            expected = {'normal': 0.02, 'scaled': 0.02 / math.sqrt(2 * L), 'depth': 0.02 / math.sqrt(2 * depth)}
            for weight in (block.attn.proj.weight, block.mlp.proj.weight):
                assert _std(weight) == pytest.approx(expected[init_scheme], rel=0.03), (init_scheme, depth)
            for weight in (block.attn.qkv.weight, block.mlp.fc.weight):
                assert _std(weight) == pytest.approx(0.02, rel=0.03), (init_scheme, depth)
        assert _std(model.tok_emb.weight) == pytest.approx(0.02, rel=0.03)
        assert _std(model.lm_head.weight) == pytest.approx(0.02, rel=0.03)


@pytest.mark.parametrize('arch', ARCHS)
def test_deepnorm_init_is_xavier_normal_with_gain_b_on_value_output_and_mlp(arch):
    L, d = 6, 256
    model = GPT(GPTConfig(arch=arch, norm_scheme='deepnorm', n_layer=L, n_head=4, n_embd=d, vocab_size=512))
    b = (8 * L) ** -0.25
    hidden = model.config.ffn_hidden

    def xavier(gain, fan_in, fan_out):
        return gain * math.sqrt(2 / (fan_in + fan_out))

    for block in model.blocks:
        q, k, v = block.attn.qkv.weight.split(d)
        assert _std(q) == pytest.approx(xavier(1, d, d), rel=0.03)
        assert _std(k) == pytest.approx(xavier(1, d, d), rel=0.03)
        assert _std(v) == pytest.approx(xavier(b, d, d), rel=0.03)
        assert _std(block.attn.proj.weight) == pytest.approx(xavier(b, d, d), rel=0.03)
        for weight in block.mlp.fc.weight.split(hidden):  # gpt: fc; llama: gate and up
            assert _std(weight) == pytest.approx(xavier(b, d, hidden), rel=0.03)
        assert _std(block.mlp.proj.weight) == pytest.approx(xavier(b, hidden, d), rel=0.03)
    assert _std(model.tok_emb.weight) == pytest.approx(0.02, rel=0.03)


def test_deepnorm_init_with_grouped_query_attention_gives_key_and_value_their_own_fan_out():
    L, d, n_head, n_kv_head = 6, 256, 8, 2
    model = GPT(GPTConfig(arch='llama', norm_scheme='deepnorm', n_layer=L, n_head=n_head, n_kv_head=n_kv_head,
                          n_embd=d, vocab_size=512))
    b, kv = (8 * L) ** -0.25, n_kv_head * d // n_head  # key and value: 2 heads of 32, 64 rows each
    for block in model.blocks:
        q, k, v = block.attn.qkv.weight.split([d, kv, kv])
        assert _std(q) == pytest.approx(math.sqrt(2 / (d + d)), rel=0.03)
        assert _std(k) == pytest.approx(math.sqrt(2 / (d + kv)), rel=0.03)
        assert _std(v) == pytest.approx(b * math.sqrt(2 / (d + kv)), rel=0.03)
        assert _std(block.attn.proj.weight) == pytest.approx(b * math.sqrt(2 / (d + d)), rel=0.03)


def test_layerscale_and_skipinit_are_learnable_gains_with_their_initial_values():
    layerscale = GPT(tiny_config('llama', layerscale=True, layerscale_init=1e-3))
    skipinit = GPT(tiny_config('llama', skipinit=True))
    for block in layerscale.blocks:
        for gain in (block.attn_gain, block.mlp_gain):
            assert gain.shape == (32,) and gain.requires_grad and torch.all(gain == 1e-3)
    for block in skipinit.blocks:
        for gain in (block.attn_gain, block.mlp_gain):
            assert gain.shape == () and gain.requires_grad and gain.item() == pytest.approx(1 / math.sqrt(4))
    names = [name for name, _ in skipinit.named_parameters()]
    assert 'blocks.0.attn_gain' in names and 'blocks.3.mlp_gain' in names
    # CaiT's rule for the initial LayerScale value by depth
    assert [GPTConfig(n_layer=L, layerscale=True).layerscale_init for L in (12, 18, 24, 36)] == [0.1, 0.1, 1e-5, 1e-6]


@pytest.mark.parametrize('overrides, words', [
    (dict(norm_scheme='Mix-LN'), list(NORM_SCHEMES)),
    (dict(init_scheme='xavier'), list(INIT_SCHEMES)),
    (dict(lns_position='before'), list(LNS_POSITIONS)),
    (dict(norm_scheme='pre', lns_position='sublayer'), ['lns_position', 'lns']),
    (dict(norm_scheme='deepnorm', init_scheme='scaled'), ['deepnorm', 'init_scheme']),
    (dict(layerscale=True, skipinit=True), ['layerscale', 'skipinit']),
    (dict(norm_scheme='mix', mix_ratio=1.5), ['mix_ratio']),
    (dict(norm_scheme='lns', lns_mode='learned'), list(LNS_MODES)),
    (dict(norm_scheme='pre', lns_mode='gain_init'), ['gain_init', "norm_scheme='lns'"]),
    (dict(norm_scheme='lns', lns_position='sublayer', lns_mode='gain_init'), ['gain_init', 'sublayer']),
])
def test_invalid_scheme_settings_raise_value_error_listing_valid_ones(overrides, words):
    with pytest.raises(ValueError) as error:
        GPTConfig(**{'arch': 'llama', **overrides})
    assert all(word in str(error.value) for word in words), str(error.value)


@pytest.mark.parametrize('arch', ['gpt', 'llama'])
@pytest.mark.parametrize('lns_position', ['both_norms', 'attn_norm', 'mlp_norm'])
def test_lns_gain_init_starts_as_fixed_lns_then_is_pre_ln_with_its_own_trained_gains(arch, lns_position):
    """lns_mode='gain_init' (GPAS, ProRes): the norm weights of block l start at 1/sqrt(l) and nothing multiplies
    the norm outputs, so at init it is the paper's LNS, and afterwards a Pre-LN model whose norm weights are the
    gains, with any block dropped (each remaining block keeps its own gains)."""
    torch.manual_seed(0)
    fixed = GPT(tiny_config(arch, 'lns', lns_position=lns_position))
    torch.manual_seed(0)
    gain = GPT(tiny_config(arch, 'lns', lns_position=lns_position, lns_mode='gain_init'))
    idx = tokens(fixed.config)
    torch.testing.assert_close(gain(idx)[0], fixed(idx)[0], rtol=0, atol=1e-6)
    for l, block in enumerate(gain.blocks, start=1):
        attn, mlp = (1 / math.sqrt(l) if lns_position in ('both_norms', kind) else 1.0 for kind in ('attn_norm',
                                                                                                      'mlp_norm'))
        assert torch.equal(block.attn_norm.weight, torch.full_like(block.attn_norm.weight, attn))
        assert torch.equal(block.mlp_norm.weight, torch.full_like(block.mlp_norm.weight, mlp))
        assert block.effective_norm_gain() == pytest.approx(fixed.blocks[l - 1].effective_norm_gain())
    randomize(gain)
    pre = GPT(tiny_config(arch, 'pre'))
    pre.load_state_dict(gain.state_dict())
    for skip in ((), {2}, {1, 4}):
        torch.testing.assert_close(gain(idx, skip_layers=skip)[0], pre(idx, skip_layers=skip)[0], rtol=0, atol=0)
    fixed.load_state_dict(gain.state_dict())
    assert not torch.allclose(fixed(idx)[0], gain(idx)[0], atol=1e-3)  # the factor is applied once, not twice


def test_lns_gain_init_gains_are_trained_without_weight_decay_and_move_as_fast_as_a_gain_of_1():
    """Adam's first step moves each parameter by the learning rate whatever its size: a gain that starts at
    1/sqrt(l) moves by lr, where under the fixed factor a gain of 1 moves the effective gain (weight x factor, what
    the diagnostics log) by lr/sqrt(l). The two modes are the same function at init and train differently."""
    moved = {}
    for mode in LNS_MODES:
        torch.manual_seed(0)
        model = GPT(tiny_config('llama', 'lns', lns_mode=mode))
        optimizer = model.configure_optimizer(weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.95),
                                              device_type='cpu')
        decayed = {id(p) for group in optimizer.param_groups if group['weight_decay'] > 0 for p in group['params']}
        gains = [p for block in model.blocks for p in (block.attn_norm.weight, block.mlp_norm.weight)]
        assert all(p.requires_grad and id(p) not in decayed for p in gains)
        before = [block.attn_norm.weight.detach() * block.attn_lns_scale for block in model.blocks]
        _, loss = model(tokens(model.config), tokens(model.config, seed=2))
        loss.backward()
        optimizer.step()
        after = [block.attn_norm.weight.detach() * block.attn_lns_scale for block in model.blocks]
        moved[mode] = [(end - start).abs().mean().item() for start, end in zip(before, after)]
    for l in range(1, 5):
        assert moved['gain_init'][l - 1] == pytest.approx(1e-2, rel=1e-3)
        assert moved['fixed'][l - 1] == pytest.approx(1e-2 / math.sqrt(l), rel=1e-3)
