"""bench/run.py's figures: what each one is, its limit and target, and the table they make.

Every figure is a list of per-repetition values, summarised as median (min–max). Its limit is
a machine limit measured in the same run (bench_limits.py); `of limit` is the median over the
limit for rates and the limit over the median for times and memory, so 1.00 means "as good as
the bare machine allows" either way (pipelined and concurrent sends may pass 1: they share
commits).
"""
import statistics

# (key, label, unit, limit, target). unit: '/s' rates, 'ms' and 's' times (stored in
# seconds), 'MiB'. limit: a key of another figure, or (function of median(), label).
# target: (op, value or function of median(), text).
LIMITS = [
    ('limit.echo.rate', '(a) bare gevent echo, Unix socket, c=1', '/s', None, None),
    ('limit.echo.p50', '(a) bare gevent echo, c=1, p50', 'ms', None, None),
    ('limit.echo.beside', '(a) the same, beside each health/inbox run', '/s', None, None),
    ('limit.echo.beside.p50', '(a) the same, beside each health/inbox run, p50', 'ms', None,
     None),
    ('limit.sqlite.normal', '(b) SQLite WAL commits, synchronous=NORMAL', '/s', None, None),
    ('limit.sqlite.full', '(b) SQLite WAL commits, synchronous=FULL', '/s', None, None),
    ('limit.ws.rate', '(c) bare gevent-websocket echo, c=1', '/s', None, None),
    ('limit.ws.p50', '(c) bare gevent-websocket echo, c=1, p50', 'ms', None, None),
    ('limit.rss.echo', '    RSS of the bare echo server (gevent)', 'MiB', None, None),
    ('limit.rss.ws', '    RSS of the bare WebSocket echo server', 'MiB', None, None),
    ('limit.start.pass', '(d) python -c pass', 's', None, None),
    ('limit.start.gevent', '(d) python -c "import gevent"', 's', None, None),
    ('limit.start.meshd_cli', '    python -c "import meshd.cli" (for reading)', 's',
     'limit.start.gevent', None),
    ('limit.start.meshd_daemon', '    python -c "patch_all(); import meshd.daemon" (reading)',
     's', 'limit.start.gevent', None),
]

LIMIT_LABELS = {
    'limit.echo.rate': 'bare echo',
    'limit.echo.p50': 'bare echo p50',
    'limit.sqlite.normal': 'commits NORMAL',
    'limit.sqlite.full': 'commits FULL',
    'limit.ws.rate': 'bare ws echo',
    'limit.ws.p50': 'bare ws echo p50',
    'limit.start.gevent': 'import gevent',
    'limit.echo.beside': 'bare echo beside',
    'limit.rss.echo': 'bare echo server',
    'limit.rss.ws': 'bare ws echo server',
    'limit.echo.beside.p50': 'bare echo beside p50',
}


def _commit_floor(durability):
    """A one-in-flight send's floor: one bare echo round trip plus one bare commit."""
    def floor(median):
        echo, commits = median('limit.echo.p50'), median('limit.sqlite.%s' % durability)
        if echo is None or not commits:
            return None
        return echo + 1.0 / commits
    return floor, 'echo p50 + 1 commit %s' % durability.upper()


def _health_target(median):
    echo = median('limit.echo.beside')
    return None if echo is None else 0.8 * echo


