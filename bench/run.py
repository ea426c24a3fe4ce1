"""meshd's performance in one run, read against the machine's limits measured in the same run.

  python3 bench/run.py [--quick] [--out FILE]

Starts `meshd broker` and two daemons (alice, bob; mesh "team") on 127.0.0.1 in a short
temporary directory under /tmp, as a user starts them (the meshd of this interpreter:
its virtualenv's console script, else this checkout's meshd.py; the daemons with --no-tcp),
afresh for each phase (the DMs, the sends at normal, the sends at full), so that every
figure starts from the same state; and measures, three repetitions each (median, min, max):

  1. `send` accepted/s at c=1 and c=8 with one request in flight per connection, and
     pipelined (200 in flight per connection), at --durability normal and full;
  2. `send` latency p50/p90/p99 at c=1 (the same calls as 1);
  3. DM latency one at a time: `send` answered on alice -> bob's events.subscribe event;
  4. a flood of DMs from one client at c=1: first send -> last event on bob, per second;
  5. daemon.health and inbox.list {limit: 50} calls/s at c=1;
  6. RSS of each daemon and the broker, idle after start and after each flood;
  7. `meshd daemon up` in a fresh MESHD_HOME until the socket answers daemon.health, and until
     the command exits; `meshd send <bob's key> hi` against a running daemon, start to exit;

and the machine's limits (bench_limits.py): a bare gevent newline-JSON echo server, a bare
SQLite WAL commit loop at FULL and NORMAL, a bare gevent-websocket echo server, and the bare
interpreter start. It prints one table (each figure, its limit and fraction of it, the
issue's target and whether it is met) and writes every raw result to a JSON file (default
bench/results/run-<date>.json; bench/results/ is not committed).

--quick: one repetition and small counts (under a minute on 2 cores; the DMs and the sends
at normal share a phase). Every run checks that every DM sent arrived (bob's inbox holds as
many rows as alice's `send` accepted), that alice's outbox finished, and that every stage
ran; it exits 1 otherwise (130 when interrupted). It never fails on a speed: the figures are
for reading. Every process it started is stopped and the directory removed at the end, on
failure and on Ctrl-C or SIGTERM too. Progress goes to stderr, the table to stdout.
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(HERE)
sys.path.insert(1, ROOT)

import bench_limits  # noqa: E402
import bench_report  # noqa: E402
from bench_mesh import Harness, meshd_command  # noqa: E402
from bench_stages import (Traffic, final_check, measure_calls, measure_cli_send,  # noqa: E402
                          measure_daemon_up, measure_dm_latency, measure_flood, measure_rss,
                          measure_sends)

FULL = {'reps': 3, 'limit_seconds': 2.0, 'send_c1': 400, 'send_c8_each': 50,
        'pipe_c1': 800, 'pipe_c8_each': 200, 'window': 200, 'dm': 200, 'flood': 2000,
        'health': 3000, 'inbox': 1000}
QUICK = {'reps': 1, 'limit_seconds': 0.5, 'send_c1': 200, 'send_c8_each': 25,
         'pipe_c1': 400, 'pipe_c8_each': 100, 'window': 200, 'dm': 30, 'flood': 200,
         'health': 300, 'inbox': 100}
SLUG = 'team'


class Run:
    """Figures (per-repetition values), raw results, stages and notes of one run."""

    def __init__(self, counts):
        self.counts = counts
        self.values = {}
        self.raw = {}
        self.stages = []
        self.notes = []
        self.started = time.monotonic()

    def add(self, key, value):
        self.values.setdefault(key, []).append(value)

    def keep(self, key, value):
        self.raw.setdefault(key, []).append(value)

    def stage(self, name, fn, *args):
        """Run one stage; a failure is recorded (the run goes on) and returns False."""
        begun = time.monotonic()
        try:
            fn(*args)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            detail = '%s: %s' % (type(exc).__name__, exc)
            self.stages.append({'name': name, 'ok': False, 'error': detail,
                                'seconds': time.monotonic() - begun,
                                'traceback': traceback.format_exc()})
            _progress('%-40s FAILED  %s' % (name, detail))
            return False
        self.stages.append({'name': name, 'ok': True, 'seconds': time.monotonic() - begun})
        _progress('%-40s ok  %5.1f s' % (name, time.monotonic() - begun))
        return True


def _progress(text):
    sys.stderr.write('[%s] %s\n' % (datetime.datetime.now().strftime('%H:%M:%S'), text))
    sys.stderr.flush()


# -- the machine's limits ------------------------------------------------------------------

def measure_limits(run, base):
    seconds = run.counts['limit_seconds']
    for rep in range(run.counts['reps']):
        echo = bench_limits.unix_echo(base, seconds)
        run.add('limit.echo.rate', echo['rate'])
        run.add('limit.echo.p50', echo['p50'])
        run.add('limit.rss.echo', echo['rss'])
        run.keep('limit.echo', echo)
        for sync in ('NORMAL', 'FULL'):
            commits = bench_limits.sqlite_commits(base, sync, seconds)
            run.add('limit.sqlite.%s' % sync.lower(), commits['rate'])
            run.keep('limit.sqlite.%s' % sync.lower(), commits)
        ws = bench_limits.ws_echo(seconds)
        run.add('limit.ws.rate', ws['rate'])
        run.add('limit.ws.p50', ws['p50'])
        run.add('limit.rss.ws', ws['rss'])
        run.keep('limit.ws', ws)
        starts = bench_limits.interpreter_starts(warmup=rep == 0)
        for name, wall in starts.items():
            run.add('limit.start.%s' % name, wall)


# -- the run -----------------------------------------------------------------------------

# Each phase has a broker and two daemons of its own, from scratch, so that every figure
# starts from the same state whatever ran before it: the broker keeps a DM's row until its
# TTL (7 days by default), so its queue grows with every DM of the run. --quick, whose
# counts are small, runs the sends at normal in the first phase to save a start.
DMS = (
    ('rss idle', lambda run, traffic, harness: measure_rss(run, harness, 'idle')),
    ('dm latency', lambda run, traffic, harness: measure_dm_latency(run, traffic)),
    ('flood', measure_flood),
    ('health, inbox.list', measure_calls),
    ('meshd send (cli)', measure_cli_send),
)
SEND_NORMAL = (
    ('send (normal)', lambda run, traffic, harness: measure_sends(run, traffic, 'normal')),
)
SEND_FULL = (
    ('send (full)', lambda run, traffic, harness: measure_sends(run, traffic, 'full')),
)


def phases(quick):
    if quick:
        return (('normal', 'normal', DMS + SEND_NORMAL), ('full', 'full', SEND_FULL))
    return (('dms', 'normal', DMS), ('send-normal', 'normal', SEND_NORMAL),
            ('send-full', 'full', SEND_FULL))


def expected_stages(quick):
    names = ['machine limits']
    for phase, _durability, stages in phases(quick):
        names.append('%s: broker, mesh, daemons up' % phase)
        names.extend(stage[0] for stage in stages)
        names.append('%s: every DM arrived' % phase)
    return names + ['daemon up (fresh home)']


def run_phase(run, base, cli, name, durability, stages):
    harness = Harness(os.path.join(base, name), cli)
    os.makedirs(harness.base)
    state = {}
    try:
        def setup():
            harness.start_broker()
            daemons = harness.create_mesh(SLUG, ['alice', 'bob'])
            harness.up(daemons, durability, SLUG)
            state['traffic'] = Traffic(*daemons)
        if not run.stage('%s: broker, mesh, daemons up' % name, setup):
            return
        for stage_name, fn in stages:
            run.stage(stage_name, fn, run, state['traffic'], harness)
        run.stage('%s: every DM arrived' % name, final_check, run, state['traffic'], harness)
    finally:
        harness.cleanup()


def measure_meshd(run, base, quick):
    cli, described, notes = meshd_command()
    run.notes.extend(notes)
    run.raw['meshd_command'] = described
    for name, durability, stages in phases(quick):
        run_phase(run, base, cli, name, durability, stages)
    harness = Harness(os.path.join(base, 'up'), cli)
    os.makedirs(harness.base)
    try:
        run.stage('daemon up (fresh home)', measure_daemon_up, run, harness)
    finally:
        harness.cleanup()


def machine(quick):
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as handle:
            for line in handle:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    commit = 'unknown'
    try:
        commit = subprocess.run(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD'],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(['git', '-C', ROOT, 'status', '--porcelain',
                                '--untracked-files=no'],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if dirty:
            commit += ' + uncommitted changes'
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for name in ('gevent', 'gevent-websocket', 'websocket-client', 'PyNaCl', 'peewee', 'psutil'):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {'cpu': cpu, 'cores': cores, 'python': platform.python_version(),
            'executable': sys.executable, 'sqlite': sqlite3.sqlite_version,
            'meshd_commit': commit, 'date': datetime.datetime.now().astimezone().isoformat(
                timespec='seconds'),
            'mode': 'quick' if quick else 'full', 'loadavg_start': os.getloadavg(),
            'libraries': versions, 'platform': platform.platform()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help='one repetition, small counts: a correctness check in under a minute')
    parser.add_argument('--out', default=None,
                        help='JSON file of raw results (default bench/results/run-<date>.json)')
    args = parser.parse_args(argv)
    counts = QUICK if args.quick else FULL
    info = machine(args.quick)
    out = args.out or os.path.join(HERE, 'results', 'run-%s%s.json' % (
        datetime.datetime.now().strftime('%Y%m%d-%H%M%S'), '-quick' if args.quick else ''))

    def terminate(signum, _frame):
        raise KeyboardInterrupt('signal %d' % signum)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)

    run = Run(counts)
    base = tempfile.mkdtemp(prefix='mb-', dir='/tmp')
    interrupted = False
    try:
        run.stage('machine limits', measure_limits, run, base)
        measure_meshd(run, base, args.quick)
    except KeyboardInterrupt:
        interrupted = True
        _progress('interrupted: stopping every process this run started')
    finally:
        import shutil
        shutil.rmtree(base, ignore_errors=True)
    info['loadavg_end'] = os.getloadavg()
    info['seconds'] = time.monotonic() - run.started
    info['meshd_command'] = run.raw.get('meshd_command')

    rows = bench_report.evaluate(run.values)
    header = ('meshd bench (%s): %s, %d cores, Python %s (%s), SQLite %s\n'
              'meshd %s, %s; load average %.2f at start, %.2f at end; %.0f s\n'
              'meshd run as: %s\n'
              'libraries: %s'
              % (info['mode'], info['cpu'], info['cores'], info['python'], info['executable'],
                 info['sqlite'], info['meshd_commit'], info['date'], info['loadavg_start'][0],
                 info['loadavg_end'][0], info['seconds'], info['meshd_command'],
                 ', '.join('%s %s' % item for item in info['libraries'].items())))
    print(header)
    print('"of limit": median / limit for rates, limit / median for times and memory '
          '(1.00 = at the bare machine\'s limit)\n')
    print(bench_report.table(rows))
    failed = [s for s in run.stages if not s['ok']]
    ran = set(s['name'] for s in run.stages)
    failed += [{'name': name, 'ok': False, 'error': 'did not run'}
               for name in expected_stages(args.quick) if name not in ran]
    run.notes.extend(bench_report.spread_notes(rows))
    for note in run.notes:
        print('\nnote: %s' % note)
    if failed or interrupted:
        print()
        for stage in failed:
            print('FAILED %s: %s' % (stage['name'], stage['error']))
        if interrupted:
            print('INTERRUPTED: the figures above are partial')

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w') as handle:
        json.dump({'machine': info, 'counts': counts, 'stages': run.stages, 'notes': run.notes,
                   'figures': [r for r in rows if isinstance(r, dict)], 'raw': run.raw},
                  handle, indent=1, default=str)
    print('\nraw results: %s' % out)
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
