"""tasks.py, the benchmarks of eval_layers.py --task: benchmark files in their own formats (written here), prompts as
the common harnesses build them, log-likelihoods against a token-by-token computation, and acc / acc_norm against
hand-made scores."""

import copy
import io
import json
import os
import statistics
import tarfile
from contextlib import nullcontext

import pytest
import torch

import hf
import eval_layers
import tasks
from model import GPT, GPTConfig
from tasks import Example, accuracies, choice_loglikelihoods, evaluate_task, read_task, task_requests

# printable ASCII and the newline: every character of the files below
CHARS = '\n' + ''.join(chr(c) for c in range(32, 127))

HELLASWAG = [
    {'ind': 4, 'activity_label': 'Removing ice from car', 'ctx_a': 'Then, the man writes over the snow covering the '
     'window of a car, and a woman wearing winter clothes smiles.', 'ctx_b': 'then', 'ctx': 'unused here',
     'split': 'val', 'split_type': 'indomain', 'label': 3, 'source_id': 'activitynet~v_-1IBHYS3L-Y',
     'endings': [', the man adds wax to the windshield and cuts it.', ', a person board a ski lift.',
                 ', the man puts on a christmas coat, knitted with netting.',
                 ', the man continues removing the snow on his car.']},
    {'ind': 7, 'activity_label': 'Home and Garden', 'ctx_a': '[header] How to grow tomatoes [title] Pick a sunny '
     'spot.', 'ctx_b': '', 'ctx': 'unused here', 'split': 'val', 'split_type': 'zeroshot', 'label': '0',
     'source_id': 'wikihow~1', 'endings': ['[step] Water them  every day.', 'Paint the pot.', 'Sell the car.',
                                           'Sing to the moon.']},
    {'ind': 9, 'activity_label': 'Baking cookies', 'ctx_a': 'A woman puts a tray into the oven.',
     'ctx_b': 'she', 'ctx': 'unused here', 'split': 'val', 'split_type': 'indomain', 'label': 1,
     'source_id': 'activitynet~x', 'endings': ['flies away.', 'waits for the cookies to bake.', 'eats the oven.',
                                                'reads a map of the sea.']},
]

ARC_AI2 = [
    {'id': 'Mercury_7175875', 'question': {'stem': 'An astronomer observes that a planet rotates faster after a '
     'meteorite impact. Which is the most likely effect of this increase in rotation?', 'choices': [
         {'text': 'Planetary density will decrease.', 'label': 'A'},
         {'text': 'Planetary years will become longer.', 'label': 'B'},
         {'text': 'Planetary days will become shorter.', 'label': 'C'},
         {'text': 'Planetary gravity will become stronger.', 'label': 'D'}]}, 'answerKey': 'C'},
    {'id': 'NYSEDREGENTS_2015_4_8', 'question': {'stem': 'Which is a source of light?', 'choices': [
        {'text': 'the Sun', 'label': '1'}, {'text': 'a mirror', 'label': '2'}, {'text': 'the Moon', 'label': '3'}]},
     'answerKey': '1'},
]

MMLU_ROWS = [['Find the degree of the field extension Q(sqrt(2)) over Q.', '0', '2', '4', '6', 'B'],
             ['Which of these is a group under addition?', 'the integers', 'the naturals', 'the odd integers',
              '{1}', 'A']]


def write_jsonl(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


def write_mmlu_csv(path, rows):
    import csv
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows(rows)
    return path


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(arch='llama', n_layer=3, n_head=2, n_embd=32, block_size=256, vocab_size=len(CHARS))).eval()


def loaded(model):
    return hf.LoadedModel('tiny', model, 'char', hf.char_encode(CHARS, 'tiny'))


def save_checkpoint(model, folder):
    os.makedirs(folder, exist_ok=True)
    torch.save({'model': model.state_dict(), 'model_config': model.config.to_dict(), 'iter_num': 0,
                'data_meta': {'tokenizer': 'char', 'vocab_size': len(CHARS), 'chars': CHARS}},
               os.path.join(folder, 'ckpt.pt'))
    return str(folder)


def test_hellaswag_prompt_is_activity_label_and_context_then_each_ending_after_a_space(tmp_path):
    examples = read_task('hellaswag', str(write_jsonl(tmp_path / 'hellaswag_val.jsonl', HELLASWAG)), None)
    assert examples[0].context == ('Removing ice from car: Then, the man writes over the snow covering the window '
                                   'of a car, and a woman wearing winter clothes smiles. Then')
    assert examples[0].continuations[3] == ' , the man continues removing the snow on his car.'
    assert examples[0].label == 3 and examples[1].label == 0  # labels come as ints or strings
    # WikiHow markers: ' [title]' ends a sentence, other bracketed markers go, then double spaces become one
    assert examples[1].context == 'Home and Garden: How to grow tomatoes. Pick a sunny spot.'
    assert examples[1].continuations[0] == '  Water them every day.'  # the space a removed '[step] ' left stays


def test_arc_reads_ai2_jsonl_and_hugging_face_rows_alike(tmp_path):
    rows = [{'id': r['id'], 'question': r['question']['stem'],
             'choices': {'text': [c['text'] for c in r['question']['choices']],
                         'label': [c['label'] for c in r['question']['choices']]}, 'answerKey': r['answerKey']}
            for r in ARC_AI2]
    ai2 = read_task('arc_easy', str(write_jsonl(tmp_path / 'ai2.jsonl', ARC_AI2)), None)
    hub = read_task('arc_easy', str(write_jsonl(tmp_path / 'hub.jsonl', rows)), None)
    assert ai2 == hub
    assert ai2[0].context == ('Question: An astronomer observes that a planet rotates faster after a meteorite '
                              'impact. Which is the most likely effect of this increase in rotation?\nAnswer:')
    assert ai2[0].continuations[2] == ' Planetary days will become shorter.' and ai2[0].label == 2
    assert len(ai2[1].continuations) == 3 and ai2[1].label == 0  # numeric labels, three choices


def test_mmlu_reads_a_csv_a_folder_or_the_release_tar_with_the_zero_shot_prompt(tmp_path):
    folder = tmp_path / 'data' / 'test'
    folder.mkdir(parents=True)
    write_mmlu_csv(folder / 'abstract_algebra_test.csv', MMLU_ROWS)
    write_mmlu_csv(folder / 'zoology_test.csv', MMLU_ROWS[:1])
    with tarfile.open(tmp_path / 'data.tar', 'w') as tar:
        tar.add(tmp_path / 'data', arcname='data')
    single = read_task('mmlu', str(folder / 'abstract_algebra_test.csv'), None)
    assert single[0].context == ('The following are multiple choice questions (with answers) about abstract '
                                 'algebra.\n\nFind the degree of the field extension Q(sqrt(2)) over Q.\n'
                                 'A. 0\nB. 2\nC. 4\nD. 6\nAnswer:')
    assert single[0].continuations == [' A', ' B', ' C', ' D'] and [e.label for e in single] == [1, 0]
    from_folder = read_task('mmlu', str(folder), None)
    assert from_folder == read_task('mmlu', str(tmp_path / 'data.tar'), None)
    assert len(from_folder) == 3 and 'about zoology.' in from_folder[2].context


def test_task_limit_takes_examples_spread_over_the_file(tmp_path):
    records = [dict(HELLASWAG[0], ind=i, activity_label=f'Activity {i}') for i in range(10)]
    examples = read_task('hellaswag', str(write_jsonl(tmp_path / 'h.jsonl', records)), 4)
    assert [e.context.split(':')[0] for e in examples] == ['Activity 0', 'Activity 2', 'Activity 5', 'Activity 7']


def log_likelihood_token_by_token(model, context, continuation, skip_layers=()):
    """log P(continuation | context) as the sum over its tokens of the model's log-probability of each one, given
    all tokens before it: one forward pass per token, no batching, no padding."""
    total, ids = 0.0, list(context)
    with torch.no_grad():
        for token in continuation:
            logits, _ = model(torch.tensor([ids]), skip_layers=skip_layers)
            total += logits[0, -1].log_softmax(-1)[token].item()
            ids.append(token)
    return total