def meshd_figures():
    figures = []
    for durability in ('normal', 'full'):
        d = durability
        target = {'normal': ('>=', 2000, '>= 2,000/s'), 'full': ('>=', 1200, '>= 1,200/s')}[d]
        commits = 'limit.sqlite.%s' % d
        figures += [
            ('section', 'send, daemon --durability %s (alice, to bob)' % d),
            ('send.%s.c1.rate' % d, 'send c=1 %s, one in flight' % d, '/s', commits, target),
            ('send.%s.c1.p50' % d, 'send c=1 %s latency p50' % d, 'ms', _commit_floor(d),
             ('<=', 0.0005, '<= 0.5 ms') if d == 'normal' else None),
            ('send.%s.c1.p90' % d, 'send c=1 %s latency p90' % d, 'ms', _commit_floor(d), None),
            ('send.%s.c1.p99' % d, 'send c=1 %s latency p99' % d, 'ms', _commit_floor(d), None),
            ('send.%s.c8.rate' % d, 'send c=8 %s, one in flight each' % d, '/s', commits, None),
            ('send.%s.pipe1.rate' % d, 'send pipelined c=1 %s (200 in flight)' % d, '/s',
             commits, None),
            ('send.%s.pipe8.rate' % d, 'send pipelined c=8 %s (up to 200 in flight each)' % d,
             '/s', commits, None),
            ('send.%s.pipe8.e2e' % d, 'send pipelined c=8 %s: delivered, end to end' % d,
             '/s', 'limit.ws.rate', None),
        ]
    figures += [
        ('section', 'DMs alice -> broker -> bob, --durability normal'),
        ('dm.p50', 'DM latency p50 (send answered -> bob event)', 'ms', 'limit.ws.p50',
         ('<=', 0.003, '<= 3 ms')),
        ('dm.p90', 'DM latency p90', 'ms', 'limit.ws.p50', None),
        ('dm.p99', 'DM latency p99', 'ms', 'limit.ws.p50', None),
        ('dm.hop.alice_broker', '  its hops (p50, by ms stamps): answered -> broker',
         'ms', None, None),
        ('dm.hop.broker_bob', '  broker read it -> bob stamped its event', 'ms', None, None),
        ('dm.hop.bob_client', '  bob stamped its event -> subscriber read it', 'ms', None,
         None),
        ('flood.delivered', 'flood from 1 client c=1: delivered', '/s', 'limit.ws.rate',
         ('>=', 1500, '>= 1,500/s')),
        ('flood.accepted', 'flood from 1 client c=1: accepted', '/s', 'limit.sqlite.normal',
         None),
        ('section', 'other calls at c=1, --durability normal'),
        ('health.rate', 'daemon.health c=1', '/s', 'limit.echo.beside',
         ('>=', _health_target, '>= 80% of echo')),
        ('health.p50', 'daemon.health c=1 p50', 'ms', 'limit.echo.beside.p50', None),
        ('health.p99', 'daemon.health c=1 p99', 'ms', 'limit.echo.beside.p50', None),
        ('inbox50.rate', 'inbox.list {limit:50} c=1', '/s', 'limit.echo.beside',
         ('>=', 4000, '>= 4,000/s')),
        ('inbox50.p50', 'inbox.list {limit:50} c=1 p50', 'ms', 'limit.echo.beside.p50', None),
        ('section', 'memory (RSS)'),
        ('rss.alice.idle', 'RSS alice daemon, idle after start', 'MiB', 'limit.rss.echo',
         None),
        ('rss.bob.idle', 'RSS bob daemon, idle after start', 'MiB', 'limit.rss.echo', None),
        ('rss.broker.idle', 'RSS broker, idle after daemons joined', 'MiB', 'limit.rss.ws',
         None),
        ('rss.alice.flood', 'RSS alice daemon, after each flood', 'MiB', 'limit.rss.echo',
         None),
        ('rss.bob.flood', 'RSS bob daemon, after each flood', 'MiB', 'limit.rss.echo', None),
        ('rss.broker.flood', 'RSS broker, after each flood', 'MiB', 'limit.rss.ws', None),
        ('section', 'processes (wall time from process start)'),
        ('start.daemon_socket', '`meshd daemon up` -> socket answers health', 's',
         'limit.start.gevent', ('<=', 0.2, '<= 0.2 s')),
        ('start.daemon_cmd', '`meshd daemon up` command until it exits', 's',
         'limit.start.gevent', None),
        ('start.cli_send', '`meshd send <bob key> hi` until it exits', 's',
         'limit.start.gevent', ('<=', 0.15, '<= 0.15 s')),
    ]
    return figures


def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {'median': statistics.median(values), 'min': min(values), 'max': max(values),
            'n': len(values)}


def fmt(value, unit):
    if value is None:
        return '-'
    if unit == '/s':
        return '{:,.0f}/s'.format(value)
    if unit == 'ms':
        ms = value * 1000.0
        return ('%.3f ms' % ms) if ms < 1 else ('%.2f ms' % ms) if ms < 100 else ('%.0f ms' % ms)
    if unit == 's':
        return '%.3f s' % value
    if unit == 'MiB':
        return '%.1f MiB' % value
    return '%g' % value


def _bare(text):
    return text.replace('/s', '').replace(' ms', '').replace(' s', '').replace(' MiB', '')


