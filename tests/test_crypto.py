"""meshd.crypto reproduces every test vector of spec/wire.md §2.6."""
import json
import unittest

from meshd import crypto
from tests.vectors import (ATTEST_SIG, ATTEST_TEXT, HELLO_SIG, HELLO_TEXT, MEMBER_PK, OWNER_PK,
                           RECIPIENT_PK, SESSION_HELLO_SIG, SESSION_HELLO_TEXT, SESSION_PK,
                           V1_SIG, V1_TEXT, V1_TOKEN, V2_SIG, V2_TEXT)


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