@pytest.mark.parametrize('skip_layers', [(), (2,)])
def test_scores_equal_log_likelihoods_computed_token_by_token(tmp_path, model, skip_layers):
    examples = read_task('hellaswag', str(write_jsonl(tmp_path / 'h.jsonl', HELLASWAG)), None)
    requests = task_requests(examples, loaded(model), 'hellaswag', model.config.block_size)
    # batches of 3 mix lengths, so padding is exercised
    scores = choice_loglikelihoods(model, requests, 3, torch.device('cpu'), nullcontext(), skip_layers)
    encode = hf.char_encode(CHARS, 'tiny')
    expected = [log_likelihood_token_by_token(model, encode(e.context), encode(c), skip_layers)
                for e in examples for c in e.continuations]
    assert scores == pytest.approx(expected, abs=1e-4)


def test_long_examples_keep_the_last_block_size_tokens(model):
    context, continuation = 'x' * 300, ' the end'
    (ids, count), = task_requests([Example(context, [continuation], 0)], loaded(model), 'hellaswag', 128)
    assert len(ids) == 129 and count == len(continuation)
    assert ids == hf.char_encode(CHARS, 'tiny')(context + continuation)[-129:]


def test_acc_takes_the_largest_sum_and_acc_norm_the_largest_sum_per_byte():
    examples = [Example('q', [' a', ' bbbbbbb'], 1),    # sums favour ' a'; per byte (2 vs 8 bytes) ' bbbbbbb'
                Example('q', [' a', ' bbbbbbb'], 0),
                Example('q', [' é', ' e', ' f'], 0)]    # ' é' is 3 bytes (2 characters): -2.4/3 beats -1.8/2
    scores = [-2.0, -7.0, -2.0, -7.0, -2.4, -1.8, -5.0]
    result = accuracies(examples, scores)
    acc, acc_norm = [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]
    assert result['acc'] == pytest.approx(1 / 3) and result['acc_norm'] == pytest.approx(2 / 3)
    assert result['acc_stderr'] == pytest.approx(statistics.stdev(acc) / 3 ** 0.5)
    assert result['acc_norm_stderr'] == pytest.approx(statistics.stdev(acc_norm) / 3 ** 0.5)


def test_each_removed_block_gives_the_accuracy_of_a_model_built_without_it(tmp_path, model):
    records = [dict(HELLASWAG[i % 3], ind=i, label=i % 4) for i in range(8)]
    examples = read_task('hellaswag', str(write_jsonl(tmp_path / 'h.jsonl', records)), None)
    requests = task_requests(examples, loaded(model), 'hellaswag', model.config.block_size)
    cpu = torch.device('cpu')
    result = evaluate_task(model, 'hellaswag', examples, requests, 4, cpu, nullcontext(), progress=False)
    full_scores = choice_loglikelihoods(model, requests, 4, cpu, nullcontext())
    assert {k: result[k] for k in ('acc', 'acc_norm')} == {k: accuracies(examples, full_scores)[k]
                                                           for k in ('acc', 'acc_norm')}
    assert result['chance'] == 0.25 and result['examples'] == 8
    for l in range(1, 4):
        without = copy.deepcopy(model)
        del without.blocks[l - 1]  # the other blocks keep their own depth and 1/sqrt(l)
        scores = choice_loglikelihoods(without, requests, 4, cpu, nullcontext())
        assert scores != pytest.approx(full_scores, abs=1e-3)  # removing a block changes the scores
        layer = result['layers'][l - 1]
        assert (layer['acc'], layer['acc_norm']) == (accuracies(examples, scores)['acc'],
                                                     accuracies(examples, scores)['acc_norm'])
        assert layer['acc_drop'] == pytest.approx(result['acc'] - layer['acc'])


