"""session.attach and sessions.* (spec/daemon.md §4.2, §8.2)."""
import logging

from rpc.protocol import AUTH_ERROR, NOT_FOUND, RpcError, invalid_params

from meshd import crypto, procs
from meshd.api.common import token as valid_token
from meshd.sessions import SessionInfo

log = logging.getLogger(__name__)


class SessionMethods:
    """Registering, attaching and listing sessions of `registry` (meshd/sessions.py)."""

    def __init__(self, registry):
        self.registry = registry

    def handlers(self):
        return [
            ('session.attach', self.session_attach,
             {'result': '{ok, token_prefix, session_id, mesh, presence}'}),
            ('sessions.register', self.sessions_register,
             {'result': '{ok, registered_at, presence_accepted}'}),
            ('sessions.deregister', self.sessions_deregister, {'result': '{ok, token_prefix}'}),
            ('sessions.me', self.sessions_me, {'session': 'required', 'result': '{session}'}),
            ('sessions.list', self.sessions_list, {'result': '{sessions:[…]}'}),
        ]

    def session_attach(self, ctx, token: str):
        """Bind this connection to a registered session; later calls act as that session."""
        token = valid_token(token, 'token must be 64 hex chars')
        info = self.registry.resolve(token)
        if info is None:
            raise RpcError.of(AUTH_ERROR, 'no_session', 'unknown session token')
        ctx.conn.session_token = token
        return {'ok': True, 'token_prefix': info.token_prefix, 'session_id': info.session_id,
                'mesh': info.mesh, 'presence': info.presence is not None}

    def sessions_register(self, ctx, token: str = None, session_id: str = None,
                          mesh: str = None, display_name: str = None, pid: int = None,
                          cwd: str = None, role: str = None, groups: list = None,
                          presence: dict = None, replace: bool = False):
        """Register an agent session (its token, mesh binding, pid and optional presence)."""
        token = valid_token(token, 'token must be 64 hex chars')
        if not (session_id and mesh and display_name and pid):
            raise invalid_params('session_id, mesh, display_name, pid all required')
        if not 0 < pid <= procs.MAX_PID:
            raise invalid_params("'pid' must be a process id (1 to %d)" % procs.MAX_PID)
        if groups is not None and not all(isinstance(g, str) for g in groups):
            raise invalid_params("'groups' must be an array of strings")
        accepted = None
        if presence is not None:
            accepted = _valid_presence(presence)
            if accepted is None:
                log.warning('session_register_presence_malformed',
                            extra={'fields': {'mesh': mesh}})
        info = SessionInfo(token, session_id, mesh, display_name, pid, cwd=cwd, role=role,
                           groups=groups, presence=accepted)
        stored = self.registry.admit(info, replace=replace)
        return {'ok': True, 'registered_at': stored.registered_at,
                'presence_accepted': accepted is not None}

    def sessions_deregister(self, ctx, token: str = None):
        """Deregister the session of `token`."""
        token = valid_token(token, 'invalid token')
        if not self.registry.deregister(token):
            raise RpcError.of(NOT_FOUND, 'session_not_found', 'session not found',
                              token_prefix=token[:8])
        return {'ok': True, 'token_prefix': token[:8]}

    def sessions_me(self, ctx):
        """The attached session, without its secret key."""
        return {'session': ctx.session.public()}

    def sessions_list(self, ctx):
        """Every registered session, without secret keys."""
        return {'sessions': [info.public() for info in self.registry.all()]}


def _valid_presence(presence):
    """The presence with lowercased hex, or None when it is malformed."""
    if not isinstance(presence, dict):
        return None
    pub, sec = presence.get('session_pubkey'), presence.get('session_secret_key')
    attestation = presence.get('parent_attestation')
    if not (crypto.is_hex64(pub, any_case=True) and crypto.is_hex128(sec, any_case=True)
            and isinstance(attestation, dict)):
        return None
    att_pub = attestation.get('session_pubkey')
    parent = attestation.get('parent_member_pubkey')
    expires = attestation.get('expires_at')
    signature = attestation.get('signature')
    if not (crypto.is_hex64(att_pub, any_case=True)
            and crypto.is_hex64(parent, any_case=True)
            and isinstance(expires, (int, float)) and not isinstance(expires, bool)
            and crypto.is_hex128(signature, any_case=True)):
        return None
    try:
        if crypto.public_from_secret(sec.lower()) != pub.lower():
            return None  # the secret key must belong to the announced public key
    except ValueError:
        return None
    return {'session_pubkey': pub.lower(), 'session_secret_key': sec.lower(),
            'parent_attestation': {'session_pubkey': att_pub.lower(),
                                   'parent_member_pubkey': parent.lower(),
                                   'expires_at': int(expires), 'signature': signature.lower()}}
