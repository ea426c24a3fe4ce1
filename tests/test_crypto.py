"""meshd.crypto reproduces every test vector of spec/wire.md §2.6."""
import json
import unittest

from meshd import crypto

MEMBER_PK = '8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c'
SESSION_PK = '8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394'
RECIPIENT_PK = 'ed4928c628d1c2c6eae90338905995612959273a5c63f93636c14614ac8737d1'
OWNER_PK = '6e7a1cdd29b0b78fd13af4c5598feff4ef2a97166e3ca6f2e4fbfccd80505bf1'

HELLO_TEXT = ('mesh-test|member-test|8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c'
              '|1700000000000')
HELLO_SIG = ('8195aa4093f81dcb6f8b32f2b8e3705204aced0dc1958dd95abda1a5dde3ae37'
             'd6dab0e163bd01d917a99d4064311327793424e333e66040399d548ec6492500')
ATTEST_TEXT = ('claudemesh-session-attest|' + MEMBER_PK + '|' + SESSION_PK + '|1700043200000')
ATTEST_SIG = ('d6237c82ab2a8bebc9d2e7ba83f8e89e629888b7cc12406a0f3dd10c4bd83699'
              '338b032262f85cb1e4aea3c367726ec89c1e0f2541e37775bedb50fd6a3a8409')
SESSION_HELLO_TEXT = ('claudemesh-session-hello|mesh-test|' + MEMBER_PK + '|' + SESSION_PK
                      + '|1700000000000')
SESSION_HELLO_SIG = ('a452ed853a15d23f8993d84963d24809bbc32db369e135d95368f2b052457db6'
                     '79167022af6e23dbcfefb577c02ea5562bb60d0340678ab664506992b8118d0d')
V1_TEXT = ('1|mesh-test|test-mesh|ws://localhost:7900/ws|1700604800|dGVzdC1tZXNoLXJvb3Qta2V5|member|'
           + OWNER_PK)
V1_SIG = ('320be7147e3293c3c0a759cad8e0a2f4038f51b65f29a768c670cc55111afbba'
          'd7d7e37ca8c2b85d88eb01f71b7d71e8c5f8090c24b59bc9373f530dcb4ca301')
V1_TOKEN = (
    'eyJ2IjoxLCJtZXNoX2lkIjoibWVzaC10ZXN0IiwibWVzaF9zbHVnIjoidGVzdC1tZXNoIiwiYnJva2VyX3VybCI6'
    'IndzOi8vbG9jYWxob3N0Ojc5MDAvd3MiLCJleHBpcmVzX2F0IjoxNzAwNjA0ODAwLCJtZXNoX3Jvb3Rfa2V5Ijoi'
    'ZEdWemRDMXRaWE5vTFhKdmIzUXRhMlY1Iiwicm9sZSI6Im1lbWJlciIsIm93bmVyX3B1YmtleSI6IjZlN2ExY2Rk'
    'MjliMGI3OGZkMTNhZjRjNTU5OGZlZmY0ZWYyYTk3MTY2ZTNjYTZmMmU0ZmJmY2NkODA1MDViZjEiLCJzaWduYXR1'
    'cmUiOiIzMjBiZTcxNDdlMzI5M2MzYzBhNzU5Y2FkOGUwYTJmNDAzOGY1MWI2NWYyOWE3NjhjNjcwY2M1NTExMWFm'
    'YmJhZDdkN2UzN2NhOGMyYjg1ZDg4ZWIwMWY3MWI3ZDcxZThjNWY4MDkwYzI0YjU5YmM5MzczZjUzMGRjYjRjYTMw'
    'MSJ9')
V2_TEXT = 'v=2|mesh-test|inv-1|1700604800|member|' + OWNER_PK
V2_SIG = ('f137945a822eb6def3438ba3d5adeb70276755c4d2fd7818cf5f81ac85eaec17'
          '2ca952ddf3fef53a6678e8acd1507f1a75ad3d631ba7d0592a843d0b166f9c00')


def _keys(byte):
    return crypto.keypair_from_seed(bytes([byte]) * 32)


