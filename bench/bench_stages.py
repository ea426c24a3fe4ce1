"""The stages of bench/run.py that measure meshd itself: DMs from alice to bob through `send`
(one in flight, concurrent, pipelined), one at a time to bob's event stream, in a flood; calls
at c=1; memory; the CLI's process times; and the final check that every DM arrived.

Each `measure_*` adds one value per repetition of each figure to `run` (run.py's Run) with
`run.add(key, value)` and keeps the raw data with `run.keep(key, data)`. The keys are those
of bench_report.py. Clients are bench_common.LineClient, on plain blocking sockets; the
concurrent ones are threads.
"""
import datetime
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time

import bench_limits
from bench_common import BenchError, LineClient, latency_summary, wait_until
from bench_mesh import child_env, rss_mib

CALL_TIMEOUT = 120.0     # one answer, on a loaded machine


# -- traffic alice -> bob ----------------------------------------------------------------

class Traffic:
    """DMs from alice to bob: unique bodies, and how many bob must end up holding."""

    def __init__(self, alice, bob):
        self.alice, self.bob = alice, bob
        self.bob_key = bob.pubkey()
        self.tag = 'b%x' % (int(time.time() * 1000) % 0xffffff)
        self.sent = 0
        self.lock = threading.Lock()

    def params(self, label, n):
        return {'to': self.bob_key, 'message': '%s %s %06d' % (self.tag, label, n)}

    def accepted(self, count):
        with self.lock:
            self.sent += count

    def wait_delivered(self):
        """Wait until bob's inbox holds every DM sent so far, then until alice's outbox has
        no row left to finish (so that the next stage starts on idle daemons); seconds until
        bob held them all."""
        expected = self.sent
        begun = time.monotonic()
        wait_until(lambda: self.bob.count() >= expected, 120 + expected / 50.0,
                   "bob's inbox to hold all %d DMs" % expected, alive=self.bob.alive)
        arrived = time.monotonic() - begun
        wait_until(lambda: self.unfinished() == 0, 120, "alice's outbox to finish",
                   alive=self.alice.alive)
        return arrived

    def unfinished(self):
        """Rows of alice's outbox not yet acked by the broker (0 when the schema moved on)."""
        try:
            return self.alice.count("SELECT count(*) FROM outbox WHERE status != 'done'")
        except sqlite3.Error:
            return 0


def _answer(client):
    """The next answer on a connection used for calls only; its result or BenchError."""
    while True:
        message = client.read()
        if 'id' in message:
            if 'result' not in message:
                raise BenchError('send failed: %s' % json.dumps(message.get('error')))
            return message['result']


def _released(barrier, clock):
    """Release the workers waiting on `barrier` (one of which may have failed already);
    the time they started."""
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    return clock()


def one_in_flight(traffic, label, conns, each):
    """`conns` connections, each sending `each` DMs one at a time; (elapsed, latencies)."""
    latencies = [[] for _ in range(conns)]
    errors = []
    clock = time.perf_counter

    def work(index, client, ready):
        try:
            if ready is not None:
                ready.wait()
            mine = latencies[index]
            for n in range(each):
                line = client.line('send', traffic.params('%s.%d' % (label, index), n))
                before = clock()
                client.send_lines(line)
                _answer(client)
                mine.append(clock() - before)
        except Exception as exc:
            errors.append(exc)
            if ready is not None:
                ready.abort()

    clients = [traffic.alice.client(CALL_TIMEOUT) for _ in range(conns)]
    try:
        if conns == 1:
            start = clock()
            work(0, clients[0], None)
        else:
            ready = threading.Barrier(conns + 1)
            threads = [threading.Thread(target=work, args=(i, clients[i], ready), daemon=True)
                       for i in range(conns)]
            for thread in threads:
                thread.start()
            start = _released(ready, clock)
            for thread in threads:
                thread.join()
        elapsed = clock() - start
    finally:
        for client in clients:
            client.close()
    done = sum(len(l) for l in latencies)
    traffic.accepted(done)
    if errors:
        raise BenchError('%s: %s' % (label, errors[0]))
    return elapsed, [x for l in latencies for x in l]


