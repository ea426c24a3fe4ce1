"""Socket-free units of the broker: rate buckets, option parsing, group matching, grants."""
import os
import shutil
import unittest

from meshd.broker import admin, delivery, ratelimit, server, store as broker_store
from meshd.broker.presence import group_targets, normalise_groups
from meshd.exceptions import ConfigError
from tests.base import short_tempdir


class RateLimiterTest(unittest.TestCase):

    def test_default_and_reference_sizes(self):
        self.assertEqual(ratelimit.parse_spec(None), (60, 600))
        self.assertEqual(ratelimit.parse_spec('10:60'), (10, 60))
        self.assertIsNone(ratelimit.parse_spec('off'))
        for bad in ('10', 'a:b', '0:5', '5:-1'):
            with self.assertRaises(ConfigError):
                ratelimit.parse_spec(bad)

    def test_bucket_refills_and_refusal_consumes_nothing(self):
        limiter = ratelimit.RateLimiter((10, 60))
        self.assertTrue(all(limiter.take('m', now=100.0) for _ in range(10)))
        self.assertFalse(limiter.take('m', now=100.0))
        self.assertFalse(limiter.take('m', now=100.5))      # half a token refilled, none consumed
        self.assertTrue(limiter.take('m', now=101.0))       # one token per second at 60/min
        self.assertFalse(limiter.take('m', now=101.0))
        self.assertTrue(limiter.take('other', now=101.0))   # buckets are per member

    def test_default_allows_sixty_and_off_allows_all(self):
        limiter = ratelimit.RateLimiter(ratelimit.parse_spec('60:600'))
        self.assertEqual(sum(limiter.take('m', now=5.0) for _ in range(61)), 60)
        self.assertTrue(limiter.take('m', now=5.1))          # 10 per second refill
        off = ratelimit.RateLimiter(None)
        self.assertTrue(all(off.take('m', now=1.0) for _ in range(1000)))


class ParsingTest(unittest.TestCase):

    def test_durations(self):
        self.assertEqual(server.parse_duration('7d'), 7 * 86400)
        self.assertEqual(server.parse_duration('12h'), 43200)
        self.assertEqual(server.parse_duration('30m'), 1800)
        self.assertEqual(server.parse_duration('45'), 45)
        with self.assertRaises(ConfigError):
            server.parse_duration('7 weeks')

    def test_listen(self):
        self.assertEqual(server.parse_listen('127.0.0.1:7900'), ('127.0.0.1', 7900))
        self.assertEqual(server.parse_listen('[::1]:0'), ('::1', 0))
        for bad in ('7900', 'host:port', 'h:70000'):
            with self.assertRaises(ConfigError):
                server.parse_listen(bad)

    def test_unknown_timing_is_refused(self):
        with self.assertRaises(ConfigError):
            server.BrokerServer(listen='127.0.0.1:0', timings={'grace': 1})


class RoutingRulesTest(unittest.TestCase):

    def test_group_ancestors(self):
        groups = normalise_groups([{'name': 'a/b/c', 'role': 'x'}, {'bad': 1}, 'junk', {'name': 'd'}])
        self.assertEqual(groups, [{'name': 'a/b/c', 'role': 'x'}, {'name': 'd'}])
        self.assertEqual(group_targets(groups), {'@a', '@a/b', '@a/b/c', '@d'})

    def test_grant_rule(self):
        allows = delivery.grant_allows
        self.assertTrue(allows({}, 'M', 'S', 'dm'))
        self.assertFalse(allows({}, 'M', 'S', 'admin'))
        self.assertFalse(allows({'M': []}, 'M', 'S', 'dm'))
        self.assertFalse(allows({'S': ['read']}, 'M', 'S', 'dm'))            # session entry applies
        self.assertTrue(allows({'M': ['dm'], 'S': []}, 'M', 'S', 'dm'))      # member entry first
        self.assertTrue(allows({'S': []}, 'M', None, 'broadcast'))


if __name__ == '__main__':
    unittest.main()


class InviteMintTest(unittest.TestCase):

    def test_two_identical_invites_in_one_second_get_distinct_tokens(self):
        """Two v1 invites minted in the same second with the same fields collided on the
        unique token and broker-admin died with a traceback."""
        tmp = short_tempdir()
        self.addCleanup(shutil.rmtree, tmp, True)
        store = broker_store.open_store(os.path.join(tmp, 'broker.db'))
        self.addCleanup(store.close)
        with store.connection():
            admin.create_mesh(store, 'Team', slug='team')
            first = admin.invite(store, 'team', 'ws://127.0.0.1:7900/ws')
            second = admin.invite(store, 'team', 'ws://127.0.0.1:7900/ws')
        self.assertNotEqual(first['token'], second['token'])
        self.assertEqual(second['expires_at'], first['expires_at'] - 1)
