"""hf.py against transformers itself: a tiny random model of each family, saved by save_pretrained and loaded by
from_hf, gives the same logits; and our models, written by to_hf, load in transformers' stock classes with ours."""

import json
import math
import os

import pytest
import torch

import hf
from hf import from_hf, to_hf
from model import GPT, GPTConfig

transformers = pytest.importorskip('transformers')

TINY = dict(vocab_size=120, bos_token_id=0, eos_token_id=0, attn_implementation='eager')
TINY_LLAMA = dict(TINY, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


@torch.no_grad()
def saved_random_model(model_class, config, folder, **save_options):
    """A transformers model with every parameter random (norm weights near 1, not exactly 1; biases nonzero), so
    that a weight loaded into the wrong place changes the logits; saved as safetensors in folder."""
    torch.manual_seed(0)
    model = model_class(config).eval()
    for name, p in model.named_parameters():
        noise = torch.randn_like(p)
        p.copy_(1 + 0.3 * noise if p.dim() == 1 and name.endswith('weight') else 0.1 * noise)
    model.save_pretrained(folder, **save_options)
    return model


def max_logit_difference(hf_model, ours, seq_len=16):
    idx = torch.randint(0, ours.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours.eval()(idx)[0] - hf_model(idx).logits).abs().max().item()


def test_gpt2_logits_equal_transformers_with_conv1d_weights_transposed(tmp_path):
    config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=64, **TINY)
    hf_model = saved_random_model(transformers.GPT2LMHeadModel, config, tmp_path)
    ours = from_hf(tmp_path)
    assert (ours.config.arch, ours.config.norm_scheme, ours.config.n_layer) == ('gpt', 'pre', 3)
    assert ours.lm_head.weight is ours.tok_emb.weight
    assert max_logit_difference(hf_model, ours) <= 1e-4


@pytest.mark.parametrize('tied, rope_theta, shard', [(False, 10000.0, False), (True, 500000.0, True)])
def test_llama_logits_equal_transformers_with_qkv_and_gate_up_fused(tmp_path, tied, rope_theta, shard):
    config = transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=tied, rope_theta=rope_theta)
    hf_model = saved_random_model(transformers.LlamaForCausalLM, config, tmp_path,
                                  **({'max_shard_size': '20KB'} if shard else {}))
    assert (tmp_path / 'model.safetensors.index.json').exists() == shard
    ours = from_hf(tmp_path)
    assert (ours.config.n_kv_head, ours.config.rope_theta, ours.config.tie_embeddings) == (2, rope_theta, tied)
    assert (ours.lm_head.weight is ours.tok_emb.weight) == tied
    assert max_logit_difference(hf_model, ours) <= 1e-4


def test_mistral_logits_equal_transformers_up_to_its_sliding_window(tmp_path):
    # attention over the last sliding_window tokens equals full causal attention for inputs up to that length
    config = transformers.MistralConfig(**TINY_LLAMA, sliding_window=12)
    hf_model = saved_random_model(transformers.MistralForCausalLM, config, tmp_path)
    ours = from_hf(tmp_path)
    assert ours.config.block_size == 12
    assert max_logit_difference(hf_model, ours, seq_len=12) <= 1e-4


def test_qwen2_logits_equal_transformers_with_biases_on_qkv_only(tmp_path):
    config = transformers.Qwen2Config(**TINY_LLAMA, tie_word_embeddings=True)
    hf_model = saved_random_model(transformers.Qwen2ForCausalLM, config, tmp_path)
    ours = from_hf(tmp_path)
    assert ours.config.qkv_bias and not ours.config.bias
    assert ours.blocks[0].attn.qkv.bias is not None and ours.blocks[0].attn.proj.bias is None
    assert max_logit_difference(hf_model, ours) <= 1e-4


def test_llama_with_attention_and_mlp_biases_equals_transformers(tmp_path):
    config = transformers.LlamaConfig(**TINY_LLAMA, attention_bias=True, mlp_bias=True)
    hf_model = saved_random_model(transformers.LlamaForCausalLM, config, tmp_path)
    ours = from_hf(tmp_path)
    assert ours.config.bias and ours.config.qkv_bias
    assert max_logit_difference(hf_model, ours) <= 1e-4


def write_config(folder, **values):
    (folder / 'config.json').write_text(json.dumps(values))
    return folder


LLAMA_JSON = dict(model_type='llama', hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, vocab_size=100)


@pytest.mark.parametrize('values, words', [
    (dict(model_type='bert'), ["'bert'", 'gpt2', 'llama', 'mistral', 'qwen2']),
    (dict(LLAMA_JSON, rope_scaling={'rope_type': 'linear', 'factor': 2.0}), ["'linear'", 'rope', "'default'"]),
    (dict(LLAMA_JSON, rope_parameters={'rope_type': 'llama3', 'rope_theta': 5e5}), ["'llama3'", 'rope']),
    (dict(LLAMA_JSON, head_dim=16), ['head_dim=16', 'head_dim=8']),
    (dict(LLAMA_JSON, attention_bias=True), ['attention_bias=True', 'mlp_bias=False', 'both or on neither']),
    (dict(LLAMA_JSON, hidden_act='gelu'), ['hidden_act', "'silu'"]),
    (dict(model_type='gpt2', scale_attn_by_inverse_layer_idx=True), ['scale_attn_by_inverse_layer_idx']),
])
def test_configs_we_do_not_reproduce_raise_value_error_naming_the_setting(tmp_path, values, words):
    with pytest.raises(ValueError) as error:
        from_hf(write_config(tmp_path, **values))
    assert all(word in str(error.value) for word in words), str(error.value)


def test_folder_without_config_or_safetensors_raises_value_error_saying_what_is_expected(tmp_path):
    with pytest.raises(ValueError, match='no config.json'):
        from_hf(tmp_path)
    (tmp_path / 'pytorch_model.bin').write_bytes(b'')
    with pytest.raises(ValueError, match='convert a pytorch_model.bin checkpoint to safetensors'):
        from_hf(write_config(tmp_path, **LLAMA_JSON))


def test_missing_or_unexpected_weight_raises_value_error_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file
    config = transformers.LlamaConfig(**TINY_LLAMA)
    saved_random_model(transformers.LlamaForCausalLM, config, tmp_path)
    tensors = load_file(tmp_path / 'model.safetensors')
    save_file({**tensors, 'model.layers.3.mlp.up_proj.weight': torch.zeros(48, 32)}, tmp_path / 'model.safetensors')
    with pytest.raises(ValueError, match="unexpected weight 'layers.3.mlp.up_proj.weight'"):
        from_hf(tmp_path)
    del tensors['model.layers.1.self_attn.v_proj.weight']
    save_file(tensors, tmp_path / 'model.safetensors')
    with pytest.raises(ValueError, match="no weight 'layers.1.self_attn.v_proj.weight'"):
        from_hf(tmp_path)


# ----------------------------------------------------------------------------- to_hf

