"""The client side of joining a mesh with a v1 invite (spec/wire.md §9.2, §11.8).

`parse_invite()` accepts the link forms of §9.2 and applies the client checks (version, fields,
shapes, expiry, the owner's signature); `enroll()` completes `POST /join` with a member pubkey
generated locally by the caller and returns the fields of a config.json mesh entry, without the
secret key (the caller adds it). Every failure is an InviteError whose text is one clear line.
urllib is used for HTTP; entry points patch it for gevent.
"""
import datetime
import json
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from meshd import crypto
from meshd.exceptions import InviteError, MalformedInvite

JOIN_TIMEOUT = 10
RAW_TOKEN = re.compile(r'^[A-Za-z0-9_-]{21,}={0,2}$')
PAYLOAD_KEYS = ('v', 'mesh_id', 'mesh_slug', 'broker_url', 'expires_at', 'mesh_root_key', 'role',
                'owner_pubkey', 'signature')
LOOPBACK_NAMES = ('localhost', 'localhost.localdomain', 'ip6-localhost')


def _token_from_link(link):
    link = (link or '').strip()
    if link.startswith('ic://join/'):
        return link[len('ic://join/'):].strip('/')
    parsed = urllib.parse.urlparse(link)
    if parsed.scheme in ('http', 'https'):
        match = re.search(r'/join/([^/?#]+)', parsed.path)
        if match:
            return match.group(1)
        match = re.search(r'/i/([A-Za-z0-9]+)/?$', parsed.path)
        if match:
            return _resolve_code(parsed.netloc, match.group(1))
        raise MalformedInvite('not an invite link: %s' % link)
    if RAW_TOKEN.match(link):
        return link
    if re.match(r'^[A-Za-z0-9]{6,16}$', link):
        raise MalformedInvite('v2 invites are not supported; ask for an ic://join/ link')
    raise MalformedInvite('not an invite link (expected ic://join/<token>)')


def _resolve_code(host, code, timeout=JOIN_TIMEOUT):
    """`/i/<code>` links: ask `GET https://<host>/api/public/invite-code/<code>` (always https)."""
    url = 'https://%s/api/public/invite-code/%s' % (host, code)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            answer = json.loads(response.read().decode('utf-8'))
    except (urllib.error.URLError, socket.error, ValueError) as exc:
        raise InviteError('cannot resolve invite code at %s: %s' % (host, getattr(exc, 'reason', exc)))
    if not isinstance(answer, dict) or not answer.get('found') or not isinstance(answer.get('token'), str):
        raise InviteError('invite code not found: %s' % code)
    return answer['token']


def parse_invite(link, now=None):
    """Decode and check an invite link; return {token, payload, mesh_id, mesh_slug, broker_url,…}.

    Accepts `ic://join/<token>`, `https://host[/xx]/join/<token>`, a raw token, and
    `https://host/i/<code>` (resolved over https, the only form that touches the network).
    Raises InviteError for a malformed link, a bad signature or an expired invite.
    """
    token = _token_from_link(link)
    try:
        payload = json.loads(crypto.b64url_decode(token).decode('utf-8'))
    except (ValueError, UnicodeDecodeError):
        raise MalformedInvite('invite token is not valid base64url JSON')
    if not isinstance(payload, dict):
        raise MalformedInvite('invite token is not a JSON object')
    if payload.get('v') != 1:
        raise MalformedInvite('unsupported invite version: %r (only v1 links are supported)'
                          % payload.get('v'))
    missing = [k for k in PAYLOAD_KEYS if payload.get(k) in (None, '')]
    if missing:
        raise MalformedInvite('invite is missing %s' % ', '.join(missing))
    if not crypto.is_hex64(payload['owner_pubkey'], any_case=True):
        raise MalformedInvite('invite owner_pubkey is not 64 hex characters')
    if not crypto.is_hex128(payload['signature'], any_case=True):
        raise MalformedInvite('invite signature is not 128 hex characters')
    if crypto.js_integer(payload['expires_at']) is None:
        raise MalformedInvite('invite expires_at is not an integer')
    now = time.time() if now is None else now
    if payload['expires_at'] < int(now):
        raise InviteError('invite expired on %s' % datetime.datetime.fromtimestamp(
            payload['expires_at'], datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))
    if not crypto.verify_hex(payload['owner_pubkey'], crypto.invite_v1_text(payload),
                             payload['signature']):
        raise InviteError('invite signature does not verify')
    broker_url = payload['broker_url']
    if not re.match(r'^wss?://', str(broker_url)):
        raise MalformedInvite('invite broker_url is not a ws:// or wss:// URL')
    return {'token': token, 'payload': payload, 'mesh_id': payload['mesh_id'],
            'mesh_slug': payload['mesh_slug'], 'broker_url': broker_url,
            'root_key': payload['mesh_root_key'], 'role': payload['role'],
            'expires_at': payload['expires_at']}


