"""
Nearer the paper's regime: does Pre-LN's lead over LNS (the tuned study) come from training three times over a
small corpus, and does it shrink with width? 12 blocks, the tuned study's recipe (beta2 0.999, 1,500 steps of
32 x 64 characters, warmup and cosine as there), on the mixed character corpus (data/mixed_char/prepare.py):

    arm A: width 64 on a 1M-character slice of its training split   (about 3 passes over the data)
    arm B: width 64 on all of it                                      (under one pass)
    arm C: width 128 on all of it

Every arm is scored on the same validation tokens: 2,048 windows evenly spaced over the corpus's validation split
(train.py's fixed evaluation set).

    python data/mixed_char/prepare.py --input ../shared/data          # or without --input: downloads the texts
    python data/mixed_char/prepare.py --input ../shared/data --train_chars 1000000 --out_dir data/mixed_char_1m
    nohup python experiments/regime_study.py --jobs 2 > experiments/runs/regime_study.out 2>&1 &
    python experiments/regime_study.py --no_train      # the report and figure from the runs finished so far

The rule, arm by arm: every (rate, scheme) cell is screened with seed 0 (the grid grows past an edge where a
scheme's best rate sits on it, as in the tuned study); then seeds 1-4 at each scheme's best rate. A run is finished
when its log holds the final validation loss or a divergence; finished runs are skipped.

Reports, per arm: the passes over the training data, each scheme's best rate and its loss (mean of 5 seeds), the
gap of each LNS mode to Pre-LN at their best rates paired by seed with a 95% t-interval and a sign test, the same
gap over seeds 1-4 alone (held out: the rates were chosen on seed 0), and each scheme's validation-minus-training
loss at the end; across arms, the gap's change from A to B (repetition) and from B to C (width), paired by seed.
eval_layers.py measures each run as it finishes (and, once an arm is complete, any run at a best rate or seed-0
screen run still unmeasured) on the first LAYER_TOKENS of the validation split: per block the loss increase with the
block removed (its neighbours keep their own 1/sqrt(l)), the angular distance between its input and output, the
residual variance after it. Reported per scheme as means with t-intervals over seeds, and as the share of the whole
layer-drop damage that the deepest half of the blocks carry, LNS minus Pre-LN paired by seed: do LNS's deep blocks
matter more, at each scheme's own best? And with seed 0 at every screened rate, LNS minus Pre-LN in loss and in
that share: does the answer hold at the rates where LNS's loss is the lower?
Writes experiments/results/regime_study.json (the layer analyses, one file per run, under
results/regime_layers/, kept for clones without checkpoints) and experiments/figures/regime_study.png and
regime_layers.png; runs go to experiments/runs/regime_study/, whose logs and train.out are committed.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import recipe_study
import tuned_study
from training_runs import (HERE, ROOT, RunFailed, analyze_layers, deep_half_share, final_val_loss, interval,
                           layer_findings, layer_profiles, outcome, plot_layer_drop, pyplot, read_layers, read_log,
                           run_all, run_devices, run_plan, sign_test, t_interval, threads_per_job, train, write_json)

DEPTH, STEPS, SEQUENCES, BLOCK = 12, 1500, 32, 64
EVAL_SEQUENCES = 2048  # windows of 64 characters: 131,072 of the validation split's 525,766
# arm -> (width, data folder under data/, schemes)
ARMS = {'A': (64, 'mixed_char_1m', ('pre', 'lns')),
        'B': (64, 'mixed_char', ('pre', 'lns', 'lns_gain')),
        'C': (128, 'mixed_char', ('pre', 'lns')),
        'B256': (256, 'mixed_char', ('pre', 'lns')),  # the GPU arms (experiments/regime_study_gpu.sh)
        'B512': (512, 'mixed_char', ('pre', 'lns'))}
CPU_ARMS = ('A', 'B', 'C')
# the GPU arms train every rate of a fixed grid with seeds 0-2 (no screen): the cells fit one lent GPU's call
GRID_ARMS, GRID_SEEDS = {'B256': (3e-4, 1e-3, 3e-3), 'B512': (3e-4, 1e-3, 3e-3)}, 3
LEARNING_RATES = (1e-3, 2e-3, 3e-3, 5e-3, 1e-2)  # around the tuned study's 12-block bests (pre 2e-3, lns 5e-3)
SEEDS = 5
LAYER_TOKENS = 65536  # the layer analyses' tokens: the first of the validation split, the same for every run
CONTRASTS = (('A', 'B', 'repetition: 3 passes (A) against under one (B)'), ('B', 'C', 'width: 64 (B) against 128 (C)'),
             ('B', 'B256', 'width: 64 (B) against 256'), ('B', 'B512', 'width: 64 (B) against 512'))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arms', nargs='+', default=list(CPU_ARMS), choices=list(ARMS),
                        help='in the order they run (B256 and B512: the GPU arms)')
    parser.add_argument('--learning_rates', type=float, nargs='+', default=list(LEARNING_RATES),
                        help='the grid to screen (grown past an edge where a best sits on it)')
    parser.add_argument('--steps', type=int, default=STEPS)
    parser.add_argument('--jobs', type=int, default=1, help='runs at a time')
    parser.add_argument('--threads', type=int, default=None, help='threads per run (default: cores / jobs)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--compile', type=lambda s: {'true': True, 'false': False}[s.lower()], default=True)
    parser.add_argument('--no_train', action='store_true', help='only report the finished runs')
    parser.add_argument('--data', default=os.path.join(ROOT, 'data'), help='the folder of the prepared datasets')
    parser.add_argument('--runs', default=os.path.join(HERE, 'runs', 'regime_study'))
    parser.add_argument('--results', default=os.path.join(HERE, 'results'))
    parser.add_argument('--figures', default=os.path.join(HERE, 'figures'))
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- runs

def run_dir(args, arm, learning_rate, scheme, seed):
    return os.path.join(args.runs, f'{arm}_lr{learning_rate:g}_{scheme}_s{seed}')


def trainer_arguments(args, arm, learning_rate, scheme, seed):
    width, data, _ = ARMS[arm]
    return [recipe_study.BASE_CONFIG, f'--n_layer={DEPTH}', f'--n_embd={width}',
            f'--n_head={width // recipe_study.HEAD_SIZE}', *tuned_study.SCHEMES[scheme], f'--beta2={tuned_study.BETA2}',
            f'--learning_rate={learning_rate:g}', f'--min_lr={learning_rate / 10:g}', f'--max_iters={args.steps}',
            f'--warmup_iters={args.steps // 10}', f'--eval_interval={args.steps // 3}',
            f'--log_interval={args.steps // 10}', f'--eval_sequences={EVAL_SEQUENCES}', f'--seed={seed}',
            f'--batch_size={SEQUENCES}', f'--block_size={BLOCK}', f'--data_dir={os.path.join(args.data, data)}',
            f'--device={args.device}', '--tf32=False', f'--compile={args.compile}']


def final_record(folder):
    """The last evaluation's record (train_loss, val_loss, ...) of a finished run."""
    return [r for r in read_log(folder) if 'val_loss' in r][-1]


def losses(args, arm):
    """{scheme: {learning_rate: {seed: final validation loss}}} of an arm's finished runs (inf: diverged)."""
    found = {scheme: {} for scheme in ARMS[arm][2]}
    for name in sorted(os.listdir(args.runs)) if os.path.isdir(args.runs) else []:
        if not name.startswith(f'{arm}_lr'):
            continue
        rate, rest = name[len(f'{arm}_lr'):].split('_', 1)  # run_dir's name: <arm>_lr<rate>_<scheme>_s<seed>
        scheme, seed = rest.rsplit('_s', 1)
        rate, seed = float(rate), int(seed)
        if scheme in found and outcome(run_dir(args, arm, rate, scheme, seed), args.steps):
            loss = final_val_loss(run_dir(args, arm, rate, scheme, seed))
            found[scheme].setdefault(rate, {})[seed] = loss if math.isfinite(loss) else math.inf
    return found


def plan(args, arm):
    """The runs to do next in an arm: its screen (grown at an edge), else the seeds at each scheme's best rate; in a
    GPU arm, every rate of its grid with seeds 0-2."""
    arm_losses = losses(args, arm)
    if arm in GRID_ARMS:
        return [(arm, rate, scheme, seed) for seed in range(GRID_SEEDS) for rate in GRID_ARMS[arm]
                for scheme in arm_losses if seed not in arm_losses[scheme].get(rate, {})]
    rates = tuned_study.grid(arm_losses, args.learning_rates)
    screen = [(arm, rate, scheme, 0) for rate in rates for scheme in arm_losses
              if 0 not in arm_losses[scheme].get(rate, {})]
    if screen:
        return screen
    return [(arm, best, scheme, seed) for seed in range(1, SEEDS) for scheme, by_rate in arm_losses.items()
            for best in [tuned_study.best_rate(by_rate)] if seed not in by_rate[best]]