@torch.no_grad()
def random_model(**settings):
    """Our tiny model with every parameter random: norm weights and biases away from 1 and 0 and residual gains
    away from their init, so that a factor folded into the wrong place, or forgotten, changes the logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**dict(norm_scheme='pre', n_layer=3, n_head=4, n_embd=32, block_size=64, vocab_size=120),
                             **settings}))
    for name, p in model.named_parameters():
        if name.endswith('_gain'):
            p.copy_(0.5 + torch.rand_like(p))
        elif 'norm' in name and name.endswith('weight'):
            p.copy_(1 + 0.3 * torch.randn_like(p))
        else:
            p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def load_stock(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation='eager')
    return model.eval()


EXPORTS = {  # name: (our settings, the stock class transformers must load)
    'gpt pre': (dict(arch='gpt'), 'GPT2LMHeadModel'),
    'gpt lns': (dict(arch='gpt', norm_scheme='lns'), 'GPT2LMHeadModel'),
    'gpt lns, untied head, grouped-query': (dict(arch='gpt', norm_scheme='lns', tie_embeddings=False, n_kv_head=2),
                                            'GPT2LMHeadModel'),
    'gpt lns on sublayers, layerscale, no biases': (dict(arch='gpt', norm_scheme='lns', lns_position='sublayer',
                                                         layerscale=True, bias=False), 'GPT2LMHeadModel'),
    'gpt lns on attention, skipinit': (dict(arch='gpt', norm_scheme='lns', lns_position='attn_norm', skipinit=True),
                                       'GPT2LMHeadModel'),
    'llama pre': (dict(arch='llama'), 'LlamaForCausalLM'),
    'llama lns, tied head, grouped-query': (dict(arch='llama', norm_scheme='lns', tie_embeddings=True, n_kv_head=2),
                                            'LlamaForCausalLM'),
    'llama lns on attention': (dict(arch='llama', norm_scheme='lns', lns_position='attn_norm'), 'LlamaForCausalLM'),
    'llama lns on the mlp, biases': (dict(arch='llama', norm_scheme='lns', lns_position='mlp_norm', bias=True),
                                     'LlamaForCausalLM'),
    'llama lns on sublayers, skipinit': (dict(arch='llama', norm_scheme='lns', lns_position='sublayer',
                                              skipinit=True), 'LlamaForCausalLM'),
    'llama pre, depth init, layerscale': (dict(arch='llama', init_scheme='depth', layerscale=True),
                                          'LlamaForCausalLM'),
    'llama lns, scaled init': (dict(arch='llama', norm_scheme='lns', init_scheme='scaled'), 'LlamaForCausalLM'),
    'llama lns with trained gains (gain_init)': (dict(arch='llama', norm_scheme='lns', lns_mode='gain_init'),
                                                 'LlamaForCausalLM'),
    'gpt lns with trained gains on attention (gain_init)': (dict(arch='gpt', norm_scheme='lns', lns_mode='gain_init',
                                                                 lns_position='attn_norm'), 'GPT2LMHeadModel'),
    'llama lns, biases on q, k, v only': (dict(arch='llama', norm_scheme='lns', qkv_bias=True), 'Qwen2ForCausalLM'),
}


@pytest.mark.parametrize('name', EXPORTS)
def test_exported_logits_equal_transformers_stock_class(tmp_path, name):
    settings, stock_class = EXPORTS[name]
    ours = random_model(**settings)
    to_hf(ours, tmp_path / 'hf')
    stock = load_stock(tmp_path / 'hf')
    assert type(stock).__name__ == stock_class
    assert max_logit_difference(stock, ours) <= 1e-4


@pytest.mark.parametrize('position', ['both_norms', 'attn_norm', 'mlp_norm', 'sublayer'])
def test_lns_factor_1_over_sqrt_l_sits_in_the_norm_weights_or_output_projections(tmp_path, position):
    ours = random_model(arch='llama', norm_scheme='lns', lns_position=position)
    to_hf(ours, tmp_path / 'hf')
    from safetensors.torch import load_file
    tensors = load_file(tmp_path / 'hf' / 'model.safetensors')
    for l, block in enumerate(ours.blocks, start=1):
        layer, s = f'model.layers.{l - 1}.', 1 / math.sqrt(l)
        attn_norm = s if position in ('both_norms', 'attn_norm') else 1
        mlp_norm = s if position in ('both_norms', 'mlp_norm') else 1
        sublayer = s if position == 'sublayer' else 1
        expected = {'input_layernorm.weight': block.attn_norm.weight * attn_norm,
                    'post_attention_layernorm.weight': block.mlp_norm.weight * mlp_norm,
                    'self_attn.o_proj.weight': block.attn.proj.weight * sublayer,
                    'mlp.down_proj.weight': block.mlp.proj.weight * sublayer}
        for name, tensor in expected.items():
            torch.testing.assert_close(tensors[layer + name], tensor.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize('settings', [dict(arch='gpt'), dict(arch='gpt', tie_embeddings=False),
                                      dict(arch='llama', n_kv_head=2), dict(arch='llama', tie_embeddings=True),
                                      dict(arch='llama', bias=True)], ids=str)
def test_from_hf_of_an_exported_pre_ln_model_is_the_same_model(tmp_path, settings):
    ours = random_model(**settings)
    to_hf(ours, tmp_path / 'hf')
    back = from_hf(tmp_path / 'hf')
    assert back.config == ours.config
    assert back.state_dict().keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_from_hf_of_an_exported_lns_model_is_a_pre_ln_model_with_the_same_logits(tmp_path):
    ours = random_model(arch='llama', norm_scheme='lns', n_kv_head=2)
    to_hf(ours, tmp_path / 'hf')
    back = from_hf(tmp_path / 'hf').eval()
    assert back.config.norm_scheme == 'pre'
    idx = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], ours(idx)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize('scheme', ['post', 'deepnorm', 'mix', 'peri'])
def test_schemes_the_stock_classes_cannot_express_are_refused_naming_them(tmp_path, scheme):
    with pytest.raises(ValueError, match=f"norm_scheme '{scheme}' cannot be exported") as error:
        to_hf(random_model(arch='llama', norm_scheme=scheme), tmp_path / 'hf')
    assert str(error.value).count('.') <= 1 and not os.path.exists(tmp_path / 'hf')
    assert os.listdir(tmp_path) == []  # no staging folder left behind


CHARS = '\n !,.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'


def save_checkpoint(folder, **settings):
    """A checkpoint of train.py's format (weights, model_config, data_meta) for a char model."""
    model = random_model(vocab_size=len(CHARS), **settings)
    os.makedirs(folder, exist_ok=True)
    torch.save({'model': model.state_dict(), 'model_config': model.config.to_dict(), 'iter_num': 10,
                'data_meta': {'tokenizer': 'char', 'vocab_size': len(CHARS), 'chars': CHARS}},
               os.path.join(folder, 'ckpt.pt'))
    return model