def pipelined(traffic, label, conns, each, window):
    """`conns` connections, each writing `window` sends at once and reading their answers."""
    clock = time.perf_counter
    errors = []
    answered = [0] * conns

    def work(index, client, ready):
        try:
            ready.wait()
            for first in range(0, each, window):
                chunk = range(first, min(first + window, each))
                client.send_lines(b''.join(
                    client.line('send', traffic.params('%s.%d' % (label, index), n))
                    for n in chunk))
                for _ in chunk:
                    _answer(client)
                    answered[index] += 1
        except Exception as exc:
            errors.append(exc)
            ready.abort()

    clients = [traffic.alice.client(CALL_TIMEOUT) for _ in range(conns)]
    try:
        ready = threading.Barrier(conns + 1)
        threads = [threading.Thread(target=work, args=(i, clients[i], ready), daemon=True)
                   for i in range(conns)]
        for thread in threads:
            thread.start()
        start = _released(ready, clock)
        for thread in threads:
            thread.join()
        elapsed = clock() - start
    finally:
        for client in clients:
            client.close()
    traffic.accepted(sum(answered))
    if errors:
        raise BenchError('%s: %s' % (label, errors[0]))
    return elapsed


def measure_sends(run, traffic, durability):
    c = run.counts
    d = durability
    for rep in range(c['reps']):
        label = '%s.r%d' % (d, rep)
        elapsed, latencies = one_in_flight(traffic, 'c1.' + label, 1, c['send_c1'])
        lat = latency_summary(latencies)
        run.add('send.%s.c1.rate' % d, c['send_c1'] / elapsed)
        for p in ('p50', 'p90', 'p99'):
            run.add('send.%s.c1.%s' % (d, p), lat[p])
        delivered = traffic.wait_delivered()
        run.keep('send.%s.c1' % d, dict(lat, elapsed=elapsed, count=c['send_c1'],
                                        e2e_seconds=elapsed + delivered,
                                        latencies=[round(x, 7) for x in latencies]))

        total = 8 * c['send_c8_each']
        elapsed, latencies = one_in_flight(traffic, 'c8.' + label, 8, c['send_c8_each'])
        run.add('send.%s.c8.rate' % d, total / elapsed)
        delivered = traffic.wait_delivered()
        run.keep('send.%s.c8' % d, dict(latency_summary(latencies), elapsed=elapsed,
                                        count=total, e2e_seconds=elapsed + delivered))

        for name, conns, each in (('pipe1', 1, c['pipe_c1']), ('pipe8', 8, c['pipe_c8_each'])):
            elapsed = pipelined(traffic, '%s.%s' % (name, label), conns, each, c['window'])
            run.add('send.%s.%s.rate' % (d, name), conns * each / elapsed)
            delivered = traffic.wait_delivered()
            run.add('send.%s.%s.e2e' % (d, name), conns * each / (elapsed + delivered))
            run.keep('send.%s.%s' % (d, name), {'elapsed': elapsed, 'count': conns * each,
                                                'window': c['window'],
                                                'e2e_seconds': elapsed + delivered})


# -- DMs to bob's event stream -----------------------------------------------------------

def _is_message(message, body=None, prefix=None):
    if message.get('method') != 'event':
        return None
    event = message.get('params') or {}
    if event.get('kind') != 'message':
        return None
    text = (event.get('data') or {}).get('body') or ''
    if body is not None and text != body:
        return None
    if prefix is not None and not text.startswith(prefix):
        return None
    return text


def _stamp(text):
    """Seconds since the epoch of an ISO-8601 UTC stamp (meshd writes milliseconds)."""
    try:
        return datetime.datetime.fromisoformat(text.replace('Z', '+00:00')).timestamp()
    except (AttributeError, TypeError, ValueError):
        return None


HOPS = ('alice_broker', 'broker_bob', 'bob_client')


def measure_dm_latency(run, traffic):
    """One DM at a time; besides the latency, where it went by the stamps on the way (the
    broker's createdAt when it read the send, bob's event ts; wall clock, milliseconds)."""
    clock = time.perf_counter
    for rep in range(run.counts['reps']):
        stream = traffic.bob.client(CALL_TIMEOUT)
        sender = traffic.alice.client(CALL_TIMEOUT)
        latencies = []
        hops = {hop: [] for hop in HOPS}
        try:
            stream.call('events.subscribe')
            for n in range(run.counts['dm']):
                params = traffic.params('dm.r%d' % rep, n)
                sender.send_lines(sender.line('send', params))
                _answer(sender)
                answered, answered_wall = clock(), time.time()
                traffic.accepted(1)
                while True:
                    message = stream.read(CALL_TIMEOUT)
                    if _is_message(message, body=params['message']):
                        break
                latencies.append(clock() - answered)
                read_wall = time.time()
                event = message['params']
                stamps = (answered_wall, _stamp(event.get('data', {}).get('created_at')),
                          _stamp(event.get('ts')), read_wall)
                if None not in stamps:
                    for hop, (a, b) in zip(HOPS, zip(stamps, stamps[1:])):
                        hops[hop].append(b - a)
        finally:
            stream.close()
            sender.close()
        lat = latency_summary(latencies)
        for p in ('p50', 'p90', 'p99'):
            run.add('dm.%s' % p, lat[p])
        for hop, values in hops.items():
            if values:
                run.add('dm.hop.%s' % hop, latency_summary(values)['p50'])
        run.keep('dm', dict(lat, latencies=[round(x, 7) for x in latencies],
                            hops={hop: [round(x, 4) for x in v] for hop, v in hops.items()}))
        traffic.wait_delivered()