def run_one(args, threads, arm, rate, scheme, seed):
    """Trains a run, then measures its layers while its checkpoint is here (the checkpoints are not committed, and
    any run may turn out to sit at a best rate)."""
    start = time.time()
    folder = run_dir(args, arm, rate, scheme, seed)
    state = train(folder, trainer_arguments(args, arm, rate, scheme, seed), args.steps, threads)
    print(f"{state}: arm {arm}, lr {rate:g}, {scheme}, seed {seed} ({time.time() - start:.0f} s)", flush=True)
    if state == 'finished' and not os.path.exists(layers_path(args, os.path.basename(folder))):
        analyze_run(args, threads, os.path.basename(folder))


def study(args, threads):
    """Arm by arm, the screen then the seeds at each best, until nothing is left to run, then the layer analyses of
    the runs still unmeasured (unmeasured_runs); returns the failed runs."""
    failures = []
    for arm in args.arms:
        failed = run_plan(lambda: plan(args, arm), lambda *job: run_one(args, threads, *job), args.jobs, f'arm {arm}')
        failures += failed
        if not failed:  # every run of the arm has finished
            failures += run_all([lambda run=run: analyze_run(args, threads, run) for run in unmeasured_runs(args, arm)],
                                args.jobs)
    return failures


def unmeasured_runs(args, arm):
    """The runs without a layer analysis that the report reads: every run at a best rate (an error when its
    checkpoint is gone), and the screen's seed-0 runs whose checkpoints are here (runs trained before the study
    measured each one as it finished)."""
    screen = [run_dir(args, arm, rate, scheme, 0) for scheme, by_rate in losses(args, arm).items()
              for rate, seeds in sorted(by_rate.items()) if math.isfinite(seeds.get(0, math.inf))]
    screen = [os.path.basename(folder) for folder in screen if os.path.exists(os.path.join(folder, 'ckpt.pt'))]
    return [run for run in dict.fromkeys(best_runs(args, arm) + screen) if not os.path.exists(layers_path(args, run))]


def best_runs(args, arm):
    """The finished runs at each scheme's best rate, by folder name."""
    arm_losses = losses(args, arm)
    return [os.path.basename(run_dir(args, arm, best, scheme, seed)) for scheme, by_rate in arm_losses.items()
            for best in [tuned_study.best_rate(by_rate)] if best is not None for seed in sorted(by_rate[best])
            if math.isfinite(by_rate[best][seed])]


def layers_path(args, run):
    """A run's layer analysis, committed: a clone without the checkpoints keeps it."""
    return os.path.join(args.results, 'regime_layers', f'{run}.json')


def analyze_run(args, threads, run):
    folder = os.path.join(args.runs, run)
    if not os.path.exists(os.path.join(folder, 'ckpt.pt')):
        raise RunFailed(f"no checkpoint in {folder} for its layer analysis (train it again to measure it)")
    arm = run.split('_', 1)[0]
    os.makedirs(os.path.dirname(layers_path(args, run)), exist_ok=True)
    analyze_layers([folder], os.path.join(args.data, ARMS[arm][1]), 1, layers_path(args, run), None, threads,
                   args.device, tokens=LAYER_TOKENS)
    print(f"layer analysis: {run}", flush=True)


# ----------------------------------------------------------------------------- report

def passes(args, arm):
    """Training characters read over the run, divided by the characters of the arm's training split."""
    meta_dir = os.path.join(args.data, ARMS[arm][1])
    with open(os.path.join(meta_dir, 'meta.json')) as f:
        train_chars = sum(source['train'] for source in json.load(f)['sources'].values())
    return args.steps * SEQUENCES * BLOCK / train_chars


def paired(by_seed_lns, by_seed_pre, seeds=None):
    """The paired differences lns - pre over the seeds both have (or those of `seeds`), with their t-interval and
    sign test."""
    common = sorted(set(by_seed_lns) & set(by_seed_pre) & (set(seeds) if seeds else set(by_seed_lns)))
    differences = [by_seed_lns[s] - by_seed_pre[s] for s in common]
    if not differences:
        return None
    positive, negative, p = sign_test(differences)
    return {'seeds': common, 'by_seed': differences, 'mean': statistics.mean(differences),
            't_95': t_interval(differences), 'lns_lower_in': negative, 'pre_lower_in': positive, 'sign_test_p': p}


def arm_report(args, arm):
    arm_losses = losses(args, arm)
    report = {'arm': arm, 'width': ARMS[arm][0], 'data': ARMS[arm][1], 'passes': passes(args, arm), 'schemes': {},
              'gap': {}, 'held_out_gap': {}}
    for scheme, by_rate in arm_losses.items():
        best = tuned_study.best_rate(by_rate)
        if best is None:
            continue
        records = {seed: final_record(run_dir(args, arm, best, scheme, seed)) for seed in by_rate[best]
                   if math.isfinite(by_rate[best][seed])}
        report['schemes'][scheme] = {
            'best_learning_rate': best, 'best_loss': statistics.mean(by_rate[best].values()),
            'seeds_at_best': len(by_rate[best]), 'best_by_seed': {str(s): v for s, v in by_rate[best].items()},
            'val_minus_train': statistics.mean(r['val_loss'] - r['train_loss'] for r in records.values())
            if records else None,
            'screen': {f'{rate:g}': seeds[0] for rate, seeds in sorted(by_rate.items()) if 0 in seeds}}
    for mode in ARMS[arm][2][1:]:
        if {'pre', mode} <= set(report['schemes']):
            at_best = {scheme: arm_losses[scheme][report['schemes'][scheme]['best_learning_rate']]
                       for scheme in ('pre', mode)}
            report['gap'][mode] = paired(at_best[mode], at_best['pre'])
            report['held_out_gap'][mode] = paired(at_best[mode], at_best['pre'], seeds=range(1, SEEDS))
    report['layers'] = layer_report(args, arm, arm_losses)
    report['screen_layers'] = screen_layers(args, arm, arm_losses)
    return report


def layer_report(args, arm, arm_losses):
    """The layer profiles of each scheme's runs at its best rate (training_runs.layer_profiles), from the committed
    layer analyses."""
    at_best = {}
    for scheme, by_rate in arm_losses.items():
        best = tuned_study.best_rate(by_rate)
        at_best[scheme] = (best, {seed: layers_path(args, os.path.basename(run_dir(args, arm, best, scheme, seed)))
                                  for seed in sorted(by_rate.get(best, {}))})
    return layer_profiles(at_best, ARMS[arm][2][1:], LAYER_TOKENS)


def screen_layers(args, arm, arm_losses):
    """Seed 0 at every screened rate where Pre-LN and an LNS mode both trained to the end and were measured:
    {mode: {rate: the loss and the deep-half share of the layer-drop damage, mode minus Pre-LN}}. Whether the
    deep blocks' share moves with the loss: does it hold at the rates where LNS's loss is the lower?"""
    rows = {}
    for mode in ARMS[arm][2][1:]:
        for rate in sorted(set(arm_losses['pre']) & set(arm_losses.get(mode, {}))):
            schemes = ('pre', mode)
            loss = [arm_losses[scheme][rate].get(0, math.inf) for scheme in schemes]
            paths = [layers_path(args, os.path.basename(run_dir(args, arm, rate, scheme, 0))) for scheme in schemes]
            if not all(map(math.isfinite, loss)) or not all(map(os.path.exists, paths)):
                continue
            share = [deep_half_share([layer['loss_drop'] for layer in read_layers(path)]) for path in paths]
            rows.setdefault(mode, {})[f'{rate:g}'] = {'loss': loss[1] - loss[0], 'deep_half_share': share[1] - share[0]}
    return rows


def contrast(reports, first, second):
    """The change of the lns - pre gap from arm `first` to arm `second`, paired by seed (both arms score the same
    validation tokens): (second's gap - first's gap) per seed, with its t-interval."""
    gaps = [reports.get(arm, {}).get('gap', {}).get('lns') for arm in (first, second)]
    if None in gaps:
        return None
    by_seed = [dict(zip(gap['seeds'], gap['by_seed'])) for gap in gaps]
    seeds = sorted(set(by_seed[0]) & set(by_seed[1]))
    changes = [by_seed[1][s] - by_seed[0][s] for s in seeds]
    return {'seeds': seeds, 'by_seed': changes, 'mean': statistics.mean(changes) if changes else None,
            't_95': t_interval(changes)}


def findings(reports, contrasts):
    lines = []
    for arm, report in reports.items():
        lines.append(f"arm {arm} (width {report['width']}, {report['data']}): {report['passes']:.2f} passes over "
                     f"the training data")
        for scheme, s in report['schemes'].items():
            gap = f"{s['val_minus_train']:+.4f}" if s['val_minus_train'] is not None else 'unknown'
            lines.append(f"arm {arm}, {scheme}: best rate {s['best_learning_rate']:g} (seed 0's screen), loss "
                         f"{s['best_loss']:.4f} ({s['seeds_at_best']} seed(s)); validation minus training {gap}")
        for key, words in (('gap', 'at the best rates'), ('held_out_gap', 'held out (seeds 1-4)')):
            for mode, g in report[key].items():
                if g:
                    lines.append(f"arm {arm}, {mode} - pre {words}: {g['mean']:+.4f} over {len(g['seeds'])} paired "
                                 f"seed(s), t 95% {interval(g['t_95'])}; pre lower in {g['pre_lower_in']}, "
                                 f"{mode} lower in {g['lns_lower_in']} (sign test p = {g['sign_test_p']:.3g})")
        lines += layer_findings(f"arm {arm}", report['layers'])
        for mode, rows in report['screen_layers'].items():
            lower_loss = [rate for rate, row in rows.items() if row['loss'] < 0]
            lower_share = [rate for rate, row in rows.items() if row['deep_half_share'] < 0]
            lines.append(f"arm {arm}, seed 0 at each screened rate, {mode} - pre (loss, deep-half share): " +
                         ', '.join(f"{rate} ({row['loss']:+.4f}, {row['deep_half_share']:+.3f})"
                                   for rate, row in rows.items()) +
                         f"; {mode}'s share lower at {len(lower_share)} of {len(rows)} rates, "
                         f"{len(set(lower_share) & set(lower_loss))} of the {len(lower_loss)} where its loss is lower")
    for (first, second, words), c in zip(CONTRASTS, contrasts):
        if c and c['mean'] is not None:
            lines.append(f"{words}: the lns - pre gap changes by {c['mean']:+.4f} from arm {first} to arm "
                         f"{second} over {len(c['seeds'])} paired seed(s), t 95% {interval(c['t_95'])}")
    return lines


def plot(args, reports):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(reports), figsize=(4.5 * len(reports), 4), squeeze=False, sharey=True)
    colors = {'pre': 'tab:blue', 'lns': 'tab:orange', 'lns_gain': 'tab:red'}
    for ax, (arm, report) in zip(axes[0], reports.items()):
        for scheme, s in report['schemes'].items():
            rates = [float(rate) for rate in s['screen']]
            ax.plot(rates, list(s['screen'].values()), color=colors[scheme], marker='o', markerfacecolor='white',
                    label=f"{scheme} (seed 0)")
            values = list(s['best_by_seed'].values())
            ax.errorbar(s['best_learning_rate'], statistics.mean(values), color=colors[scheme], marker='o',
                        yerr=statistics.stdev(values) if len(values) > 1 else 0, capsize=3,
                        label=f"{scheme} at its best: {len(values)} seeds, std")
        ax.set(xscale='log', xlabel='peak learning rate', title=f"arm {arm}: width {report['width']}, "
               f"{report['passes']:.2f} passes", ylabel='final validation loss (nats per character)')
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(args.figures, exist_ok=True)
    path = os.path.join(args.figures, 'regime_study.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    measured = {arm: report['layers']['schemes'] for arm, report in reports.items() if report['layers']['schemes']}
    if not measured:
        return [path]
    layers_figure = os.path.join(args.figures, 'regime_layers.png')
    plot_layer_drop({f"arm {arm}": profiles for arm, profiles in measured.items()}, layers_figure)
    return [path, layers_figure]


def main(argv):
    args = parse_args(argv)
    for arm in args.arms:
        folder = os.path.join(args.data, ARMS[arm][1])
        if not os.path.exists(os.path.join(folder, 'val.bin')):
            sys.exit(f"error: arm {arm} needs {folder}, which is not prepared; run the prepare commands in "
                     f"python experiments/regime_study.py --help")
    failures = [] if args.no_train else study(args, threads_per_job(args.jobs, args.threads))
    reports = {arm: arm_report(args, arm) for arm in args.arms}
    reports = {arm: report for arm, report in reports.items() if report['schemes']}
    if not reports:
        sys.exit(f"error: no finished runs in {args.runs}; nothing written (train first: drop --no_train)")
    contrasts = [contrast(reports, first, second) for first, second, _ in CONTRASTS]
    lines = findings(reports, contrasts)
    devices = run_devices(args.runs)
    write_json(os.path.join(args.results, 'regime_study.json'), {
        'settings': {'depth': DEPTH, 'steps': args.steps, 'batch': [SEQUENCES, BLOCK], 'beta2': tuned_study.BETA2,
                     'eval_sequences': EVAL_SEQUENCES, 'arms': ARMS, 'schemes': tuned_study.SCHEMES,
                     'devices': devices},
        'findings': lines, 'arms': reports,
        'contrasts': {words: c for (_, _, words), c in zip(CONTRASTS, contrasts)}})
    print('\n'.join(lines))
    print(f"wrote {', '.join(plot(args, reports))}")
    if failures:
        sys.exit(f"error: {len(failures)} run(s) failed; the first: {failures[0]}")


if __name__ == '__main__':
    main(sys.argv[1:])