class KeyVectorTest(unittest.TestCase):

    def test_derived_pubkeys(self):
        self.assertEqual(_keys(1)[0], MEMBER_PK)
        self.assertEqual(_keys(2)[0], SESSION_PK)
        self.assertEqual(_keys(3)[0], RECIPIENT_PK)
        self.assertEqual(_keys(5)[0], OWNER_PK)

    def test_secret_is_seed_then_pubkey(self):
        pub, sec = _keys(1)
        self.assertEqual(sec, '01' * 32 + MEMBER_PK)
        self.assertEqual(crypto.public_from_secret(sec), pub)

    def test_generate_keypair_shapes(self):
        pub, sec = crypto.generate_keypair()
        self.assertRegex(pub, r'^[0-9a-f]{64}$')
        self.assertRegex(sec, r'^[0-9a-f]{128}$')
        self.assertEqual(sec[64:], pub)

    def test_x25519_derivation(self):
        self.assertEqual(crypto.curve_secret_hex(_keys(2)[1]),
                         'a83c626bc9c38c8c201878ebb1d5b0b50ac40e8986c78793db1d4ef369fca14e')
        self.assertEqual(crypto.curve_public_hex(SESSION_PK),
                         '60346e7c911a5f6ba154129174cafe75b294ac3bbd5549632f48cec6266f8410')
        self.assertEqual(crypto.curve_public_hex(RECIPIENT_PK),
                         '75e270df2952c57ba8367ba8618c178f9fe50db2799d304e74e918d985686146')


class SignatureVectorTest(unittest.TestCase):

    def test_hello(self):
        text = crypto.member_hello_text('mesh-test', 'member-test', MEMBER_PK, 1700000000000)
        self.assertEqual(text, HELLO_TEXT)
        self.assertEqual(crypto.sign_hex(_keys(1)[1], text), HELLO_SIG)
        self.assertTrue(crypto.verify_hex(MEMBER_PK, text, HELLO_SIG))

    def test_integral_float_timestamp_renders_as_integer(self):
        text = crypto.member_hello_text('mesh-test', 'member-test', MEMBER_PK, 1.7e12)
        self.assertEqual(text, HELLO_TEXT)

    def test_attestation(self):
        self.assertEqual(crypto.attestation_text(MEMBER_PK, SESSION_PK, 1700043200000), ATTEST_TEXT)
        att = crypto.make_attestation(MEMBER_PK, _keys(1)[1], SESSION_PK, 1700043200000)
        self.assertEqual(list(att), ['sessionPubkey', 'parentMemberPubkey', 'expiresAt', 'signature'])
        self.assertEqual(att['signature'], ATTEST_SIG)
        self.assertTrue(crypto.verify_hex(MEMBER_PK, ATTEST_TEXT, ATTEST_SIG))

    def test_session_hello(self):
        text = crypto.session_hello_text('mesh-test', MEMBER_PK, SESSION_PK, 1700000000000)
        self.assertEqual(text, SESSION_HELLO_TEXT)
        self.assertEqual(crypto.sign_hex(_keys(2)[1], text), SESSION_HELLO_SIG)
        self.assertTrue(crypto.verify_hex(SESSION_PK, text, SESSION_HELLO_SIG))

    def test_verify_rejects_without_raising(self):
        self.assertFalse(crypto.verify_hex(SESSION_PK, HELLO_TEXT, HELLO_SIG))
        self.assertFalse(crypto.verify_hex(MEMBER_PK, HELLO_TEXT + 'x', HELLO_SIG))
        self.assertTrue(crypto.verify_hex(MEMBER_PK, HELLO_TEXT, HELLO_SIG.upper()))
        for pub, sig in [('zz', HELLO_SIG), (MEMBER_PK, 'zz'), (None, HELLO_SIG),
                         (MEMBER_PK, None), (12, 34), ('00' * 32, HELLO_SIG)]:
            self.assertFalse(crypto.verify_hex(pub, HELLO_TEXT, sig))

    def test_v1_invite(self):
        payload, token = crypto.mint_invite_v1('mesh-test', 'test-mesh', 'ws://localhost:7900/ws',
                                               1700604800, 'dGVzdC1tZXNoLXJvb3Qta2V5', 'member',
                                               OWNER_PK, _keys(5)[1])
        self.assertEqual(crypto.invite_v1_text(payload), V1_TEXT)
        self.assertEqual(payload['signature'], V1_SIG)
        self.assertEqual(token, V1_TOKEN)
        self.assertTrue(crypto.verify_hex(OWNER_PK, V1_TEXT, V1_SIG))
        decoded = json.loads(crypto.b64url_decode(V1_TOKEN))
        self.assertEqual(decoded, payload)

    def test_v2_invite(self):
        text = crypto.invite_v2_text('mesh-test', 'inv-1', 1700604800, 'member', OWNER_PK)
        self.assertEqual(text, V2_TEXT)
        self.assertEqual(crypto.sign_hex(_keys(5)[1], text), V2_SIG)
        self.assertTrue(crypto.verify_hex(OWNER_PK, V2_TEXT, V2_SIG))


