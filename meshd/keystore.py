"""Per-session keypairs, persisted per (mesh, session UUID) (spec/daemon.md §4.6).

A relaunch or `--resume` of the same session reuses its keypair, so queued DMs sealed to
the old public key stay readable and no second presence appears for the same session.
"""
import json
import logging
import os
import re
import secrets

from meshd import crypto, files
from meshd.clock import iso_now

log = logging.getLogger(__name__)

_SLUG = re.compile(r'^[a-z0-9._-]+$', re.IGNORECASE)
_UUID = re.compile(r'^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$',
                   re.IGNORECASE)


class SessionKeypair:
    """A session's ed25519 keypair; `persisted` is False for an ephemeral one."""

    def __init__(self, public_key, secret_key, persisted):
        self.public_key = public_key
        self.secret_key = secret_key
        self.persisted = persisted


def is_valid_identifiers(mesh, session_id):
    """The path-traversal guard: a slug and a UUID, nothing else reaches the file system."""
    return (isinstance(mesh, str) and bool(_SLUG.match(mesh)) and mesh not in ('.', '..')
            and isinstance(session_id, str) and bool(_UUID.match(session_id)))


def _read_valid(path):
    try:
        with open(path, 'r', encoding='utf-8') as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    if (isinstance(record, dict) and crypto.is_hex64(record.get('publicKey'))
            and crypto.is_hex128(record.get('secretKey'))):
        return SessionKeypair(record['publicKey'], record['secretKey'], True)
    return None


def _write(path, record):
    """Write `record` through an O_EXCL temporary file and a rename (0600 from creation)."""
    files.ensure_private_dir(os.path.dirname(path))
    tmp = '%s.%s.tmp' % (path, secrets.token_hex(6))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, files.PRIVATE_FILE)
    with os.fdopen(fd, 'w') as handle:
        json.dump(record, handle, separators=(',', ':'))
    return tmp


def _record(mesh, session_id, public, secret):
    return {'version': 1, 'meshSlug': mesh, 'sessionId': session_id, 'publicKey': public,
            'secretKey': secret, 'createdAt': iso_now()}


def remember(paths, mesh, session_id, public, secret):
    """Persist a keypair a client registered with, so a restart revives the same key.

    Returns True when the file now holds this keypair. Invalid identifiers write nothing.
    """
    if not is_valid_identifiers(mesh, session_id):
        return False
    path = paths.session_keypair(mesh, session_id)
    existing = _read_valid(path)
    if existing is not None and existing.public_key == public:
        return True
    try:
        os.rename(_write(path, _record(mesh, session_id, public, secret)), path)
    except OSError as exc:
        log.warning('session_keypair_write_failed', extra={'fields': {'mesh': mesh,
                                                                      'err': str(exc)}})
        return False
    return True


def load_or_create(paths, mesh, session_id):
    """The persisted keypair of (mesh, session_id), created on first use.

    Invalid identifiers get an ephemeral keypair and nothing is written. I/O failures still
    return a usable in-memory keypair: a launch is never blocked by the key store.
    """
    if not is_valid_identifiers(mesh, session_id):
        public, secret = crypto.generate_keypair()
        return SessionKeypair(public, secret, False)
    path = paths.session_keypair(mesh, session_id)
    existing = _read_valid(path)
    if existing is not None:
        return existing
    public, secret = crypto.generate_keypair()
    try:
        tmp = _write(path, _record(mesh, session_id, public, secret))
        winner = _read_valid(path)
        if winner is not None:  # a concurrent launch wrote first: converge on its keypair
            os.unlink(tmp)
            return winner
        os.rename(tmp, path)
    except OSError as exc:
        log.warning('session_keypair_write_failed', extra={'fields': {'mesh': mesh,
                                                                      'err': str(exc)}})
        return SessionKeypair(public, secret, False)
    return SessionKeypair(public, secret, True)