class EventCounter(threading.Thread):
    """Reads bob's event stream and times each message whose body starts with `prefix`;
    resumes from its last seq when the daemon ends the stream (a slow reader's overflow)."""

    def __init__(self, daemon, prefix, expected):
        super().__init__(daemon=True)
        self.bob = daemon
        self.prefix = prefix
        self.expected = expected
        self.arrivals = {}
        self.subscribed = threading.Event()
        self.resumed = 0
        self.error = None
        self.stop = False

    def run(self):
        epoch = seq = None
        try:
            while len(self.arrivals) < self.expected and not self.stop:
                client = self.bob.client(CALL_TIMEOUT)
                try:
                    params = {'since_seq': seq, 'epoch': epoch} if seq is not None else None
                    result = client.call('events.subscribe', params)
                    if result.get('resync'):
                        raise BenchError('bob resynced the event stream (it restarted?)')
                    epoch = result.get('epoch')
                    if seq is None:
                        seq = result.get('seq') or 0
                    self.subscribed.set()
                    while len(self.arrivals) < self.expected and not self.stop:
                        message = client.read(CALL_TIMEOUT)
                        event = message.get('params') or {}
                        if message.get('method') == 'event' and isinstance(event.get('seq'), int):
                            seq = max(seq, event['seq'])
                        text = _is_message(message, prefix=self.prefix)
                        if text is not None and text not in self.arrivals:
                            self.arrivals[text] = time.perf_counter()
                except BenchError as exc:
                    if 'closed the connection' not in str(exc):
                        raise
                    self.resumed += 1
                finally:
                    client.close()
        except Exception as exc:
            self.error = exc
            self.subscribed.set()


def measure_flood(run, traffic, harness):
    clock = time.perf_counter
    count = run.counts['flood']
    for rep in range(run.counts['reps']):
        label = 'flood.r%d' % rep
        prefix = '%s %s ' % (traffic.tag, label)
        counter = EventCounter(traffic.bob, prefix, count)
        counter.start()
        counter.subscribed.wait(CALL_TIMEOUT)
        if counter.error is not None:
            raise counter.error
        sender = traffic.alice.client(CALL_TIMEOUT)
        try:
            first = clock()
            for n in range(count):
                sender.send_lines(sender.line('send', traffic.params(label, n)))
                _answer(sender)
                traffic.accepted(1)
            accepted = clock()
        finally:
            sender.close()
        counter.join(120 + count / 20.0)
        counter.stop = True
        if counter.error is not None:
            raise counter.error
        if len(counter.arrivals) < count:
            raise BenchError('flood: %d of %d DMs reached bob\'s event stream'
                             % (len(counter.arrivals), count))
        last = max(counter.arrivals.values())
        run.add('flood.delivered', count / (last - first))
        run.add('flood.accepted', count / (accepted - first))
        before_last_accept = sum(1 for t in counter.arrivals.values() if t <= accepted)
        run.keep('flood', {'count': count, 'accept_seconds': accepted - first,
                           'deliver_seconds': last - first, 'resubscribed': counter.resumed,
                           'delivered_before_last_accept': before_last_accept})
        traffic.wait_delivered()
        measure_rss(run, harness, 'flood')


def measure_rss(run, harness, when):
    for name, pid in (('alice', harness.daemons['alice'].pid), ('bob', harness.daemons['bob'].pid),
                      ('broker', harness.broker.pid)):
        run.add('rss.%s.%s' % (name, when), rss_mib(pid))


# -- calls at c=1 --------------------------------------------------------------------------

def calls_c1(daemon, method, params, count, check=None):
    clock = time.perf_counter
    samples = []
    with daemon.client(CALL_TIMEOUT) as client:
        first = client.call(method, params)
        if check is not None:
            check(first)
        for _ in range(min(100, count)):
            client.call(method, params)      # warm-up
        line_params = params
        start = clock()
        for _ in range(count):
            before = clock()
            answer = client.request(method, line_params)
            samples.append(clock() - before)
            if 'result' not in answer:
                raise BenchError('%s failed: %s' % (method, json.dumps(answer.get('error'))))
        elapsed = clock() - start
    return dict(latency_summary(samples), rate=count / elapsed, elapsed=elapsed)


