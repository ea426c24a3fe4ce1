"""v1 invites on the broker side: minting (broker-admin) and `POST /join` (spec/wire.md §9.2, §11.7).

The join steps, their order and their error strings are the reference's; steps 5 and 6 share
one transaction, so a failed member insert never consumes an invite use.
"""
import datetime
import logging

from meshd import clock, crypto
from meshd.broker import protocol
from meshd.broker.models import Invite, Member, Mesh, dumps, loads

log = logging.getLogger(__name__)

REQUIRED_FIELDS_ERROR = 'invite_token, invite_payload, peer_pubkey, display_name required'
BAD_PUBKEY_ERROR = 'peer_pubkey must be 64 hex chars (32 bytes)'


def mint(store, mesh, broker_url, expires_at_s, role='member', max_uses=1, preset=None,
         with_code=False,
         now=None):
    """Create a v1 invite row for `mesh`; return (link, token, code).

    A v1 token is a deterministic function of its fields, so two invites minted in the same
    second with the same fields would be the same token: such a mint expires one second
    earlier instead, until its token is new.
    """
    while True:
        payload, token = crypto.mint_invite_v1(mesh.id, mesh.slug, broker_url, expires_at_s,
                                               mesh.root_key, role, mesh.owner_pubkey,
                                               mesh.owner_secret_key)
        if Invite.get_or_none(Invite.token == token) is None:
            break
        expires_at_s -= 1
    code = protocol.new_id(8) if with_code else None
    now = now or clock.utcnow()
    with store.writing():
        Invite.create(
            id=protocol.new_id(), mesh_id=mesh.id, token=token,
            token_bytes=crypto.invite_v1_text(payload), code=code, max_uses=max_uses,
            used_count=0, role=role, preset=dumps(preset or {}),
            expires_at=datetime.datetime.utcfromtimestamp(expires_at_s), created_by='broker-admin',
            created_at=now, version=1)
    return 'ic://join/' + token, token, code


def _error(message, status=400):
    return status, {'ok': False, 'error': message}


def join(store, body, now=None):
    """Handle a parsed `POST /join` body; return (HTTP status, response dict)."""
    if not isinstance(body, dict):
        return _error(REQUIRED_FIELDS_ERROR)
    token, payload = body.get('invite_token'), body.get('invite_payload')
    pubkey, name = body.get('peer_pubkey'), body.get('display_name')
    if not token or not payload or not pubkey or not name or not isinstance(payload, dict):
        return _error(REQUIRED_FIELDS_ERROR)
    if not crypto.is_hex64(pubkey, any_case=True):
        return _error(BAD_PUBKEY_ERROR)
    pubkey = pubkey.lower()
    now = now or clock.utcnow()
    # 1. the owner's signature over the canonical string rebuilt from the payload
    try:
        text = crypto.invite_v1_text(payload)
    except KeyError:
        return _error('invite_bad_signature')
    if not crypto.verify_hex(payload.get('owner_pubkey'), text, payload.get('signature')):
        return _error('invite_bad_signature')
    # 2. the mesh and its owner key
    mesh = Mesh.live(payload['mesh_id']) if isinstance(payload.get('mesh_id'), str) else None
    if mesh is None:
        return _error('mesh_not_found')
    if not mesh.owner_pubkey:
        return _error('mesh_missing_owner_key')
    if mesh.owner_pubkey != payload.get('owner_pubkey'):
        return _error('invite_owner_mismatch')
    # 3. the invite row
    invite = Invite.get_or_none(Invite.token == token) if isinstance(token, str) else None
    if invite is None:
        return _error('invite_not_found')
    if invite.mesh_id != mesh.id:
        return _error('invite_mesh_mismatch')
    if invite.revoked_at is not None:
        return _error('invite_revoked')
    if invite.expires_at < now:
        return _error('invite_expired')
    # 4. already a member: no use consumed
    existing = Member.active(mesh.id, pubkey)
    if existing is not None:
        return 200, {'ok': True, 'memberId': existing.id, 'alreadyMember': True}
    # 5 and 6 in one transaction
    preset = loads(invite.preset, {})
    role = payload.get('role') if payload.get('role') in ('admin', 'member') else 'member'
    member_id = protocol.new_id()
    with store.writing():
        if not Invite.take_use(invite.id):
            return _error('invite_exhausted')
        try:
            with store.database.atomic():
                Member.enrol(
                    id=member_id, mesh_id=mesh.id, peer_pubkey=pubkey,
                    display_name=preset.get('displayName') or str(name), role=role,
                    role_tag=preset.get('roleTag'),
                    default_groups=dumps(preset.get('groups') or []),
                    message_mode=preset.get('messageMode') or 'push', joined_at=now,
                    peer_grants='{}')
        except Exception:
            log.exception('member insert failed')
            raise _InsertFailed()
    log.info('member %s joined mesh %s', member_id, mesh.slug)
    return 200, {'ok': True, 'memberId': member_id}


class _InsertFailed(Exception):
    """Raised inside the join transaction so that the use counter rolls back."""


def join_safely(store, body, now=None):
    """join(), mapping a failed insert to `member_insert_failed` (the transaction rolled back)."""
    try:
        return join(store, body, now=now)
    except _InsertFailed:
        return _error('member_insert_failed')


def code_lookup(code):
    """`GET /api/public/invite-code/:code` → {found, token?}."""
    invite = Invite.get_or_none(Invite.code == code)
    if invite is None or invite.revoked_at is not None:
        return {'found': False}
    return {'found': True, 'token': invite.token}
