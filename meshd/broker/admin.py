"""`meshd broker-admin` operations on the broker's database (spec/wire.md §11.7).

Each function returns the JSON object the command prints, or raises AdminError with the one-line
message the command prints as `error: <message>`. They work whether or not the broker runs: the
broker reads mesh, member and invite rows at every hello and /join, so changes apply at once.
"""
import json
import os
import pwd
import re
import time

from meshd import clock, crypto
from meshd.broker import invite as invite_mod
from meshd.broker import protocol, store as broker_store
from meshd.broker.models import Member, Mesh, dumps, loads
from meshd.exceptions import AdminError

MAX_SLUG = 48
DEFAULT_INVITE_TTL = 7 * 86400


def check_owner(url):
    """Refuse to work on an SQLite database (or its directory) owned by another user."""
    path = broker_store.sqlite_path(url or broker_store.default_path())
    if path is None:
        return      # PostgreSQL: its own roles decide
    probe = path if os.path.exists(path) else os.path.dirname(os.path.abspath(path))
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and os.stat(probe).st_uid != os.geteuid():
        raise AdminError('%s belongs to %s; run broker-admin as that user (e.g. sudo -u %s)'
                         % (probe, _user(os.stat(probe).st_uid), _user(os.stat(probe).st_uid)))


def _user(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return 'uid %d' % uid


def slugify(name):
    """Lowercase, runs outside [a-z0-9] become '-', trimmed of '-', at most 48 characters."""
    slug = re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')[:MAX_SLUG].strip('-')
    return slug or 'mesh'


def parse_groups(value):
    """`G[:ROLE],…` → [{name, role?}]."""
    groups = []
    for item in (value or '').split(','):
        item = item.strip()
        if not item:
            continue
        name, _, role = item.partition(':')
        group = {'name': name.lstrip('@')}
        if role:
            group['role'] = role
        groups.append(group)
    return groups


def _pubkey(value):
    if not crypto.is_hex64(value, any_case=True):
        raise AdminError('pubkey must be 64 hex chars (32 bytes)')
    return value.lower()


def find_mesh(ref):
    """A mesh by slug or id, or AdminError."""
    mesh = Mesh.by_ref(ref)
    if mesh is None:
        raise AdminError('mesh not found: %s' % ref)
    return mesh


def _find_member(mesh, ref):
    M = Member
    member = (M.select()
              .where((M.mesh_id == mesh.id) & ((M.id == ref) | (M.peer_pubkey == ref.lower())))
              .order_by(M.revoked_at.is_null(False), M.joined_at)
              .first())
    if member is None:
        raise AdminError('member not found: %s' % ref)
    return member


def create_mesh(store, name, slug=None, admin_pubkey=None, admin_name=None):
    """Create a mesh with a fresh owner keypair and root key (and optionally its admin member)."""
    if not name:
        raise AdminError('--name is required')
    slug = slug or slugify(name)
    if admin_pubkey is not None:
        admin_pubkey = _pubkey(admin_pubkey)
    if Mesh.get_or_none(Mesh.slug == slug) is not None:
        raise AdminError('slug already taken: %s' % slug)
    owner_pub, owner_sec = crypto.generate_keypair()
    now = clock.utcnow()
    mesh_id = protocol.new_id()
    result = {'id': mesh_id, 'slug': slug, 'name': name, 'owner_pubkey': owner_pub}
    with store.writing():
        Mesh.create(id=mesh_id, name=name, slug=slug, owner_pubkey=owner_pub,
                    owner_secret_key=owner_sec, root_key=crypto.b64url_nopad(os.urandom(32)),
                    self_editable=dumps(protocol.DEFAULT_SELF_EDITABLE), created_at=now)
        if admin_pubkey is not None:
            member_id = protocol.new_id()
            Member.enrol(id=member_id, mesh_id=mesh_id, peer_pubkey=admin_pubkey,
                         display_name=admin_name or '%s-owner' % name, role='admin',
                         joined_at=now)
            result['admin_member_id'] = member_id
    return result


def add_member(store, mesh, pubkey, name, role='member', role_tag=None, groups=None, broker_url=None):
    """Register an existing Ed25519 pubkey as a member; idempotent for an active member."""
    mesh = find_mesh(mesh)
    pubkey = _pubkey(pubkey)
    if role not in ('member', 'admin'):
        raise AdminError('--role must be member or admin')
    result = {'meshId': mesh.id}
    existing = Member.active(mesh.id, pubkey)
    if existing is not None:
        result.update(memberId=existing.id, slug=mesh.slug, name=mesh.slug, alreadyMember=True)
    else:
        member_id = protocol.new_id()
        with store.writing():
            Member.enrol(id=member_id, mesh_id=mesh.id, peer_pubkey=pubkey,
                         display_name=name or pubkey[:8], role=role, role_tag=role_tag,
                         default_groups=dumps(parse_groups(groups)), joined_at=clock.utcnow())
        result.update(memberId=member_id, slug=mesh.slug, name=mesh.slug)
    if broker_url:
        result['brokerUrl'] = broker_url
    return result


def check_broker_url(url):
    """Invites sign the URL clients reach: a ws:// or wss:// URL whose path is /ws."""
    if not url:
        raise AdminError('--broker-url (or MESHD_BROKER_URL) is required')
    match = re.match(r'^wss?://[^/?#]+(/[^?#]*)?$', url)
    if not match or match.group(1) != '/ws':
        raise AdminError('--broker-url must be a ws:// or wss:// URL ending in /ws: %s' % url)
    return url


def invite(store, mesh, broker_url, role='member', expires=DEFAULT_INVITE_TTL, max_uses=1, name=None,
           role_tag=None, groups=None, code=False):
    """Mint a v1 invite; return {link, token, code?, expires_at, max_uses, role}."""
    mesh = find_mesh(mesh)
    broker_url = check_broker_url(broker_url)
    if role not in ('member', 'admin'):
        raise AdminError('--role must be member or admin')
    if int(max_uses) < 1:
        raise AdminError('--max-uses must be at least 1')
    preset = {}
    if name:
        preset['displayName'] = name
    if role_tag:
        preset['roleTag'] = role_tag
    if groups:
        preset['groups'] = parse_groups(groups)
    expires_at = int(time.time()) + int(expires)
    link, token, invite_code = invite_mod.mint(store, mesh, broker_url, expires_at, role=role,
                                               max_uses=int(max_uses), preset=preset,
                                               with_code=bool(code))
    result = {'link': link, 'token': token}
    if invite_code:
        result['code'] = invite_code
    # The token carries the expiry it was minted with (a same-second twin expires earlier).
    expires_at = json.loads(crypto.b64url_decode(token).decode('utf-8'))['expires_at']
    result.update(expires_at=expires_at, max_uses=int(max_uses), role=role)
    return result


def list_(store, mesh=None):
    """Meshes, or the members of one mesh."""
    if mesh is None:
        return {'meshes': [{'id': m.id, 'slug': m.slug, 'name': m.name, 'owner_pubkey': m.owner_pubkey,
                            'members': len(Member.active_in(m.id))}
                           for m in Mesh.select().order_by(Mesh.created_at)]}
    mesh = find_mesh(mesh)
    members = [{'id': m.id, 'display_name': m.display_name, 'pubkey': m.peer_pubkey, 'role': m.role,
                'revoked': m.revoked_at is not None}
               for m in Member.select().where(Member.mesh_id == mesh.id)
               .order_by(Member.joined_at)]
    return {'mesh': mesh.slug, 'members': members}


def revoke_member(store, mesh, member):
    """Set revoked_at; the running broker closes the member's sockets with 4002 within a sweep."""
    mesh = find_mesh(mesh)
    row = _find_member(mesh, member)
    if row.revoked_at is None:
        with store.writing():
            Member.revoke(row.id, clock.utcnow())
    return {'meshId': mesh.id, 'memberId': row.id, 'revoked': True}


def grant(store, mesh, member, sender, caps):
    """Edit the recipient member's peer_grants for one sender key (`none` blocks, `default` resets)."""
    mesh = find_mesh(mesh)
    row = _find_member(mesh, member)
    sender = _pubkey(sender)
    grants = loads(row.peer_grants, {})
    if caps == 'default':
        grants.pop(sender, None)
    elif caps == 'none':
        grants[sender] = []
    else:
        grants[sender] = [c.strip() for c in (caps or '').split(',') if c.strip()]
        if not grants[sender]:
            raise AdminError('--caps must be a list, none or default')
    with store.writing():
        Member.set_grants(row.id, grants)
    return {'meshId': mesh.id, 'memberId': row.id, 'grants': grants}


def parse_expiry(value):
    """`7d`/`12h`/`30m`/seconds → seconds."""
    match = re.match(r'^\s*(\d+)\s*([dhms]?)\s*$', str(value))
    if not match:
        raise AdminError('--expires must be <n>d, <n>h, <n>m or seconds')
    return int(match.group(1)) * {'d': 86400, 'h': 3600, 'm': 60, 's': 1, '': 1}[match.group(2)]

