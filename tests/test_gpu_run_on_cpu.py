"""What a long GPU run relies on, proven on the CPU: checkpoints load into CPU memory, saves happen in the
background, a training step never waits for the device, the distributed backend follows the chosen device, the
first step's compilation stays out of the speed figures."""

import os
import socket
import sys
import threading

import pytest
import torch

import bench
import checkpoint
import configurator
import dataloader
import train
from conftest import ROOT, read_log
from model import GPT, GPTConfig, read_checkpoint

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_sequences=8',
        '--device=cpu', '--warmup_iters=2', '--learning_rate=3e-3']
OUR_FILES = {os.path.abspath(module.__file__)
             for module in (train, checkpoint, configurator, dataloader, sys.modules['model'])}


def tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors(item)


@pytest.mark.filterwarnings('ignore:for .* copying from a non-meta parameter')
def test_resume_onto_another_device_keeps_rng_states_on_the_cpu(tmp_path, char_data):
    """set_rng_state takes CPU byte tensors only: a checkpoint mapped onto the training device (here 'meta',
    standing in for a GPU) would fail on the first resume."""
    argv = TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--max_iters=2', '--eval_interval=2']
    assert train.main(argv) == 0
    cfg = train.parse_config(argv + ['--init_from=resume'])
    config = train.model_config(cfg, dataloader.read_meta(char_data, 'shakespeare_char')['vocab_size'])
    saved = checkpoint.load_resume_checkpoint(cfg.out_dir)
    assert {t.device.type for t in tensors(saved)} == {'cpu'}
    with torch.device('meta'):
        model = GPT(config)
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), 'meta')
    sampler = torch.Generator()
    _, scaler = configurator.mixed_precision('float32', torch.device('cpu'))
    checkpoint.restore_state(saved, model, optimizer, scaler, sampler, cfg.seed, configurator.Distributed(),
                             cfg.out_dir)
    assert torch.equal(sampler.get_state(), saved['rng'][0]['sampler'])


class SyncCounter:
    """Counts the calls, made from our modules, of the tensor methods that wait for the device: in `steps` those
    made during the optimizer steps of train.py's loop (from a step's learning-rate lookup to the loop's next
    all_reduce, through which every read of the device between steps goes: the loss check, the logged loss, the
    evaluation), in `outside` the others; `step_count` is the number of steps seen."""
    METHODS = ('item', 'tolist', '__float__', '__int__', '__bool__', '__index__')

    def __init__(self, monkeypatch):
        self.steps, self.outside, self.step_count, self.in_step = [], [], 0, False
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self.wrap(name, original))
        get_lr, all_reduce = train.get_lr, train.all_reduce

        def step_begins(*args):
            self.in_step, self.step_count = True, self.step_count + 1
            return get_lr(*args)

        def steps_end(*args):
            self.in_step = False
            return all_reduce(*args)
        monkeypatch.setattr(train, 'get_lr', step_begins)
        monkeypatch.setattr(train, 'all_reduce', steps_end)

    def wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if os.path.abspath(caller.co_filename) in OUR_FILES:
                (self.steps if self.in_step else self.outside).append(f'{name} in {caller.co_name}')
            return original(tensor, *args, **kwargs)
        return counted


@pytest.mark.parametrize('extra', [[], ['--gradient_accumulation_steps=2', '--grad_clip=1.0', '--dropout=0.1']])
def test_a_training_step_that_does_not_log_never_waits_for_the_device(monkeypatch, tmp_path, char_data, extra):
    counter = SyncCounter(monkeypatch)
    assert train.main(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--max_iters=4',
                              '--eval_interval=100', '--log_interval=100'] + extra) == 0
    assert counter.step_count == 4 and counter.steps == []
    # the evaluations and the save around the steps do read the device
    assert any('in estimate_loss' in call for call in counter.outside), counter.outside


def test_the_first_non_finite_iteration_is_found_without_reading_each_step(monkeypatch, tmp_path, char_data,
                                                                            capsys):
    """The third step's loss is made NaN; the loop reads the device only at its final evaluation, three steps later,
    and still names iteration 3 (steps are numbered by their end, as the log numbers them)."""
    counter, forward = SyncCounter(monkeypatch), GPT.forward
    calls = []

    def third_step_nan(model, *args, **kwargs):
        outputs = forward(model, *args, **kwargs)
        calls.append(model.training)
        if model.training and calls.count(True) == 3:
            return outputs[0], outputs[1] * float('nan')
        return outputs
    monkeypatch.setattr(GPT, 'forward', third_step_nan)
    code = train.main(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--max_iters=6',
                              '--eval_interval=100', '--log_interval=100'])
    assert code == 3 and counter.step_count == 6 and counter.steps == []
    assert 'training loss is not finite at iteration 3; stopped at iteration 6' in capsys.readouterr().err
    assert read_log(tmp_path)[-1] == {'iter': 3, 'diverged': 'train'}