def http_base(broker_url):
    """`wss://host[:port]/ws` → `https://host[:port]`, `ws://` → `http://` (path dropped)."""
    parsed = urllib.parse.urlparse(broker_url)
    scheme = {'wss': 'https', 'ws': 'http'}.get(parsed.scheme)
    if scheme is None or not parsed.netloc:
        raise InviteError('not a broker URL: %s' % broker_url)
    return '%s://%s' % (scheme, parsed.netloc)


def is_insecure_remote(broker_url):
    """True for a `ws://` URL whose host is not loopback (traffic and keys' use unencrypted)."""
    parsed = urllib.parse.urlparse(broker_url or '')
    if parsed.scheme != 'ws':
        return False
    host = (parsed.hostname or '').lower()
    return not (host in LOOPBACK_NAMES or host.endswith('.localhost') or host == '::1'
                or host.startswith('127.'))


def enroll(invite, member_pubkey, display_name, timeout=JOIN_TIMEOUT):
    """`POST /join` for a parsed invite; return a config.json mesh entry without `secretKey`.

    `invite` is parse_invite()'s result (or a link, parsed here). Raises InviteError with the
    broker's error string (`invite_expired`, `invite_exhausted`, …) or the network failure.
    """
    if isinstance(invite, str):
        invite = parse_invite(invite)
    body = json.dumps({'invite_token': invite['token'], 'invite_payload': invite['payload'],
                       'peer_pubkey': member_pubkey, 'display_name': display_name}).encode('utf-8')
    url = http_base(invite['broker_url']) + '/join'
    request = urllib.request.Request(url, data=body, method='POST',
                                     headers={'Content-Type': 'application/json'})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read().decode('utf-8'))
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read().decode('utf-8')).get('error')
        except (ValueError, AttributeError):
            error = None
        raise InviteError('broker refused the invite: %s' % (error or 'HTTP %d' % exc.code))
    except (urllib.error.URLError, socket.error, ValueError) as exc:
        reason = getattr(exc, 'reason', exc)
        raise InviteError('cannot reach broker at %s: %s' % (url, reason))
    if not isinstance(answer, dict) or not answer.get('ok') or not answer.get('memberId'):
        raise InviteError('broker refused the invite: %s' % (
            answer.get('error') if isinstance(answer, dict) else 'unexpected answer'))
    joined_at = datetime.datetime.now(datetime.timezone.utc)
    entry = {
        'meshId': invite['mesh_id'],
        'memberId': answer['memberId'],
        'slug': invite['mesh_slug'],
        'name': invite['mesh_slug'],
        'pubkey': member_pubkey,
        'brokerUrl': invite['broker_url'],
        'joinedAt': joined_at.strftime('%Y-%m-%dT%H:%M:%S.') + '%03dZ' % (joined_at.microsecond // 1000),
        'rootKey': invite['root_key'],
    }
    return entry
