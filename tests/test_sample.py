"""sample.py and GPT.generate: greedy text against a token-by-token argmax of a model built without the skipped
blocks, seeds, top_k, the three kinds of model folder, and bad options."""

import copy
import os

import pytest
import torch

import sample
from model import GPT, GPTConfig

CHARS = '\n !,.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'


@pytest.fixture
def run(tmp_path):
    """A run folder with a random char model, in train.py's checkpoint format."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch='llama', norm_scheme='lns', n_layer=4, n_head=2, n_embd=32, block_size=64,
                          vocab_size=len(CHARS)))
    os.makedirs(tmp_path / 'lns')
    torch.save({'model': model.state_dict(), 'model_config': model.config.to_dict(),
                'data_meta': {'tokenizer': 'char', 'vocab_size': len(CHARS), 'chars': CHARS}},
               tmp_path / 'lns' / 'ckpt.pt')
    return str(tmp_path / 'lns'), model.eval()


def greedy_text(model, prompt, count):
    """The prompt and `count` characters, each the argmax of the model's next-token distribution."""
    ids = [CHARS.index(c) for c in prompt]
    with torch.no_grad():
        for _ in range(count):
            ids.append(model(torch.tensor([ids[-model.config.block_size:]]))[0][0, -1].argmax().item())
    return ''.join(CHARS[i] for i in ids)


def texts(capsys, argv):
    assert sample.main(argv + ['--device=cpu']) == 0, capsys.readouterr().err
    return capsys.readouterr().out.split('\n---------------\n')[:-1]


def test_greedy_text_is_the_argmax_of_a_model_built_without_the_skipped_blocks(run, capsys):
    folder, model = run
    without = copy.deepcopy(model)
    del without.blocks[3], without.blocks[1]  # blocks 2 and 4; the others keep their own 1/sqrt(l)
    # 6 + 64 characters exceed block_size 64, so generation also crops its context
    options = [folder, '--start=ROMEO:', '--max_new_tokens=64', '--temperature=0', '--num_samples=1']
    skipped, = texts(capsys, options + ['--skip_layers=2,4'])
    full, = texts(capsys, options)
    assert skipped == greedy_text(without, 'ROMEO:', 64)
    assert full == greedy_text(model, 'ROMEO:', 64) != skipped


def test_top_k_1_is_greedy_and_a_seed_repeats_its_samples(run, capsys):
    folder, _ = run
    options = [folder, '--start=KING:', '--max_new_tokens=20', '--num_samples=2']
    assert texts(capsys, options + ['--top_k=1', '--temperature=1.5']) == texts(capsys, options + ['--temperature=0'])
    first = texts(capsys, options + ['--seed=1', '--temperature=1', '--top_k=None'])
    assert first == texts(capsys, options + ['--seed=1', '--temperature=1', '--top_k=None'])
    assert first != texts(capsys, options + ['--seed=2', '--temperature=1', '--top_k=None'])
    assert len(first) == 2 and first[0] != first[1] and all(t.startswith('KING:') for t in first)


def test_a_prompt_file_and_an_exported_hugging_face_folder_give_the_same_text(run, capsys, tmp_path):
    from hf import to_hf
    folder, model = run
    to_hf(model, tmp_path / 'hf', {'tokenizer': 'char', 'vocab_size': len(CHARS), 'chars': CHARS})
    (tmp_path / 'prompt.txt').write_text('QUEEN:\nMy lord,')
    options = ['--max_new_tokens=30', '--temperature=0', '--num_samples=1', '--skip_layers=3']
    from_run = texts(capsys, [folder, f"--start=FILE:{tmp_path / 'prompt.txt'}"] + options)
    assert from_run == texts(capsys, [str(tmp_path / 'hf'), '--start=QUEEN:\nMy lord,'] + options)
    assert from_run[0].startswith('QUEEN:\nMy lord,')


@pytest.mark.parametrize('options, words', [
    (['--skip_layers=5'], ['blocks from 1 to 4']),
    (['--skip_layers=2;3'], ['separated by commas']),
    (['--top_k=0'], ['--top_k must be at least 1']),
    (['--temperature=-1'], ['--temperature must be 0 or more']),
    (['--num_samples=0'], ['--num_samples must be at least 1']),
    (['--seed=x'], ["seed expects an int, but --seed gives 'x'"]),
    (['--seed'], ['malformed argument', '--key=value']),
    (['--topk=5'], ["unknown setting 'topk' in --topk", 'top_k']),
    (['--start=naïve'], ["1 distinct character 'ï' that lns never saw in training"]),
    (['--start=FILE:/no/such/prompt.txt'], ['cannot read the prompt file /no/such/prompt.txt']),
])
def test_bad_options_end_in_one_sentence(run, capsys, options, words):
    assert sample.main([run[0]] + options + ['--device=cpu']) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and all(w in err for w in words), err


def test_a_missing_model_ends_in_one_sentence(tmp_path, capsys):
    assert sample.main(['--device=cpu']) == 1
    assert 'give one model' in capsys.readouterr().err
    assert sample.main([str(tmp_path / 'missing')]) == 1
    assert 'does not exist' in capsys.readouterr().err