def measure_calls(run, traffic, harness):
    """daemon.health and inbox.list at c=1, each repetition right after a bare echo run of
    its own: on a shared machine the load drifts, and the target is a ratio to the echo."""
    c = run.counts

    def fifty(result):
        if len(result.get('items', [])) != 50:
            raise BenchError('inbox.list {limit: 50} gave %d rows (bob holds %d)'
                             % (len(result.get('items', [])), traffic.bob.count()))
    for _ in range(c['reps']):
        echo = bench_limits.unix_echo(harness.base, c['limit_seconds'] / 2)
        run.add('limit.echo.beside', echo['rate'])
        run.add('limit.echo.beside.p50', echo['p50'])
        run.keep('limit.echo.beside', echo)
        health = calls_c1(traffic.alice, 'daemon.health', None, c['health'])
        run.add('health.rate', health['rate'])
        run.add('health.p50', health['p50'])
        run.add('health.p99', health['p99'])
        run.keep('health', health)
        inbox = calls_c1(traffic.bob, 'inbox.list', {'limit': 50}, c['inbox'], check=fifty)
        run.add('inbox50.rate', inbox['rate'])
        run.add('inbox50.p50', inbox['p50'])
        run.keep('inbox50', dict(inbox, inbox_rows=traffic.bob.count()))


# -- processes -------------------------------------------------------------------------

def measure_cli_send(run, traffic, harness):
    argv = harness.cli + ['send', traffic.bob_key, 'hi']
    env = child_env(traffic.alice.home)
    bench_limits.process_wall(argv, env=env, cwd=harness.base)   # warm-up
    traffic.accepted(1)
    for _ in range(run.counts['reps']):
        run.add('start.cli_send', bench_limits.process_wall(argv, env=env, cwd=harness.base))
        traffic.accepted(1)
    traffic.wait_delivered()


def measure_daemon_up(run, harness):
    import psutil
    for rep in range(run.counts['reps']):
        home = os.path.join(harness.base, 'up%d' % rep)
        sock = os.path.join(home, 'daemon', 'meshd.sock')
        exited = {}
        start = time.perf_counter()
        proc = subprocess.Popen(harness.cli + ['daemon', 'up', '--no-tcp', '--json'],
                                env=child_env(home), cwd=harness.base, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def reap():
            exited['output'] = proc.communicate()
            exited['at'] = time.perf_counter()
        waiter = threading.Thread(target=reap, daemon=True)
        waiter.start()
        answered = None
        deadline = time.monotonic() + 60
        while answered is None:
            if os.path.exists(sock):
                try:
                    with LineClient(sock, timeout=10) as client:
                        if 'result' in client.request('daemon.health'):
                            answered = time.perf_counter()
                            break
                except (OSError, BenchError, ValueError):
                    pass
            if 'at' in exited and proc.returncode != 0:
                raise BenchError('daemon up exited %d: %s' % (
                    proc.returncode, exited['output'][1].decode('utf-8', 'replace')[-800:]))
            if time.monotonic() > deadline:
                raise BenchError('the daemon in %s never answered daemon.health' % home)
            time.sleep(0.002)
        waiter.join(60)
        if 'at' not in exited or proc.returncode != 0:
            raise BenchError('daemon up did not exit cleanly (%s)' % proc.returncode)
        pid = json.loads(exited['output'][0])['pid']
        harness.other_pids.append(pid)
        run.add('start.daemon_socket', answered - start)
        run.add('start.daemon_cmd', exited['at'] - start)
        stopped = harness._signal(pid, signal.SIGTERM)
        if stopped is not None:
            psutil.wait_procs([stopped], timeout=30)


def final_check(run, traffic, harness):
    traffic.wait_delivered()
    held = traffic.bob.count()
    if held != traffic.sent:
        raise BenchError("bob's inbox holds %d rows, %d DMs were sent" % (held, traffic.sent))
    left = traffic.unfinished()
    try:
        queued = harness.broker_count('SELECT count(*) FROM message_queue')
    except sqlite3.Error:
        queued = None
    run.keep('delivery', {'sent': traffic.sent, 'bob_inbox_rows': held,
                          'alice_outbox_not_done': left, 'broker_queue_rows': queued})
    if left:
        raise BenchError("alice's outbox has %d rows not done after all arrived" % left)