def test_command_line_prints_json_and_plots_accuracy_per_removed_block(tmp_path, model, capsys):
    run = save_checkpoint(model, tmp_path / 'lns')
    task_file = write_jsonl(tmp_path / 'arc.jsonl', ARC_AI2 * 3)
    json_path, plots = tmp_path / 'tasks.json', tmp_path / 'plots'
    assert eval_layers.main([run, '--task', 'arc_easy', '--task_file', str(task_file), '--task_limit', '4',
                             '--device', 'cpu', '--json', str(json_path), '--plot', str(plots)]) == 0
    out = capsys.readouterr().out
    assert 'arc_easy on 4 examples' in out and 'acc_norm' in out and '[1] lns:' in out
    task = json.loads(json_path.read_text())['models'][0]['task']
    assert task['examples'] == 4 and [layer['block'] for layer in task['layers']] == [1, 2, 3]
    assert 'base_loss' not in json.loads(json_path.read_text())['models'][0]  # no --data or --text: tasks only
    assert (plots / 'arc_easy_accuracy.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_paged_rows_are_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    rows = [{'id': f'q{i}', 'question': 'Which?', 'choices': {'text': ['yes', 'no'], 'label': ['A', 'B']},
             'answerKey': 'A'} for i in range(130)]
    requested = []

    def fake_urlopen(url, timeout):
        requested.append(url)
        offset = int(url.split('offset=')[1].split('&')[0])
        page = {'rows': [{'row_idx': i, 'row': rows[i]} for i in range(offset, min(offset + 100, 130))],
                'num_rows_total': 130}
        return io.BytesIO(json.dumps(page).encode())

    monkeypatch.setattr(tasks, 'TASK_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(tasks.urllib.request, 'urlopen', fake_urlopen)
    examples = read_task('arc_easy', None, None)
    assert len(examples) == 130 and len(requested) == 2 and 'config=ARC-Easy' in requested[0]
    assert sorted(os.listdir(tmp_path / 'cache')) == ['arc_easy_test.jsonl']
    assert len(read_task('arc_easy', None, None)) == 130 and len(requested) == 2  # read from the cache


def test_a_failed_download_ends_in_one_sentence_naming_task_file(tmp_path, monkeypatch, capsys, model):
    def offline(url, timeout):
        raise OSError('network is unreachable')

    monkeypatch.setattr(tasks, 'TASK_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(tasks.urllib.request, 'urlopen', offline)
    assert eval_layers.main([save_checkpoint(model, tmp_path / 'run'), '--task', 'hellaswag', '--device', 'cpu']) == 1
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(error_lines) == 1 and 'could not download hellaswag' in err and '--task_file' in err, err
    assert not os.path.exists(tmp_path / 'cache' / 'hellaswag_val.jsonl')


@pytest.mark.parametrize('task, content, words', [
    ('hellaswag', '{"ctx_a": "no endings"}\n', ['line 1', 'not a hellaswag example', 'KeyError']),
    ('hellaswag', json.dumps(dict(HELLASWAG[0], label=7)) + '\n', ['line 1', 'label 7 of 4 choices']),
    ('arc_easy', 'not json\n', ['line 1', 'not a arc_easy example']),
    ('mmlu', 'question,a,b,c,d,E\n', ['row 1', 'not an MMLU question']),
])
def test_files_not_in_the_benchmarks_format_end_in_one_sentence(tmp_path, capsys, model, task, content, words):
    (tmp_path / 'task.txt').write_text(content)
    args = [save_checkpoint(model, tmp_path / 'run'), '--task', task, '--task_file', str(tmp_path / 'task.txt')]
    assert eval_layers.main(args + ['--device', 'cpu']) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and all(w in err for w in words), err


def test_a_character_model_is_refused_text_with_characters_it_never_saw(tmp_path, capsys):
    torch.manual_seed(0)
    letters = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=64, vocab_size=27))
    os.makedirs(tmp_path / 'run')
    torch.save({'model': letters.state_dict(), 'model_config': letters.config.to_dict(),
                'data_meta': {'tokenizer': 'char', 'vocab_size': 27, 'chars': ' abcdefghijklmnopqrstuvwxyz'}},
               tmp_path / 'run' / 'ckpt.pt')
    task_file = write_jsonl(tmp_path / 'h.jsonl', HELLASWAG)
    assert eval_layers.main([str(tmp_path / 'run'), '--task', 'hellaswag', '--task_file', str(task_file),
                             '--device', 'cpu']) == 1
    err = capsys.readouterr().err
    assert 'hellaswag example 1' in err and 'never saw in training' in err and err.count('\n') == 1, err
