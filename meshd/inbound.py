"""What the daemon does with a push from a broker (spec/daemon.md §7).

A message is decrypted with the session key, then the member key; a multicast body is
base64 plaintext. The row is recipient-scoped by the key that opened it and deduplicated on
(mesh, sender, client_message_id, recipient), so the copies the broker fans out to every
link of a member become one row, and no sender can suppress another's message by reusing
its id (DESIGN.md 6). A push carries no target, so a plaintext body cannot be told from a
broadcast by its frame: only a body that opened with crypto_box from the stated sender is
`e2e`, and every other row is shown as a broadcast, never as a private message. The
client_ack goes out after the inbox commit, for duplicates too, so the broker stops
re-pushing; the event is published only for a new row.
"""
import base64
import binascii
import json
import logging
import uuid

from storage.models import Inbox

from meshd import clock, crypto

log = logging.getLogger(__name__)

_SYSTEM_KINDS = {'peer_joined': 'peer_join', 'peer_returned': 'peer_join',
                 'peer_left': 'peer_leave'}


def _text(value):
    return value if isinstance(value, str) and value != '' else None


def _key(value):
    return value.lower() if isinstance(value, str) and len(value) == 64 else None


class Inbound:
    """Stores, acknowledges and publishes what the broker links receive.

    `store` holds the inbox, `bus` publishes events, and `is_own_pubkey(key, slug)` tells
    the daemon's own keys (its sessions joining or leaving are not news).
    """

    def __init__(self, store, bus, is_own_pubkey, directory):
        self.store = store
        self.bus = bus
        self.is_own_pubkey = is_own_pubkey
        self.directory = directory

    def handle_push(self, link, frame, session_secret=None):
        """Store, acknowledge and publish one push that arrived on `link`."""
        if frame.get('subtype') == 'system' or frame.get('senderPubkey') == 'system':
            self._system(link, frame)
            return
        if frame.get('type') != 'push':
            return  # `inbound` is accepted by the links but carries nothing to store
        mesh = link.mesh
        sender = (_text(frame.get('senderPubkey')) or '').lower()
        nonce, ciphertext = _text(frame.get('nonce')), _text(frame.get('ciphertext'))
        body, recipient_kind, recipient_pubkey, failed, sealed = _open(
            mesh, link, sender, nonce, ciphertext, session_secret)
        broker_id = _text(frame.get('messageId'))
        # A DM push carries no name: the address book knows who the key was at receipt.
        known_name, known_member = self.directory.sender(mesh['slug'], sender)
        sender_name = _text(frame.get('senderName')) or known_name or sender[:8]
        sender_member = _key(frame.get('senderMemberPubkey')) or known_member
        cmid = _text(frame.get('client_message_id')) or broker_id or str(uuid.uuid4())
        created_at = _text(frame.get('createdAt'))
        row = dict(id=str(uuid.uuid4()), client_message_id=cmid, broker_message_id=broker_id,
                   mesh=mesh['slug'], topic=_text(frame.get('topic')), sender_pubkey=sender,
                   sender_name=sender_name, sender_member_pubkey=sender_member, body=body,
                   meta=json.dumps({'created_at': created_at}) if created_at else None,
                   received_at=clock.now_ms(), reply_to_id=_text(frame.get('replyToId')),
                   recipient_pubkey=recipient_pubkey, recipient_kind=recipient_kind,
                   decrypt_failed=1 if failed else 0, e2e=1 if sealed else 0,
                   priority=_priority(frame))

        def store():
            if Inbox.insert_if_new(row):
                return self.bus.append('message', _event_data(row, frame))
            return None  # a duplicate: the row is already there
        event = self.store.write(store)
        if failed:
            log.warning('inbox_decrypt_failed', extra={'fields': {
                'mesh': mesh['slug'], 'sender': sender[:12], 'recipient_kind': recipient_kind}})
        if event is not None:
            self.bus.deliver(event)
        # After the commit, duplicates included: without it the broker re-pushes forever.
        link.client_ack(_text(frame.get('client_message_id')), broker_id)

    def _system(self, link, frame):
        if link.kind != 'member':
            return
        event = frame.get('event')
        if not isinstance(event, str):
            return
        event_data = frame.get('eventData') if isinstance(frame.get('eventData'), dict) else {}
        pubkey = event_data.get('pubkey')
        link.forget_roster()  # a peer came, went or changed: the next resolution reads afresh
        self.directory.learn_event(link.mesh['slug'], event_data)
        if isinstance(pubkey, str) and pubkey and self.is_own_pubkey(pubkey, link.mesh['slug']):
            return  # our own sessions joining or leaving (1.34.9)
        # The broker's fields first, ours last: eventData must not move the event to another
        # mesh (the per-session stream filter keys on `mesh`).
        data = dict(event_data)
        data.update(mesh=link.mesh['slug'], event=event)
        self.bus.publish(_SYSTEM_KINDS.get(event, 'system'), data)


def _open(mesh, link, sender, nonce, ciphertext, session_secret):
    """(body, recipient_kind, recipient_pubkey, decrypt_failed, e2e) per spec/daemon.md §7.2."""
    member = ('member', mesh['pubkey'])
    if ciphertext is None:
        return (None,) + member + (False, False)
    if nonce and sender and sender != 'system':
        if session_secret is not None:
            try:
                plain = crypto.open_dm(nonce, ciphertext, sender, session_secret)
                return (plain.decode('utf-8', 'replace'), 'session',
                        link.pubkey, False, True)
            except crypto.DecryptError:
                pass
        try:
            plain = crypto.open_dm(nonce, ciphertext, sender, mesh['secretKey'])
            return (plain.decode('utf-8', 'replace'),) + member + (False, True)
        except crypto.DecryptError:
            pass
    try:
        # Multicast bodies are base64 plaintext; the decode is strict so that a sealed DM
        # that could not be opened is flagged instead of stored as garbage.
        plain = base64.b64decode(ciphertext, validate=True).decode('utf-8')
        return (plain,) + member + (False, False)
    except (binascii.Error, ValueError):
        return (None, link.kind, link.pubkey, True, False)


def _priority(frame):
    """The push's priority; anything but now or low reads as next (spec/wire.md §7.5)."""
    priority = frame.get('priority')
    return priority if priority in ('now', 'next', 'low') else 'next'


def _event_data(row, frame):
    data = {'id': row['id'], 'mesh': row['mesh'], 'client_message_id': row['client_message_id'],
            'broker_message_id': row['broker_message_id'], 'sender_pubkey': row['sender_pubkey'],
            'sender_member_pubkey': row['sender_member_pubkey'],
            'sender_name': row['sender_name'], 'topic': row['topic'],
            'reply_to_id': row['reply_to_id'], 'priority': row['priority'],
            'body': row['body'], 'created_at': _text(frame.get('createdAt')),
            'recipient_pubkey': row['recipient_pubkey'],
            'recipient_kind': row['recipient_kind'],
            'decrypt_failed': bool(row['decrypt_failed']), 'e2e': bool(row['e2e'])}
    if _text(frame.get('subtype')):
        data['subtype'] = frame['subtype']
    return data