def evaluate(values):
    """Every figure with its summary, limit, fraction and target verdict, in table order."""
    def median(key):
        s = summary(values.get(key, []))
        return s['median'] if s else None

    rows = [('section', 'machine limits (same run)')]
    for key, label, unit, limit, target in LIMITS:
        rows.append(_row(key, label, unit, limit, target, values, median))
    for spec in meshd_figures():
        if spec[0] == 'section':
            rows.append(spec)
        else:
            rows.append(_row(*spec, values=values, median=median))
    return rows


def _row(key, label, unit, limit, target, values, median):
    s = summary(values.get(key, []))
    row = {'key': key, 'label': label, 'unit': unit, 'values': values.get(key, []),
           'summary': s, 'limit': None, 'fraction': None, 'target': None}
    if limit is not None:
        if isinstance(limit, tuple):
            value, limit_label = limit[0](median), limit[1]
        else:
            value, limit_label = median(limit), LIMIT_LABELS.get(limit, limit)
        row['limit'] = {'value': value, 'label': limit_label}
        if value and s and s['median']:
            row['fraction'] = (s['median'] / value if unit == '/s'
                               else value / s['median'])
    if target is not None:
        op, goal, text = target
        goal = goal(median) if callable(goal) else goal
        met = None
        if s is not None and goal is not None:
            met = s['median'] >= goal if op == '>=' else s['median'] <= goal
        row['target'] = {'op': op, 'value': goal, 'text': text, 'met': met}
    return row


def spread_notes(rows):
    """A note for every figure whose repetitions differ more than twice over: a trend (each
    repetition worse than the one before) or a noisy machine."""
    notes = []
    for row in rows:
        s = isinstance(row, dict) and row['summary']
        values = isinstance(row, dict) and [v for v in row['values'] if v is not None]
        if not s or s['n'] < 2 or s['min'] <= 0 or s['max'] / s['min'] <= 2:
            continue
        pairs = list(zip(values, values[1:]))
        worse = (all(b < a for a, b in pairs) if row['unit'] == '/s'
                 else all(b > a for a, b in pairs) if row['unit'] in ('ms', 's') else False)
        shown = ', '.join(fmt(v, row['unit']) for v in values)
        if worse:
            notes.append('%s got worse with every repetition (%s): a trend, not noise'
                         % (row['label'].strip(), shown))
        else:
            notes.append('%s varied more than twice over between repetitions (%s): a busy '
                         'machine?' % (row['label'].strip(), shown))
    return notes


def table(rows):
    """The aligned text table."""
    lines = []
    cells = []
    for row in rows:
        if isinstance(row, tuple):
            cells.append(row)
            continue
        s, unit = row['summary'], row['unit']
        median = fmt(s['median'], unit) if s else 'not run'
        spread = ('(%s - %s)' % (_bare(fmt(s['min'], unit)), _bare(fmt(s['max'], unit)))
                  if s and s['n'] > 1 else '')
        limit = ''
        if row['limit'] is not None:
            limit = '%s %s' % (fmt(row['limit']['value'], unit), row['limit']['label'])
        fraction = ''
        if row['fraction'] is not None:
            f = row['fraction']
            fraction = ('%.2f' % f) if f < 10 else ('%.0f' % f)
        target = ''
        if row['target'] is not None:
            t = row['target']
            verdict = {True: 'met', False: 'NOT MET', None: '?'}[t['met']]
            target = '%s  %s' % (t['text'], verdict)
        cells.append((row['label'], median, spread, limit, fraction, target))
    header = ('figure', 'median', '(min - max)', 'limit (same run)', 'of limit', 'target')
    widths = [len(h) for h in header]
    for cell in cells:
        if cell[0] != 'section':
            widths = [max(w, len(c)) for w, c in zip(widths, cell)]
    def fmt_row(cell):
        return '  '.join((c.ljust(w) if i in (0, 3, 5) else c.rjust(w))
                         for i, (c, w) in enumerate(zip(cell, widths))).rstrip()
    lines.append(fmt_row(header))
    lines.append('-' * len(fmt_row(header)))
    for cell in cells:
        if cell[0] == 'section':
            lines.append('')
            lines.append('== %s' % cell[1])
        else:
            lines.append(fmt_row(cell))
    return '\n'.join(lines)
