"""eval_layers.py: layer drop, angular distance and depth statistics against independent computations; which data
it reads, and the names and tokenizers hf.py's loader picks. The downstream tasks are in test_tasks.py."""

import copy
import json
import math
import os
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import eval_layers
import train
from hf import LoadedModel, gpt2_encode
from model import GPT, GPTConfig, read_checkpoint

TINY = ['--n_layer=4', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8', '--eval_sequences=16',
        '--device=cpu', '--warmup_iters=5', '--learning_rate=1e-2', '--max_iters=40', '--eval_interval=40']


@pytest.fixture(scope='module')
def trained(tmp_path_factory, char_data):
    """Char data from the offline corpus, and a tiny pre and lns model trained on it for a few dozen steps."""
    root = tmp_path_factory.mktemp('eval')
    os.symlink(char_data, root / 'shakespeare_char')
    for scheme in ('pre', 'lns'):
        assert train.main(TINY + [f'--data_dir={char_data}', f'--out_dir={root / scheme}',
                                  f'--norm_scheme={scheme}']) == 0
    return root


def test_angular_distance_is_0_for_the_same_direction_half_for_orthogonal_and_1_for_opposite():
    a = torch.randn(5, 16)
    assert torch.allclose(eval_layers.angular_distance(a, 3 * a), torch.zeros(5, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(eval_layers.angular_distance(a, -a), torch.ones(5, dtype=torch.float64))
    e1, e2 = torch.eye(16)[:1], torch.eye(16)[1:2]
    assert eval_layers.angular_distance(e1, e2).item() == pytest.approx(0.5)


def test_dropping_each_block_equals_a_model_built_without_it(trained):
    checkpoint = read_checkpoint(trained / 'lns' / 'ckpt.pt')
    model = GPT.from_checkpoint(checkpoint)
    tokens = eval_layers.tokens_from_data_folder(str(trained / 'shakespeare_char'),
                                                  LoadedModel('lns', model, 'char'), 2048)
    x, y = eval_layers.windows(tokens, 32)
    result = eval_layers.analyze(model, x, y, 16, torch.device('cpu'), nullcontext(), 3, 2, progress=False)
    assert result['tokens'] == x.numel() == 2048  # the budget: 64 windows of 32, plus one token of target

    def loss_of(module):
        with torch.no_grad():
            logits, _ = module(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()

    model.eval()
    assert result['base_loss'] == pytest.approx(loss_of(model), abs=1e-5)
    for l in range(1, 5):
        without = copy.deepcopy(model)
        del without.blocks[l - 1]  # the remaining blocks keep their own 1/sqrt(l)
        layer = result['layers'][l - 1]
        assert layer['loss_without'] == pytest.approx(loss_of(without), abs=1e-5)
        assert layer['loss_drop'] == pytest.approx(loss_of(without) - loss_of(model), abs=1e-5)
    last_two = copy.deepcopy(model)
    del last_two.blocks[2:]
    assert result['cumulative_drop'][1]['loss_without'] == pytest.approx(loss_of(last_two), abs=1e-5)


def test_depth_statistics_equal_direct_computations_on_the_residual_stream(trained):
    model = GPT.from_checkpoint(read_checkpoint(trained / 'pre' / 'ckpt.pt')).eval()
    x = torch.randint(0, 65, (6, 32), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 65, (6, 32), generator=torch.Generator().manual_seed(1))
    result = eval_layers.analyze(model, x, y, 4, torch.device('cpu'), nullcontext(), 8, 0, progress=False)
    with torch.no_grad():
        _, _, residuals = model(x, return_residuals=True)
    for l in range(1, 5):
        layer, r, before = result['layers'][l - 1], residuals[l].double(), residuals[l - 1].double()
        assert layer['variance'] == pytest.approx(r.var(unbiased=False).item(), rel=1e-6)
        assert layer['mean_norm'] == pytest.approx(r.norm(dim=-1).mean().item(), rel=1e-6)
        assert layer['update_ratio'] == pytest.approx(((r - before).norm(dim=-1) / before.norm(dim=-1)).mean().item(),
                                                      rel=1e-6)
        cos = F.cosine_similarity(before, r, dim=-1)
        assert layer['angular_distance_next'] == pytest.approx((torch.arccos(cos) / math.pi).mean().item(), rel=1e-6)
    heatmap = result['angular_distance']
    assert [row[0] for row in heatmap] == [layer['angular_distance_next'] for layer in result['layers']]
    assert len(heatmap) == 4 and len(heatmap[0]) == 4  # n = 1..min(max_distance, L)
    assert heatmap[3][1:] == [None, None, None] and heatmap[0][3] is not None  # block l + n only up to L + 1
    cos = F.cosine_similarity(residuals[0].double(), residuals[3].double(), dim=-1)
    assert heatmap[0][2] == pytest.approx((torch.arccos(cos) / math.pi).mean().item(), rel=1e-6)


def test_command_line_compares_models_and_writes_json_and_plots(trained, tmp_path, capsys):
    json_path, plots = tmp_path / 'layers.json', tmp_path / 'plots'
    code = eval_layers.main([str(trained / 'pre'), str(trained / 'lns' / 'ckpt.pt'),
                             '--data', str(trained / 'shakespeare_char'), '--tokens', '1024', '--last_k', '2',
                             '--json', str(json_path), '--plot', str(plots), '--device', 'cpu'])
    out = capsys.readouterr().out
    assert code == 0 and '[1]' in out and '[2]' in out and 'perplexity' in out
    report = json.loads(json_path.read_text())
    assert [len(m['layers']) for m in report['models']] == [4, 4]
    assert [m['norm_scheme'] for m in report['models']] == ['pre', 'lns']
    assert all(m['tokens'] == 1024 for m in report['models'])  # the same 32 windows of 32 for both
    assert report['settings']['block_size'] == 32 and len(report['models'][0]['cumulative_drop']) == 2
    for name in ('layer_drop.png', 'angular_distance.png', 'depth_profile.png'):
        assert (plots / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_text_is_tokenized_with_the_models_own_character_table(trained, tmp_path, capsys, char_text):
    text = tmp_path / 'text.txt'
    text.write_text(open(char_text).read()[:3000])
    assert eval_layers.main([str(trained / 'lns'), '--text', str(text), '--tokens', '512', '--device', 'cpu']) == 0
    strange = tmp_path / 'strange.txt'
    strange.write_text('naïve café ' * 100)
    assert eval_layers.main([str(trained / 'lns'), '--text', str(strange), '--device', 'cpu']) == 1
    assert 'never saw in training' in capsys.readouterr().err


@pytest.mark.parametrize('make, words', [
    (lambda root, tmp: [str(tmp / 'missing'), '--data', str(root / 'shakespeare_char')], ['does not exist']),
    (lambda root, tmp: [str(tmp), '--data', str(root / 'shakespeare_char')], ['neither ckpt.pt', 'config.json']),
    (lambda root, tmp: [str(root / 'lns'), '--data', str(tmp)], ['not a prepared data folder']),
])
def test_bad_inputs_end_in_one_sentence(trained, tmp_path, capsys, make, words):
    assert eval_layers.main(make(trained, tmp_path) + ['--device', 'cpu']) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and all(w in err for w in words), err


def test_data_of_another_tokenizer_is_refused(trained, tmp_path, capsys):
    (tmp_path / 'meta.json').write_text(json.dumps({'tokenizer': 'gpt2', 'vocab_size': 50304}))
    (tmp_path / 'val.bin').write_bytes(bytes(4096))
    assert eval_layers.main([str(trained / 'lns'), '--data', str(tmp_path), '--device', 'cpu']) == 1
    err = capsys.readouterr().err
    assert "holds 'gpt2' tokens" in err and "'char'" in err


def test_unsupported_hugging_face_architecture_names_the_supported_ones(tmp_path, capsys):
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'bert'}))
    (tmp_path / 'model.safetensors').write_bytes(b'')
    assert eval_layers.main([str(tmp_path), '--text', __file__, '--device', 'cpu']) == 1
    err = capsys.readouterr().err
    assert 'bert' in err and all(name in err for name in ('gpt2', 'llama', 'mistral', 'qwen2')), err


def test_a_hugging_face_gpt2_folder_is_analyzed_on_text_with_gpt2_bpe(tmp_path, capsys):
    transformers = pytest.importorskip('transformers')
    try:
        gpt2_encode()
    except eval_layers.UserError as error:
        pytest.skip(str(error))
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / 'tiny-gpt2')
    text = tmp_path / 'text.txt'
    text.write_text('The residual stream grows with depth, and deep blocks barely change it. ' * 40)
    json_path = tmp_path / 'layers.json'
    assert eval_layers.main([str(tmp_path / 'tiny-gpt2'), '--text', str(text), '--tokens', '256', '--block_size', '64',
                             '--device', 'cpu', '--json', str(json_path)]) == 0
    model = json.loads(json_path.read_text())['models'][0]
    assert model['tokenizer'] == 'gpt2' and model['n_layer'] == 3 and model['tokens'] == 256
    assert model['base_loss'] == pytest.approx(math.log(50257), abs=0.5)  # a random model: near uniform


def test_with_neither_data_nor_text_the_validation_split_the_runs_were_trained_on_is_used(trained, tmp_path,
                                                                                          char_data):
    recorded, explicit = tmp_path / 'recorded.json', tmp_path / 'explicit.json'
    runs = [str(trained / 'pre'), str(trained / 'lns')]
    assert eval_layers.main(runs + ['--tokens', '512', '--device', 'cpu', '--json', str(recorded)]) == 0
    assert eval_layers.main(runs + ['--data', char_data, '--tokens', '512', '--device', 'cpu',
                                    '--json', str(explicit)]) == 0
    recorded, explicit = json.loads(recorded.read_text()), json.loads(explicit.read_text())
    assert recorded['settings']['data'] == char_data
    assert [m['base_loss'] for m in recorded['models']] == [m['base_loss'] for m in explicit['models']]


def with_train_config(trained, tmp_path, name, **changes):
    """A copy of the lns run whose checkpoint records other training settings."""
    checkpoint = read_checkpoint(trained / 'lns' / 'ckpt.pt')
    checkpoint['train_config'] = {**checkpoint['train_config'], **changes}
    os.makedirs(tmp_path / name)
    torch.save(checkpoint, tmp_path / name / 'ckpt.pt')
    return str(tmp_path / name)


@pytest.mark.parametrize('changes, words', [
    (dict(data_dir='/elsewhere/shakespeare_char'), ['lns was trained on', 'but other on /elsewhere/', '--data']),
    (dict(data_dir='', dataset='never_prepared'), ['never_prepared, which is missing or not prepared']),
])
def test_recorded_data_that_differs_or_is_missing_is_refused_in_one_sentence(trained, tmp_path, capsys, changes,
                                                                              words):
    other = with_train_config(trained, tmp_path, 'other', **changes)
    models = [str(trained / 'lns'), other] if 'data_dir' in changes and changes['data_dir'] else [other]
    assert eval_layers.main(models + ['--device', 'cpu']) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and all(w in err for w in words), err


def test_runs_are_named_by_folder_with_parents_only_where_names_coincide(tmp_path):
    for folder in ('seed0/lns', 'seed1/lns', 'sweep/pre'):
        os.makedirs(tmp_path / folder)
    for name in ('ckpt.pt', 'ckpt_000500.pt'):
        (tmp_path / 'sweep' / 'pre' / name).write_bytes(b'')
    specs = [tmp_path / 'seed0' / 'lns', f"{tmp_path / 'seed1' / 'lns'}/", tmp_path / 'sweep' / 'pre' / 'ckpt.pt',
             tmp_path / 'sweep' / 'pre' / 'ckpt_000500.pt', 'openai-community/gpt2']
    assert eval_layers.run_names([str(s) for s in specs]) == ['seed0/lns', 'seed1/lns', 'pre', 'pre/ckpt_000500',
                                                              'openai-community/gpt2']


def test_an_exported_character_model_reads_text_with_its_own_tokenizer_json(trained, tmp_path, char_text):
    """An exported gpt-arch char model is a 'gpt2' folder, yet its tokenizer.json, not GPT-2's BPE, reads the
    text: the loss equals the checkpoint's on the same text."""
    from hf import to_hf
    checkpoint = read_checkpoint(trained / 'lns' / 'ckpt.pt')
    to_hf(GPT.from_checkpoint(checkpoint), tmp_path / 'hf', checkpoint['data_meta'])
    text = tmp_path / 'text.txt'
    text.write_text(open(char_text).read()[:3000])
    losses = []
    for model in (str(trained / 'lns'), str(tmp_path / 'hf')):
        json_path = tmp_path / 'layers.json'
        assert eval_layers.main([model, '--text', str(text), '--tokens', '1024', '--device', 'cpu',
                                 '--json', str(json_path)]) == 0
        losses.append(json.loads(json_path.read_text())['models'][0]['base_loss'])
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)


def test_a_hugging_face_folder_without_data_or_text_is_asked_for_them(tmp_path, capsys):
    from hf import to_hf
    to_hf(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50)), tmp_path / 'hf')
    assert eval_layers.main([str(tmp_path / 'hf'), '--device', 'cpu']) == 1
    err = capsys.readouterr().err
    assert 'hf records no training data; pass --data FOLDER or --text FILE' in err and err.count('\n') == 1, err
