"""
What the experiment scripts share: launching train.py runs in a pool of jobs (finished runs skipped, so a study
can span sessions), reading their logs, telling a finished run from a diverged one, eval_layers.py on a pair of
runs, and the mean and spread of a set of losses.
"""

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_SCRIPT = os.path.join(ROOT, 'train.py')
EVAL_LAYERS_SCRIPT = os.path.join(ROOT, 'eval_layers.py')
DIVERGED_STATUS = 3  # train.py's exit status for a non-finite loss; it also logs {"iter": N, "diverged": split}


class RunFailed(Exception):
    """A run that ended for a reason other than divergence: a setting train.py rejects, a crash."""


def read_log(folder):
    """The records of folder/log.jsonl ([] when there is none)."""
    path = os.path.join(folder, 'log.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def outcome(folder, steps):
    """'finished' when the log holds the validation loss at iteration `steps`, 'diverged' when it records a
    divergence, None for a run not started or interrupted."""
    records = read_log(folder)
    if any('diverged' in r for r in records):
        return 'diverged'
    if any(r['iter'] == steps and 'val_loss' in r for r in records):
        return 'finished'
    return None


def final_val_loss(folder):
    """The last logged validation loss, or NaN for a diverged run."""
    records = read_log(folder)
    if any('diverged' in r for r in records):
        return float('nan')
    return [r['val_loss'] for r in records if 'val_loss' in r][-1]


def run_device(folder):
    """The device a run trained on, as train.py's start-up line in folder/train.out names it ('cpu', 'NVIDIA
    H200', ...); None without that file."""
    path = os.path.join(folder, 'train.out')
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                match = re.match(r'\d+ process\(es\)(?:, DDP over \w+)? on (.+?) \(peak', line)
                if match:
                    return match.group(1)
    return None


def run_devices(runs):
    """The devices the logged runs in the folder `runs` trained on, sorted ('None': a run without train.out)."""
    return sorted({str(run_device(os.path.join(runs, name))) for name in os.listdir(runs)
                   if read_log(os.path.join(runs, name))})


def val_curve(folder):
    return [(r['iter'], r['val_loss']) for r in read_log(folder) if 'val_loss' in r]


def threads_per_job(jobs, threads=None):
    """The threads each job gets: `threads` when given, else the machine's cores shared out among the jobs."""
    return threads or max(1, (os.cpu_count() or 2) // jobs)


def require_prepared_data(data_dir):
    if not os.path.exists(os.path.join(data_dir, 'val.bin')):
        sys.exit(f"error: no prepared data in {data_dir}; run: python data/shakespeare_char/prepare.py")


def train(folder, arguments, steps, threads):
    """Runs train.py with `arguments` (a config file and --key=value strings) into `folder`, unless that run has
    finished or diverged already. Returns its outcome; RunFailed for any other ending."""
    state = outcome(folder, steps)
    if state:
        return state
    if os.path.exists(folder):
        shutil.rmtree(folder)  # an interrupted run starts again: its log would mix with the new one's
    os.makedirs(folder)
    command = [sys.executable, TRAIN_SCRIPT, *arguments, f'--out_dir={folder}']
    output = os.path.join(folder, 'train.out')
    with open(output, 'w') as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, 'OMP_NUM_THREADS': str(threads)}).returncode
    state = outcome(folder, steps)
    if (status, state) in ((0, 'finished'), (DIVERGED_STATUS, 'diverged')):
        return state
    with open(output) as f:
        lines = f.read().strip().splitlines()
    raise RunFailed(f"{' '.join(command)} ended with status {status}"
                    f"{'' if state else ', without its final record'}: {lines[-1] if lines else 'no output'}")


def run_all(tasks, jobs):
    """Runs every task (a function of no arguments) in a pool of `jobs` threads, all of them even when some fail;
    returns the messages of the RunFailed ones."""
    def attempt(task):
        try:
            task()
        except RunFailed as error:
            print(f"failed: {error}", flush=True)
            return str(error)
    with ThreadPoolExecutor(jobs) as pool:
        return [message for message in pool.map(attempt, tasks) if message]


def run_plan(plan, run, jobs, label):
    """Runs the jobs plan() returns, each as run(*job), `jobs` at a time, planning again after each batch until it
    plans none; returns the failed runs' messages (a failure ends it: the plan would ask for the same runs)."""
    while True:
        planned = plan()
        if not planned:
            return []
        print(f"== {label}: {len(planned)} run(s)", flush=True)
        failed = run_all([lambda job=job: run(*job) for job in planned], jobs)
        if failed:
            return failed