def test_command_exports_a_run_with_its_character_tokenizer(tmp_path, capsys):
    ours = save_checkpoint(tmp_path / 'lns', arch='llama', norm_scheme='lns')
    assert hf.main([str(tmp_path / 'lns'), str(tmp_path / 'hf' / 'lns')]) == 0
    assert 'LlamaForCausalLM' in capsys.readouterr().out
    stock = load_stock(tmp_path / 'hf' / 'lns')
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf' / 'lns')
    text = 'ROMEO:\nWhat, ho!  my lord.'
    ids = tokenizer.encode(text)
    assert ids == [CHARS.index(c) for c in text] and tokenizer.decode(ids) == text
    with pytest.raises(Exception, match='never saw in training'):  # not dropped: the digits are not in CHARS
        tokenizer.encode('ROMEO: 1234')
    idx = torch.tensor([ids])
    with torch.no_grad():
        assert (stock(idx).logits - ours(idx)[0]).abs().max().item() <= 1e-4


def test_gpt2_bpe_runs_get_gpt2_tokenizer_files_from_tiktokens_cache(tmp_path, monkeypatch):
    tiktoken = pytest.importorskip('tiktoken')
    if hf.gpt2_bpe_files() is None:
        pytest.skip("GPT-2's BPE files are not in tiktoken's cache")
    model = random_model(arch='gpt', vocab_size=50304, n_layer=1)
    assert 'gpt2' in to_hf(model, tmp_path / 'hf', {'tokenizer': 'gpt2', 'vocab_size': 50257})
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf')
    text = "The curse of depth: deeper layers   barely change\n\nthe residual stream's direction (1e-3)."
    assert tokenizer.encode(text) == tiktoken.get_encoding('gpt2').encode_ordinary(text)
    assert tokenizer.eos_token_id == load_stock(tmp_path / 'hf').config.eos_token_id == 50256


def test_a_failed_export_leaves_the_existing_folder_as_it_was(tmp_path, capsys):
    save_checkpoint(tmp_path / 'pre', arch='gpt')
    save_checkpoint(tmp_path / 'post', arch='gpt', norm_scheme='post')
    target = tmp_path / 'hf'
    assert hf.main([str(tmp_path / 'pre'), str(target)]) == 0
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}
    capsys.readouterr()
    assert hf.main([str(tmp_path / 'post'), str(target)]) == 1  # an export over it is refused without a word
    err = capsys.readouterr().err
    assert 'already holds an export' in err and '--overwrite' in err and err.count('\n') == 1, err
    assert hf.main([str(tmp_path / 'post'), str(target), '--overwrite']) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: norm_scheme 'post' cannot be exported") and err.count('\n') == 1, err
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ['hf', 'post', 'pre']
    assert hf.main([str(tmp_path / 'pre'), str(target), '--overwrite']) == 0  # a previous export is replaced
    assert sorted(os.listdir(target)) == sorted(before)


@pytest.mark.parametrize('make, words', [
    (lambda tmp: [str(tmp / 'missing'), str(tmp / 'hf')], ['no checkpoint at']),
    (lambda tmp: [str(tmp / 'pre'), str(tmp)], ['already holds files that an export does not write']),
    (lambda tmp: [str(tmp / 'pre'), str(tmp / 'pre' / 'ckpt.pt')], ['is a file']),
])
def test_bad_command_lines_end_in_one_sentence_and_write_nothing(tmp_path, capsys, make, words):
    save_checkpoint(tmp_path / 'pre', arch='gpt')
    before = sorted(os.listdir(tmp_path))
    assert hf.main(make(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and all(w in err for w in words), err
    assert sorted(os.listdir(tmp_path)) == before


def test_lns_gain_init_exports_its_gains_as_the_norm_weights_unscaled(tmp_path):
    """Its 1/sqrt(l) already lives in the (trained) norm weights: the export must not fold it in a second time."""
    ours = random_model(arch='llama', norm_scheme='lns', lns_mode='gain_init')
    to_hf(ours, tmp_path / 'hf')
    from safetensors.torch import load_file
    tensors = load_file(tmp_path / 'hf' / 'model.safetensors')
    for l, block in enumerate(ours.blocks):
        assert torch.equal(tensors[f'model.layers.{l}.input_layernorm.weight'], block.attn_norm.weight.detach())
        assert torch.equal(tensors[f'model.layers.{l}.post_attention_layernorm.weight'], block.mlp_norm.weight.detach())