def test_the_model_can_drop_its_logits_when_only_the_loss_is_needed():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    idx = torch.randint(0, 11, (2, 8))
    logits, loss = model(idx, idx)
    dropped, same_loss = model(idx, idx, return_logits=False)
    assert logits.shape == (2, 8, 11) and dropped is None and torch.equal(loss, same_loss)


def test_checkpoints_are_written_in_the_background_from_a_copy(tmp_path, monkeypatch):
    release, writing = threading.Event(), threading.Event()
    real_save = checkpoint.save_checkpoint

    def slow_save(*args, **kwargs):
        writing.set()
        release.wait(30)
        real_save(*args, **kwargs)
    monkeypatch.setattr(checkpoint, 'save_checkpoint', slow_save)
    writer = checkpoint.CheckpointWriter(str(tmp_path), 0, str(tmp_path / 'log.jsonl'))
    weights = torch.ones(4)
    writer.save({'model': {'w': weights}, 'model_config': {}, 'iter_num': 7})
    assert writing.wait(30) and not (tmp_path / 'ckpt.pt').exists()  # save() returned while the write waits
    weights.mul_(5)  # training goes on changing the live tensors
    release.set()
    writer.close()
    saved = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert torch.equal(saved['model']['w'], torch.ones(4)) and saved['iter_num'] == 7
    [record] = read_log(tmp_path)
    assert record['iter'] == 7 and record['checkpoint_write_seconds'] > 0 and record['checkpoint_copy_seconds'] >= 0


def test_a_failed_background_write_is_reported_in_one_sentence(tmp_path):
    (tmp_path / 'out').write_text('a file where the run folder should be')
    writer = checkpoint.CheckpointWriter(str(tmp_path / 'out'), 0, str(tmp_path / 'log.jsonl'))
    writer.save({'model': {}, 'model_config': {}, 'iter_num': 1})
    with pytest.raises(train.UserError, match='writing a checkpoint to .* failed'):
        writer.close()


def test_checkpoints_follow_their_own_interval_and_the_last_iteration(tmp_path, char_data):
    assert train.main(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--max_iters=7',
                              '--eval_interval=2', '--checkpoint_interval=3', '--keep_last_n=5']) == 0
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith('ckpt-')) == [
        'ckpt-0000003.pt', 'ckpt-0000006.pt']  # the earlier ones; ckpt.pt holds 7
    saves = [r['iter'] for r in read_log(tmp_path) if 'checkpoint_write_seconds' in r]
    evals = [r['iter'] for r in read_log(tmp_path) if 'val_loss' in r]
    assert saves == [3, 6, 7] and evals == [0, 2, 4, 6, 7]


