"""State, memory and skill verbs (spec/wire.md §4.4, §12 item 22): reply types, fields and orders."""
import unittest

from tests.broker.base import BrokerTestMixin


class DataMixin(BrokerTestMixin):

    def setUp(self):
        super(DataMixin, self).setUp()
        self.alice, self.bob = self.member('alice'), self.member('bob')
        self.a, _ = self.hello(self.alice)
        self.b, _ = self.hello(self.bob)
        self.a.expect('peer_joined')

    def test_state(self):
        self.a.send({'type': 'set_state', 'key': 'k2', 'value': {'n': 1}})
        self.assertEqual(self.b.expect('state_change'),
                         {'type': 'state_change', 'key': 'k2', 'value': {'n': 1}, 'updatedBy': 'alice'})
        self.a.send({'type': 'set_state', 'key': 'k1', 'value': 'x'})
        self.b.expect('state_change')
        self.b.send({'type': 'get_state', 'key': 'k2', '_reqId': 'g'})
        got = self.b.expect('state_result')
        self.assertEqual(list(got), ['type', 'key', 'value', 'updatedBy', 'updatedAt', '_reqId'])
        self.assertEqual((got['value'], got['updatedBy']), ({'n': 1}, 'alice'))
        self.b.send({'type': 'get_state', 'key': 'missing'})
        self.assertEqual(self.b.expect('state_result'), {'type': 'state_result', 'key': 'missing',
                                                         'value': None, 'updatedBy': '', 'updatedAt': ''})
        self.b.send({'type': 'list_state', '_reqId': 'l'})
        self.assertEqual([e['key'] for e in self.b.expect('state_list')['entries']], ['k1', 'k2'])
        self.a.expect_nothing()     # the setter gets no state_change

    def test_memory(self):
        self.a.send({'type': 'remember', 'content': 'Deploy uses Blue/Green', 'tags': ['ops'],
                     '_reqId': 'r'})
        stored = self.a.expect('memory_stored')
        self.assertEqual(list(stored), ['type', 'id', '_reqId'])
        self.a.send({'type': 'remember', 'content': 'lunch at noon'})
        self.a.expect('memory_stored')
        self.b.send({'type': 'recall', 'query': 'blue OPS', '_reqId': 'q'})
        found = self.b.expect('memory_results')['memories']
        self.assertEqual([m['id'] for m in found], [stored['id']])
        self.assertEqual(list(found[0]), ['id', 'content', 'tags', 'rememberedBy', 'rememberedAt'])
        self.b.send({'type': 'forget', 'memoryId': stored['id'], '_reqId': 'f'})
        self.assertEqual(self.b.expect('ack'), {'type': 'ack', 'id': stored['id'],
                                                'messageId': stored['id'], 'queued': False, '_reqId': 'f'})
        self.b.send({'type': 'recall', 'query': 'blue'})
        self.assertEqual(self.b.expect('memory_results')['memories'], [])

    def test_skills(self):
        self.a.send({'type': 'share_skill', 'name': 'review', 'description': 'Code review',
                     'instructions': 'Read carefully', 'tags': ['qa'], '_reqId': 's'})
        self.assertEqual(self.a.expect('skill_ack'), {'type': 'skill_ack', 'name': 'review',
                                                      'action': 'shared', '_reqId': 's'})
        self.b.send({'type': 'list_skills', 'query': 'QA'})
        skills = self.b.expect('skill_list')['skills']
        self.assertEqual([(s['name'], s['author']) for s in skills], [('review', 'alice')])
        self.b.send({'type': 'get_skill', 'name': 'review'})
        skill = self.b.expect('skill_data')['skill']
        self.assertEqual(list(skill), ['name', 'description', 'instructions', 'tags', 'author',
                                       'manifest', 'createdAt'])
        self.b.send({'type': 'remove_skill', 'name': 'review'})
        self.assertEqual(self.b.expect('skill_ack')['action'], 'removed')
        self.b.send({'type': 'remove_skill', 'name': 'review'})
        self.assertEqual(self.b.expect('skill_ack')['action'], 'not_found')
        self.b.send({'type': 'get_skill', 'name': 'review'})
        self.assertIsNone(self.b.expect('skill_data')['skill'])


class DataSqliteTest(DataMixin, unittest.TestCase):
    backend = 'sqlite'


class DataPostgresTest(DataMixin, unittest.TestCase):
    backend = 'postgresql'


if __name__ == '__main__':
    unittest.main()