class MessageVectorTest(unittest.TestCase):

    def test_dm_ciphertext(self):
        nonce, ct = crypto.seal_dm(b'hello mesh', RECIPIENT_PK, _keys(2)[1], nonce=b'\x04' * 24)
        # spec/wire.md §2.6 prints the nonce as 28 characters (21 bytes), a typo for 24 × 0x04,
        # whose base64 has 32 characters; the ciphertext below is the one for 24 × 0x04.
        self.assertEqual(nonce, 'BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE')
        self.assertEqual(ct, 'uyiJzb+01xTQMdNtLC9F0t1Mkw6GDs41dDk=')
        self.assertEqual(crypto.open_dm(nonce, ct, SESSION_PK, _keys(3)[1]), b'hello mesh')

    def test_dm_round_trip_and_failures(self):
        nonce, ct = crypto.seal_dm('héllo'.encode('utf-8'), RECIPIENT_PK, _keys(2)[1])
        self.assertEqual(crypto.open_dm(nonce, ct, SESSION_PK, _keys(3)[1]), 'héllo'.encode('utf-8'))
        with self.assertRaises(crypto.DecryptError):
            crypto.open_dm(nonce, ct, SESSION_PK, _keys(1)[1])      # wrong recipient key
        with self.assertRaises(crypto.DecryptError):
            crypto.open_dm(nonce, ct, MEMBER_PK, _keys(3)[1])       # wrong sender key
        with self.assertRaises(crypto.DecryptError):
            crypto.open_dm('!!', ct, SESSION_PK, _keys(3)[1])       # not base64
        with self.assertRaises(crypto.DecryptError):
            crypto.open_dm('AAAA', ct, SESSION_PK, _keys(3)[1])     # short nonce
        with self.assertRaises(crypto.DecryptError):
            crypto.open_dm(nonce, ct, 'zz', _keys(3)[1])            # bad pubkey

    def test_broadcast_encoding(self):
        nonce, ct = crypto.encode_plain(b'hello everyone')
        self.assertEqual(ct, 'aGVsbG8gZXZlcnlvbmU=')
        self.assertEqual(len(crypto.b64url_decode(nonce.replace('+', '-').replace('/', '_'))), 24)
        self.assertEqual(crypto.decode_plain(ct), b'hello everyone')
        with self.assertRaises(crypto.DecryptError):
            crypto.decode_plain('not base64!')

    def test_request_fingerprints(self):
        self.assertEqual(crypto.request_fingerprint(RECIPIENT_PK, 'next', 'hello mesh'),
                         'f025c6e13876deafa7d0ac8501820b291a4eaf7181de478be6e69257c0cbc80f')
        self.assertEqual(crypto.request_fingerprint('*', 'next', 'hello everyone'),
                         'd3454be1f0268ac3d61ef1a12675b5eb4568bb5e479774e1fce0405f6e073c22')


if __name__ == '__main__':
    unittest.main()