def test_speed_figures_leave_out_the_first_step_after_a_start_or_resume(tmp_path, char_data):
    common = TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--log_interval=1', '--eval_interval=3']
    assert train.main(common + ['--max_iters=3']) == 0
    assert train.main(common + ['--max_iters=6', '--init_from=resume']) == 0
    speeds = {r['iter']: r['ms_per_iter'] for r in read_log(tmp_path) if 'loss' in r}
    assert speeds[1] is None and speeds[4] is None  # the first step of each process: compilation, warm-up
    assert all(speeds[i] > 0 for i in (2, 3, 5, 6))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_the_distributed_backend_follows_the_chosen_device_not_the_machine(monkeypatch):
    """--device=cpu under torchrun on a GPU node must use gloo: NCCL cannot carry CPU tensors."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)  # as on a GPU node
    for key, value in {'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '1', 'MASTER_ADDR': '127.0.0.1',
                       'MASTER_PORT': str(free_port())}.items():
        monkeypatch.setenv(key, value)
    dist, device = configurator.setup_distributed(train.parse_config(['--device=cpu', '--ddp_timeout_minutes=7']))
    try:
        assert dist.ddp and device == torch.device('cpu')
        assert torch.distributed.get_backend() == 'gloo'
    finally:
        torch.distributed.destroy_process_group()


def test_each_process_binds_its_process_group_to_its_own_gpu(monkeypatch):
    """device_id: NCCL starts with the group and the last barrier knows its GPU instead of guessing it."""
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 4)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: None)
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda **kwargs: calls.append(kwargs))
    for key, value in {'RANK': '2', 'LOCAL_RANK': '2', 'WORLD_SIZE': '4'}.items():
        monkeypatch.setenv(key, value)
    dist, device = configurator.setup_distributed(train.parse_config(['--device=cuda']))
    assert device == torch.device('cuda', 2) and calls[0]['backend'] == 'nccl'
    assert calls[0]['device_id'] == torch.device('cuda', 2)


def test_background_saves_copy_into_the_same_buffers_every_time(tmp_path, monkeypatch):
    """Allocated once, not per save: at 1B the state is 8 to 16 GB, fresh memory each time a stall on rank 0."""
    written = []
    real_save = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, 'save_checkpoint',
                        lambda *args, **kwargs: (written.append(args[1]), real_save(*args, **kwargs)))
    writer = checkpoint.CheckpointWriter(str(tmp_path), 1, str(tmp_path / 'log.jsonl'))
    weights = torch.ones(4)
    for iteration in (1, 2):
        writer.save({'model': {'w': weights}, 'model_config': {}, 'iter_num': iteration, 'rng': [torch.ones(2)]})
        weights.add_(1)
    writer.close()
    first, second = written
    assert first['model']['w'].data_ptr() == second['model']['w'].data_ptr() != weights.data_ptr()
    assert first['rng'][0].data_ptr() == second['rng'][0].data_ptr()
    assert torch.equal(read_checkpoint(tmp_path / 'ckpt-0000001.pt')['model']['w'], torch.ones(4))
    assert torch.equal(read_checkpoint(tmp_path / 'ckpt.pt')['model']['w'], torch.full((4,), 2.0))


@pytest.mark.parametrize('options', [dict(arch='llama', norm_scheme='lns', lns_mode='gain_init'),
                                     dict(arch='gpt', norm_scheme='post', bias=True, layerscale=True),
                                     dict(arch='llama', norm_scheme='peri', skipinit=True),
                                     dict(arch='gpt', norm_scheme='deepnorm', bias=True, tie_embeddings=True)])
def test_init_weights_sets_every_tensor_so_a_model_made_on_the_meta_device_needs_nothing_else(options):
    config = GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=11, **options)
    torch.manual_seed(0)
    made = GPT(config)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float('nan'))
    torch.manual_seed(0)
    model.init_weights()
    for (name, p), q in zip(model.named_parameters(), made.parameters()):
        assert torch.isfinite(p).all(), name
        if p.numel() > 1 and p.std() == 0 or p.numel() == 1:  # the constants: norm weights, biases, gains
            assert torch.equal(p, q), name


def test_the_trainer_makes_the_model_on_its_device_without_a_copy_in_cpu_memory(monkeypatch):
    """On a GPU the 1B model was made on the CPU in float32 first (5.4 GB per process) and initialised twice; here
    the meta device stands in for the GPU: every tensor init_weights sets must already live there."""
    devices = []
    init_weights = GPT.init_weights
    monkeypatch.setattr(GPT, 'init_weights', lambda model: (devices.extend(p.device.type for p in model.parameters()),
                                                             init_weights(model)))
    cfg = train.parse_config(['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32'])
    model = train.build_model(cfg, train.model_config(cfg, 65), torch.device('meta'))[0]
    assert devices and set(devices) == {'meta'} and {p.device.type for p in model.parameters()} == {'meta'}


def test_compile_mode_reaches_torch_compile(monkeypatch, tmp_path, char_data):
    modes = []
    monkeypatch.setattr(torch, 'compile', lambda model, mode=None: (modes.append(mode), model)[1])
    assert train.main(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--max_iters=1', '--compile=True',
                              '--compile_mode=max-autotune-no-cudagraphs']) == 0
    assert modes == ['max-autotune-no-cudagraphs']


def test_peak_flops_match_whole_words_and_follow_the_dtype(monkeypatch):
    for name, dtype, peak in [('NVIDIA L4', 'bfloat16', 121e12), ('NVIDIA L40S', 'bfloat16', 362e12),
                              ('NVIDIA H100 80GB HBM3', 'float32', 495e12), ('Tesla V100-SXM2-16GB', 'float16', 125e12),
                              ('Tesla V100-SXM2-16GB', 'bfloat16', None), ('Tesla V100-SXM2-16GB', 'float32', None)]:
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device, name=name: name)
        assert configurator.peak_flops(torch.device('cuda'), dtype) == (name, peak)


@pytest.mark.slow
def test_compile_with_ddp_and_activation_checkpointing_trains(tmp_path, char_data):
    """The combination that torch before 2.6 rejected (requirements.txt asks for 2.6 or later)."""
    from conftest import finish, launch
    code, out, err = finish(launch(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--max_iters=4',
                                           '--eval_interval=4', '--gradient_accumulation_steps=2', '--compile=True',
                                           '--activation_checkpointing=True'], nproc=2), timeout=600)
    assert code == 0, err[-3000:]
    val = [r['val_loss'] for r in read_log(tmp_path) if 'val_loss' in r]
    assert len(val) == 2 and val[1] < val[0]


def test_tf32_setting_decides_the_float32_matmul_precision_on_a_gpu_only():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision('medium')
        configurator.mixed_precision('float32', torch.device('cpu'), tf32=False)
        assert torch.get_float32_matmul_precision() == 'medium'  # a CPU's precision is never touched
        configurator.mixed_precision('float32', torch.device('cuda'), tf32=False)
        assert torch.get_float32_matmul_precision() == 'highest'
        configurator.mixed_precision('float32', torch.device('cuda'))
        assert torch.get_float32_matmul_precision() == 'high'
        assert train.parse_config(['--tf32=False']).tf32 is False
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_depth_diagnostics_need_a_fraction_of_a_micro_batch_s_memory_at_the_1b_shape():
    """The activations the diagnostics' backward keeps, counted on the meta device for the 1B config in bf16: on
    the trainer's slice of a 32-row micro-batch they are a few GiB, about an eighth of the whole micro-batch's
    (about 34 GiB, more than a checkpointed training step needs)."""
    cfg = train.parse_config([os.path.join(ROOT, 'config', 'llama_1b_lns.py')])
    micro_batch = torch.arange(32)
    diagnosed = len(micro_batch[:train.DIAGNOSTIC_TOKENS // cfg.block_size])
    assert diagnosed == 4
    slice_bytes = bench.saved_activation_bytes(cfg, diagnosed, return_residuals=True)
    assert slice_bytes < 5 * 2 ** 30
    assert slice_bytes < bench.saved_activation_bytes(cfg, len(micro_batch), return_residuals=True) / 7
    assert train.DIAGNOSTIC_TOKENS // 64 == 16  # the CPU configs' 64-token sequences


def test_accumulated_gradients_live_in_ddp_buckets_with_no_second_copy(tmp_path, char_data, monkeypatch):
    """With gradient_as_bucket_view, DDP makes each .grad a view into its all-reduce buckets. A gradient freed
    between steps (zero_grad's set_to_none) comes back in the next micro-steps without sync as a separate tensor
    beside the buckets: a second gradient-sized copy. So at every micro-step after the first optimizer step, every
    gradient must exist and share storage with the one bucket of this small model. The run is a one-process DDP
    job, set up as torchrun sets it up."""
    for name, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    storages, build_model = [], train.build_model

    def build_and_watch(*args):
        model, *rest = build_model(*args)
        model.register_forward_pre_hook(lambda module, _: storages.append(
            {p.grad.untyped_storage().data_ptr() if p.grad is not None else None for p in module.parameters()})
            if module.training else None)  # training forwards only, not the evaluations'
        return (model, *rest)
    monkeypatch.setattr(train, 'build_model', build_and_watch)
    assert train.main(TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--gradient_accumulation_steps=3',
                              '--max_iters=3', '--eval_interval=100', '--log_interval=100']) == 0
    assert len(storages) == 9
    assert all(len(seen) == 1 and None not in seen for seen in storages[3:])
    assert len(storages[3] | storages[-1]) == 1  # the same bucket throughout


@pytest.mark.skipif(not os.path.exists('/proc/self/maps'), reason='reads the mappings of a Linux process')
def test_resume_maps_the_checkpoint_so_that_the_processes_of_a_node_share_one_copy(tmp_path, char_data):
    argv = TINY + [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--max_iters=2', '--eval_interval=2']
    assert train.main(argv) == 0
    cfg = train.parse_config(argv + ['--init_from=resume'])
    saved = checkpoint.load_resume_checkpoint(cfg.out_dir)
    with open('/proc/self/maps') as f:
        assert str(tmp_path / 'ckpt.pt') in f.read()  # in the page cache, not a private copy
    for key, value in read_checkpoint(tmp_path / 'ckpt.pt')['model'].items():
        assert torch.equal(saved['model'][key], value)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_the_loss_in_chunks_equals_the_loss_over_all_logits_and_so_do_its_gradients(dtype):
    """loss_chunk_tokens: the chunks' loss sums over the targets that count (-1: none), each chunk's logits
    recomputed in the backward pass; the same loss and gradients as over the whole (batch x seq x vocab) at once."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)).to(dtype)
    x, y = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    y[0, :5] = -1
    results = []
    for chunk in (0, 7):  # 48 tokens: 6 chunks of 7 and one of 6
        model.zero_grad()
        model.loss_chunk_tokens = chunk
        _, loss = model(x, y, return_logits=False)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (whole, whole_grads), (chunked, chunked_grads) = results
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert chunked.item() == pytest.approx(whole.item(), rel=tolerance)
    for a, b in zip(whole_grads, chunked_grads):
        torch.testing.assert_close(b.float(), a.float(), rtol=tolerance, atol=tolerance)
