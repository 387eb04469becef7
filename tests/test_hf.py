"""from_hf against transformers itself: a tiny random model of each family, saved by save_pretrained and loaded
by model.from_hf, gives the same logits."""

import json

import pytest
import torch

from model import from_hf

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
    (dict(LLAMA_JSON, attention_bias=True), ['attention_bias']),
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