def analyze_layers(folders, data_dir, depth, json_path, plot_dir, threads, device='cpu', tokens=16384):
    """eval_layers.py on the checkpoints in `folders`: layer drop, angular distance and variance per block, on the
    first `tokens` of data_dir's validation split (figures into plot_dir, unless it is None)."""
    command = [sys.executable, EVAL_LAYERS_SCRIPT, *folders, '--data', data_dir, '--tokens', str(tokens),
               '--block_size', '64', '--max_distance', str(depth), '--device', device, '--json', json_path,
               *(['--plot', plot_dir] if plot_dir else [])]
    result = subprocess.run(command, env={**os.environ, 'OMP_NUM_THREADS': str(threads)},
                            capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise RunFailed(f"{' '.join(command)} ended with status {result.returncode}: "
                        f"{lines[-1] if lines else 'no output'}")


def spread(values):
    """Mean and sample standard deviation of the finite values, their count, and how many were not finite."""
    finite = [v for v in values if math.isfinite(v)]
    return {'mean': statistics.mean(finite) if finite else None,
            'std': statistics.stdev(finite) if len(finite) > 1 else None,
            'n': len(finite), 'diverged': len(values) - len(finite)}


# Student's t: the 97.5% quantile by degrees of freedom (two-sided 95% intervals over up to 31 paired seeds)
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(differences):
    """The 95% t-interval of the mean of paired differences, [low, high]; None for fewer than 2."""
    n = len(differences)
    if n < 2:
        return None
    half = T_975[n - 2] * statistics.stdev(differences) / math.sqrt(n)
    mean = statistics.mean(differences)
    return [mean - half, mean + half]


def sign_test(differences):
    """The exact two-sided sign test of paired differences (zeros left out): (positive, negative, p)."""
    positive, negative = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    n, k = positive + negative, min(positive, negative)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return positive, negative, p


def interval(values):
    return f"[{values[0]:+.4f}, {values[1]:+.4f}]" if values else "(one seed: no interval)"


# ----------------------------------------------------------------------------- layer profiles (eval_layers.py's)

def read_layers(path):
    """The per-block records of a one-run layer analysis (eval_layers.py's JSON)."""
    with open(path) as f:
        return json.load(f)['models'][0]['layers']


def deep_half_share(loss_drops):
    """The share of the whole layer-drop damage (the loss increases with each block removed) that the deepest half
    of the blocks carry."""
    return sum(loss_drops[len(loss_drops) // 2:]) / sum(loss_drops)


def layer_profiles(at_best, modes, tokens):
    """Per scheme, from the layer analyses of its runs at its best rate (at_best: {scheme: (rate, {seed: the
    eval_layers.py JSON of that run})}, those that exist): per block the loss increase with the block removed, the
    angular distance between its input and output and the residual variance after it (mean and t-interval over
    seeds); and the share of the whole layer-drop damage that the deepest half of the blocks carry, per seed, with
    each LNS mode's share minus Pre-LN's paired by seed."""
    profiles = {}
    for scheme, (best, paths) in at_best.items():
        layers = {seed: read_layers(path) for seed, path in paths.items() if os.path.exists(path)}
        if not layers:
            continue
        profile = {'learning_rate': best, 'seeds': sorted(layers)}
        for key in ('loss_drop', 'angular_distance_next', 'variance'):
            per_block = list(zip(*([layer[key] for layer in blocks] for blocks in layers.values())))
            profile[key] = {'mean': [statistics.mean(values) for values in per_block],
                            't_95': [t_interval(list(values)) for values in per_block]}
        drops = {seed: [layer['loss_drop'] for layer in blocks] for seed, blocks in layers.items()}
        profile['deep_half_share'] = {str(seed): deep_half_share(d) for seed, d in drops.items()}
        profiles[scheme] = profile
    shares = {}
    for mode in modes:
        if {'pre', mode} <= set(profiles):
            pre, lns = profiles['pre']['deep_half_share'], profiles[mode]['deep_half_share']
            differences = [lns[seed] - pre[seed] for seed in sorted(set(pre) & set(lns))]
            if differences:
                positive, negative, p = sign_test(differences)
                shares[mode] = {'seeds': len(differences), 'by_seed': differences,
                                'mean': statistics.mean(differences), 't_95': t_interval(differences),
                                'lns_higher_in': positive, 'pre_higher_in': negative, 'sign_test_p': p}
    return {'tokens': tokens, 'schemes': profiles, 'deep_half_share_lns_minus_pre': shares}


def layer_findings(label, layers):
    """The lines a study prints about layer_profiles' result, each starting with label."""
    lines = []
    for scheme, profile in layers['schemes'].items():
        shares = list(profile['deep_half_share'].values())
        lines.append(f"{label}, {scheme} at {profile['learning_rate']:g}: the deepest half of the blocks carry "
                     f"{statistics.mean(shares):.1%} of the layer-drop damage (mean of {len(shares)} seed(s); "
                     f"the first {layers['tokens']:,} validation tokens)")
    for mode, d in layers['deep_half_share_lns_minus_pre'].items():
        lines.append(f"{label}, deep-half share of the layer-drop damage, {mode} - pre: {d['mean']:+.3f} over "
                     f"{d['seeds']} paired seed(s), t 95% {interval(d['t_95'])}; {mode} higher in "
                     f"{d['lns_higher_in']}, pre higher in {d['pre_higher_in']} (sign test p = "
                     f"{d['sign_test_p']:.3g})")
    return lines


LAYER_COLORS = {'pre': 'tab:blue', 'lns': 'tab:orange', 'lns_gain': 'tab:red'}


def plot_layer_drop(panels, path):
    """One panel per {title: layer_profiles' schemes}: each scheme's layer-drop profile, the seed mean with its
    t-interval as a band."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, (title, profiles) in zip(axes[0], panels.items()):
        for scheme, profile in profiles.items():
            drop = profile['loss_drop']
            blocks = range(1, len(drop['mean']) + 1)
            ax.plot(blocks, drop['mean'], color=LAYER_COLORS[scheme], marker='o',
                    label=f"{scheme} at {profile['learning_rate']:g} ({len(profile['seeds'])} seeds)")
            if all(drop['t_95']):
                ax.fill_between(blocks, *zip(*drop['t_95']), color=LAYER_COLORS[scheme], alpha=0.2)
        ax.axhline(0, color='black', linewidth=0.8)
        ax.set(yscale='symlog', xlabel='block removed', ylabel='loss increase, block removed (nats; band: t 95%)',
               title=f"{title}, each scheme at its best rate")
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path, data):
    """Written to a temporary file of this process and renamed: a reader never sees half a file, and studies
    running side by side (experiments/recipe_study_gpu.sh) never share the temporary file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f'{path}.{os.getpid()}.tmp'
    with open(temporary, 'w') as f:
        json.dump(data, f, indent=1)
    os.replace(temporary, path)


def pyplot():
    """matplotlib's pyplot drawing to files only (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt
