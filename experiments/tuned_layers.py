"""
The paper's mechanism beside the tuned study's losses: at each scheme's own best rate (the tuned study's, chosen on
seed 0), do LNS's deep blocks matter more than Pre-LN's? For each depth, the runs of Pre-LN and LNS at their best
rates (five seeds each) are trained again with the study's own settings (their checkpoints are not committed) and
measured by eval_layers.py on the first LAYER_TOKENS of the validation split, the same tokens for every run: per
block the loss increase with the block removed (its neighbours keep their own 1/sqrt(l)), the angular distance
between its input and output, the residual variance after it.

    nohup python experiments/tuned_layers.py --jobs 2 > experiments/runs/tuned_layers.out 2>&1 &
    python experiments/tuned_layers.py --no_train       # the report and figure from the runs measured so far

Reports per depth and scheme the profiles (mean and t-interval over seeds) and the share of the whole layer-drop
damage that the deepest half of the blocks carry, LNS minus Pre-LN paired by seed with a t-interval and sign test.
Writes experiments/results/tuned_layers.json and experiments/figures/tuned_layers.png; each run's analysis is kept in
results/tuned_layers/ (committed, for clones without checkpoints), the retrained runs in runs/tuned_layers/ (their
logs and train.out committed). A run measured already is skipped, so the script can span sessions.
"""

import argparse
import math
import os
import statistics
import sys
import time

import tuned_study
from regime_study import LAYER_TOKENS  # the first validation tokens, the same for every run
from training_runs import (HERE, RunFailed, analyze_layers, layer_findings, layer_profiles, plot_layer_drop, read_log,
                           require_prepared_data, run_all, threads_per_job, train, write_json)

MODES = ('lns',)  # compared with pre; gain_init's best-rate runs are left unmeasured (15 more runs)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--depths', type=int, nargs='+', default=[6, 12, 24], help='in the order they run')
    parser.add_argument('--jobs', type=int, default=1, help='runs at a time')
    parser.add_argument('--threads', type=int, default=None, help='threads per run (default: cores / jobs)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--compile', type=lambda s: {'true': True, 'false': False}[s.lower()], default=True)
    parser.add_argument('--no_train', action='store_true', help='only report the runs measured so far')
    parser.add_argument('--study_runs', default=os.path.join(HERE, 'runs', 'tuned_study'),
                        help="the tuned study's runs, whose logs give each scheme's best rate and seeds")
    parser.add_argument('--runs', default=os.path.join(HERE, 'runs', 'tuned_layers'), help='the runs trained again')
    parser.add_argument('--results', default=os.path.join(HERE, 'results'))
    parser.add_argument('--figures', default=os.path.join(HERE, 'figures'))
    parser.add_argument('--data_dir', default=os.path.join(os.path.dirname(HERE), 'data', 'shakespeare_char'))
    args = parser.parse_args(argv)
    # the tuned study's own options, for its run names, losses and trainer arguments
    args.study = tuned_study.parse_args(['--runs', args.study_runs, '--data_dir', args.data_dir, '--device',
                                         args.device, '--compile', str(args.compile)])
    return args


def at_best(args, depth):
    """{scheme: (best rate, {seed: the run's name})} of Pre-LN and each of MODES: the tuned study's finished runs at
    each scheme's best rate."""
    found = {}
    for scheme, by_rate in tuned_study.losses(args.study, depth).items():
        best = tuned_study.best_rate(by_rate)
        if scheme in ('pre', *MODES) and best is not None:
            found[scheme] = (best, {seed: os.path.basename(tuned_study.run_dir(args.study, depth, best, scheme, seed))
                                    for seed, loss in sorted(by_rate[best].items()) if math.isfinite(loss)})
    return found


def layers_path(args, run):
    return os.path.join(args.results, 'tuned_layers', f'{run}.json')


def measure(args, threads, depth, rate, scheme, seed, run):
    """Trains the run again into args.runs with the tuned study's settings, then measures its layers."""
    start, folder = time.time(), os.path.join(args.runs, run)
    state = train(folder, tuned_study.trainer_arguments(args.study, depth, rate, scheme, seed), args.study.steps,
                  threads)
    if state != 'finished':
        raise RunFailed(f"{run} trained again {state}, not finished: its layers are not measured")
    os.makedirs(os.path.dirname(layers_path(args, run)), exist_ok=True)
    analyze_layers([folder], args.data_dir, 1, layers_path(args, run), None, threads, args.device,
                   tokens=LAYER_TOKENS)
    print(f"measured: {run} ({time.time() - start:.0f} s)", flush=True)


def against_study(args, run):
    """A run trained again against the study's own run, from their logged training losses: {'same': True when they
    are the same step for step (the same weights; only the evaluation differs, the study's runs having used the
    earlier per-seed estimator), 'first_step', 'first': the difference at the first logged step, 'largest': the
    largest over the run}; None when either log is missing."""
    logs = [{r['iter']: r['loss'] for r in read_log(os.path.join(folder, run)) if 'loss' in r}
            for folder in (args.runs, args.study_runs)]
    steps = sorted(set(logs[0]) & set(logs[1]))
    if not steps:
        return None
    differences = [abs(logs[0][step] - logs[1][step]) for step in steps]
    return {'same': logs[0] == logs[1], 'first_step': steps[0], 'first': differences[0], 'largest': max(differences)}


def main(argv):
    args = parse_args(argv)
    require_prepared_data(args.data_dir)
    runs = {depth: at_best(args, depth) for depth in args.depths}
    failures = []
    if not args.no_train:
        threads = threads_per_job(args.jobs, args.threads)
        failures = run_all([lambda job=(depth, rate, scheme, seed, run): measure(args, threads, *job)
                            for depth, schemes in runs.items() for scheme, (rate, seeds) in schemes.items()
                            for seed, run in seeds.items() if not os.path.exists(layers_path(args, run))], args.jobs)
    reports = {depth: layer_profiles({scheme: (rate, {seed: layers_path(args, run) for seed, run in seeds.items()})
                                      for scheme, (rate, seeds) in schemes.items()}, MODES, LAYER_TOKENS)
               for depth, schemes in runs.items()}
    reports = {depth: report for depth, report in reports.items() if report['schemes']}
    if not reports:
        sys.exit(f"error: no run measured in {os.path.join(args.results, 'tuned_layers')}; nothing written (drop "
                 f"--no_train to train and measure them)")
    lines = [line for depth, report in reports.items() for line in layer_findings(f"{depth} blocks", report)]
    compared = [against_study(args, run) for schemes in runs.values() for _, seeds in schemes.values()
                for run in seeds.values() if os.path.exists(layers_path(args, run))]
    compared = [c for c in compared if c]
    other = [c for c in compared if not c['same']]
    lines.append(f"{len(compared) - len(other)} of {len(compared)} runs trained again logged the same training "
                 f"losses, step for step, as the study's own runs" + (
                     f"; the other {len(other)} differ at the first logged step (iteration {other[0]['first_step']}) "
                     f"by a median {statistics.median(c['first'] for c in other):.1e} and at most "
                     f"{max(c['first'] for c in other):.1e}, and over the run by at most "
                     f"{max(c['largest'] for c in other):.3f}" if other else ''))
    write_json(os.path.join(args.results, 'tuned_layers.json'), {
        'settings': {'tokens': LAYER_TOKENS, 'modes': MODES, 'study_runs': os.path.relpath(args.study_runs, HERE)},
        'findings': lines, 'depths': {str(depth): report for depth, report in reports.items()}})
    figure = os.path.join(args.figures, 'tuned_layers.png')
    plot_layer_drop({f"{depth} blocks": report['schemes'] for depth, report in reports.items()}, figure)
    print('\n'.join(lines))
    print(f"wrote {figure}")
    if failures:
        sys.exit(f"error: {len(failures)} run(s) failed; the first: {failures[0]}")


if __name__ == '__main__':
    main(sys.argv[1:])
