"""The authors' recipe, part by part: pure bf16 training, the embedding's init std, frozen norm gains."""

import pytest
import torch

import dataloader
import train
from conftest import read_log
from model import GPT, GPTConfig, read_checkpoint

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_sequences=8',
        '--device=cpu', '--warmup_iters=0', '--decay_lr=False', '--weight_decay=0', '--grad_clip=0',
        '--beta2=0.999', '--norm_scheme=pre', '--arch=llama']


def norm_weights(state):
    return {name: weight for name, weight in state.items() if name.endswith('norm.weight')}


def train_tiny(tmp_path, char_data, *extra, steps=20):
    argv = TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', f'--max_iters={steps}',
                   f'--eval_interval={steps}', *extra]
    assert train.main(argv) == 0
    return read_checkpoint(tmp_path / 'ckpt.pt')


def test_pure_bf16_keeps_weights_gradients_and_adam_state_in_bf16(tmp_path, char_data):
    checkpoint = train_tiny(tmp_path, char_data, '--dtype=pure_bfloat16', '--learning_rate=1e-3')
    assert {t.dtype for t in checkpoint['model'].values()} == {torch.bfloat16}
    moments = [s[key] for s in checkpoint['optimizer']['state'].values() for key in ('exp_avg', 'exp_avg_sq')]
    assert moments and {t.dtype for t in moments} == {torch.bfloat16}
    val = [r['val_loss'] for r in read_log(tmp_path) if 'val_loss' in r]
    assert val[-1] < val[0]  # it still learns


def test_pure_bf16_adam_steps_of_lr_1e3_round_away_on_norm_gains_of_1(tmp_path, char_data):
    """bf16 values just below 1 are 2^-8 apart: a step of about 1e-3 rounds back to exactly 1."""
    pure = train_tiny(tmp_path / 'pure', char_data, '--dtype=pure_bfloat16', '--learning_rate=1e-3')
    assert all(torch.equal(w, torch.ones_like(w)) for w in norm_weights(pure['model']).values())
    mixed = train_tiny(tmp_path / 'mixed', char_data, '--dtype=bfloat16', '--learning_rate=1e-3')
    moved = [name for name, w in norm_weights(mixed['model']).items() if not torch.equal(w, torch.ones_like(w))]
    assert len(moved) == len(norm_weights(mixed['model']))  # under autocast every gain trains


def test_frozen_norm_gains_stay_1_and_the_rest_trains(tmp_path, char_data):
    checkpoint = train_tiny(tmp_path, char_data, '--train_norm_gains=False', '--learning_rate=1e-2')
    assert all(torch.equal(w, torch.ones_like(w)) for w in norm_weights(checkpoint['model']).values())
    model = GPT(GPTConfig(arch='llama', n_layer=2, n_head=2, n_embd=32, train_norm_gains=False))
    optimized = {id(p) for group in model.configure_optimizer(0.0, 1e-3, (0.9, 0.99), 'cpu').param_groups
                 for p in group['params']}
    assert all((id(p) in optimized) == (not name.endswith('norm.weight')) for name, p in model.named_parameters())


@pytest.mark.parametrize('arch', ['gpt', 'llama'])
def test_embeddings_start_at_embedding_init_std_and_matrices_at_002(arch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch=arch, n_layer=2, n_head=4, n_embd=64, vocab_size=4096, block_size=256,
                          tie_embeddings=False, embedding_init_std=0.632))
    assert model.tok_emb.weight.std().item() == pytest.approx(0.632, rel=0.02)
    if arch == 'gpt':
        assert model.pos_emb.weight.std().item() == pytest.approx(0.632, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError, match='embedding_init_std must be positive'):
        GPTConfig(embedding_init_std=0)


def test_each_evaluation_logs_per_block_variance_gain_and_gradient_norm(tmp_path, char_data):
    """Checked against the saved model of the same iteration on the first 1,024 tokens' worth of the validation
    set's sequences (40 windows evenly spaced over val.bin here, so the cut shows)."""
    argv = TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--max_iters=6', '--eval_interval=3',
                   '--norm_scheme=lns', '--n_layer=3', '--learning_rate=1e-2', '--eval_sequences=40']
    assert train.main(argv) == 0
    records = [r for r in read_log(tmp_path) if 'val_loss' in r]
    assert [r['iter'] for r in records] == [0, 3, 6] and all(len(r['block_variance']) == 3 for r in records)
    record = records[-1]
    model = GPT.from_checkpoint(read_checkpoint(tmp_path / 'ckpt.pt')).eval()
    cfg = train.parse_config(argv)
    data = dataloader.TokenData(char_data, dataloader.read_meta(char_data, 'shakespeare_char'), cfg.seed)
    last_start = len(data.tokens('val')) - cfg.block_size - 1
    first_batch = torch.tensor([round(i * last_start / 39) for i in range(40)])
    x, y = data.read('val', first_batch[:1024 // cfg.block_size], cfg.block_size, torch.device('cpu'))
    _, loss, residuals = model(x, y, return_residuals=True)
    loss.backward()
    for l, block in enumerate(model.blocks):
        assert record['block_variance'][l] == pytest.approx(residuals[l + 1].var(unbiased=False).item(), rel=1e-4)
        gains = [block.attn_norm.weight, block.mlp_norm.weight]
        assert record['block_norm_gain'][l] == pytest.approx(
            sum(g.mean().item() for g in gains) / 2 / (l + 1) ** 0.5, rel=1e-5)
        grad = torch.cat([p.grad.flatten() for p in block.parameters()]).norm().item()
        assert record['block_grad_norm'][l] == pytest.approx(grad, rel=1e-4)


def test_eval_layers_plots_the_logged_variance_by_depth_across_training(tmp_path, char_data):
    import json

    import eval_layers
    run = tmp_path / 'run'
    assert train.main(TINY + [f'--data_dir={char_data}', f'--out_dir={run}', '--max_iters=4', '--eval_interval=2',
                              '--n_layer=3']) == 0
    assert eval_layers.main([str(run), '--tokens=512', '--block_size=32', '--max_distance=2', '--device=cpu',
                             f'--json={tmp_path / "layers.json"}', f'--plot={tmp_path / "plots"}']) == 0
    [model] = json.loads((tmp_path / 'layers.json').read_text())['models']
    logged = [{'iter': r['iter'], 'block_variance': r['block_variance']} for r in read_log(run) if 'val_loss' in r]
    assert model['variance_during_training'] == logged and [r['iter'] for r in logged] == [0, 2, 4]
    assert (tmp_path / 'plots' / 'variance_during_training.png').stat().st_size > 0


def test_pure_bf16_trains_under_ddp_like_one_process(tmp_path, char_data):
    """Two processes split the global batch and all-reduce bf16 gradients: the same losses as one process, up to
    bf16 rounding, and a bf16 checkpoint."""
    from conftest import finish, launch, training_losses
    common = TINY + [f'--data_dir={char_data}', '--dtype=pure_bfloat16', '--learning_rate=1e-3', '--max_iters=4',
                     '--eval_interval=4', '--log_interval=1', '--gradient_accumulation_steps=2']
    assert train.main(common + [f'--out_dir={tmp_path / "one"}']) == 0
    code, _, err = finish(launch(common + [f'--out_dir={tmp_path / "two"}'], nproc=2))
    assert code == 0, err
    one, two = training_losses(tmp_path / 'one'), training_losses(tmp_path / 'two')
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    assert all(abs(one[i] - two[i]) < 2e-2 for i in one)
    assert {t.dtype for t in read_checkpoint(tmp_path / 'two' / 'ckpt.pt')['model'].values()} == {torch.bfloat16}
