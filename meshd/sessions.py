"""The session registry: registered agent sessions, by token and by session id (spec/daemon.md §4).

Secret keys live in memory only (`presence`) and in each session's 0600 key file; the
`sessions` table holds the bindings needed to rehydrate after a restart, never a secret
key. Hooks let the daemon open and close session links; a hook that raises never undoes
a registry mutation. At start, sessions whose process still runs are revived with a fresh
parent attestation (rehydrate).
"""
import json
import logging
import os

from rpc.protocol import CONFLICT, RpcError
from storage.models import Session

from meshd import clock, crypto, keystore, procs

log = logging.getLogger(__name__)


class SessionInfo:
    """One registered session. `presence` holds the session secret key: never serialise it."""

    def __init__(self, token, session_id, mesh, display_name, pid, cwd=None, role=None,
                 groups=None, start_time=None, registered_at=None, presence=None):
        self.token = token
        self.session_id = session_id
        self.mesh = mesh
        self.display_name = display_name
        self.pid = pid
        self.cwd = cwd
        self.role = role
        self.groups = list(groups or [])
        self.start_time = start_time
        self.registered_at = registered_at
        self.presence = presence

    @property
    def token_prefix(self):
        return self.token[:8]

    @property
    def hello_cwd(self):
        """The working directory the session's hello announces, which the broker's hook
        status route matches: its own, else the daemon's."""
        return self.cwd or os.getcwd()

    @property
    def session_pubkey(self):
        return self.presence['session_pubkey'] if self.presence else None

    def public(self):
        """The projection returned by sessions.me and sessions.list: no secret key."""
        presence = None
        if self.presence:
            presence = {'session_pubkey': self.presence['session_pubkey'],
                        'parent_attestation': self.presence['parent_attestation']}
        return {'session_id': self.session_id, 'mesh': self.mesh,
                'display_name': self.display_name, 'pid': self.pid, 'cwd': self.cwd,
                'role': self.role, 'groups': self.groups, 'start_time': self.start_time,
                'registered_at': self.registered_at, 'token_prefix': self.token_prefix,
                'presence': presence}


class SessionRegistry:
    """In-memory registry with write-through persistence to the `sessions` table of `store`;
    presented keypairs are kept in the key files under `paths` for rehydration."""

    def __init__(self, store, paths):
        self.store = store
        self.paths = paths
        self.by_token = {}
        self.by_session_id = {}
        self.persist_enabled = False
        self.on_register = []
        self.on_deregister = []

    def resolve(self, token):
        """The live entry of `token`, or None. There is no age limit (spec/daemon.md §4.4)."""
        return self.by_token.get(token) if token else None

    def all(self):
        return list(self.by_token.values())

    def holder(self, info):
        """The registered session of `info.session_id` that another live process holds.

        Re-registration by the same process (same pid and start time) is not a conflict,
        nor is a prior entry whose process has gone (the reaper has not run yet).
        """
        prior_token = self.by_session_id.get(info.session_id)
        prior = self.by_token.get(prior_token) if prior_token is not None else None
        if prior is None or not procs.is_alive(prior.pid):
            return None
        live = procs.start_time(prior.pid)
        if prior.start_time and live and not procs.same_start(prior.start_time, live):
            return None  # the pid now belongs to another process
        if prior.pid == info.pid:
            return None
        return prior

    def admit(self, info, replace=False):
        """Register a session from the API; its presented keypair is kept for rehydration.

        A session id that another live process holds is refused unless `replace`: taking
        it over silently would kill the first session's token and overwrite its key file.
        """
        holder = self.holder(info)
        if holder is not None and not replace:
            raise RpcError.of(CONFLICT, 'session_exists',
                              'session %s is held by another live process (pid %d); pass '
                              'replace to take it over' % (info.session_id, holder.pid),
                              session_id=info.session_id, pid=holder.pid)
        if info.presence is not None:
            keystore.remember(self.paths, info.mesh, info.session_id, info.session_pubkey,
                              info.presence['session_secret_key'])
        return self.register(info)

    def register(self, info):
        """Store `info`, replacing a prior entry of the same session id; fire the hooks.

        The caller decides first whether a live holder of the id may be replaced (holder()).
        """
        prior_token = self.by_session_id.get(info.session_id)
        if prior_token is not None and prior_token != info.token:
            prior = self.by_token.pop(prior_token, None)
            if prior is not None:
                self._persist_delete(prior.token)
                self._fire(self.on_deregister, prior)
        info.registered_at = clock.now_ms()
        if info.start_time is None:
            # psutil reads the process table without a subprocess, so this never blocks.
            info.start_time = procs.start_time(info.pid)
        self.by_token[info.token] = info
        self.by_session_id[info.session_id] = info.token
        self._persist_upsert(info)
        self._fire(self.on_register, info)
        return info

    def deregister(self, token):
        """Remove the entry of `token`; True when one was removed."""
        info = self.by_token.pop(token, None)
        if info is None:
            return False
        if self.by_session_id.get(info.session_id) == token:
            del self.by_session_id[info.session_id]
        self._persist_delete(token)
        self._fire(self.on_deregister, info)
        return True

    def _fire(self, hooks, info):
        for hook in hooks:
            try:
                hook(info)
            except Exception:
                log.exception('session hook failed')

    # -- persistence and rehydration -----------------------------------------------------

    def _persist_upsert(self, info):
        if not self.persist_enabled:
            return
        try:
            self.store.write(Session.save_binding, token=info.token,
                             session_id=info.session_id, mesh=info.mesh,
                             display_name=info.display_name, pid=info.pid, cwd=info.cwd,
                             role=info.role, groups=json.dumps(info.groups),
                             start_time=info.start_time, registered_at=info.registered_at)
        except Exception as exc:
            log.warning('sessions_persist_failed', extra={'fields': {'err': str(exc)}})

    def _persist_delete(self, token):
        if not self.persist_enabled:
            return
        try:
            self.store.write(Session.remove, [token])
        except Exception as exc:
            log.warning('sessions_persist_failed', extra={'fields': {'err': str(exc)}})

    def _persisted_rows(self):
        """Valid persisted rows as SessionInfo (no presence); invalid rows are deleted."""
        valid, invalid = [], []
        with self.store.reading():
            rows = Session.every()
        for row in rows:
            if not crypto.is_hex64(row.token) or not isinstance(row.pid, int):
                invalid.append(row.token)
                continue
            try:
                groups = json.loads(row.groups) if row.groups else []
            except ValueError:
                groups = []
            valid.append(SessionInfo(row.token, row.session_id, row.mesh, row.display_name,
                                     row.pid, row.cwd, row.role, groups, row.start_time,
                                     row.registered_at))
        if invalid:
            self.store.write(Session.remove, invalid)
        return valid

    def rehydrate(self, meshes):
        """Revive persisted sessions whose process still runs (spec/daemon.md §4.5), each
        with its stored keypair and a fresh attestation from its mesh in `meshes`; drop the
        rest. Persistence is on from here."""
        try:
            rows = self._persisted_rows()
        except Exception as exc:
            log.warning('session_rehydrate_scan_failed', extra={'fields': {'err': str(exc)}})
            self.persist_enabled = True
            return
        revived = []
        for info in rows:
            try:
                if not procs.is_alive(info.pid):
                    continue
                live = procs.start_time(info.pid)
                if info.start_time and live and not procs.same_start(info.start_time, live):
                    continue
                mesh = meshes.get(info.mesh)
                if mesh is None:
                    continue
                keypair = keystore.load_or_create(self.paths, mesh['slug'], info.session_id)
                info.presence = crypto.session_presence(
                    mesh['pubkey'], mesh['secretKey'], keypair.public_key, keypair.secret_key,
                    clock.now_ms())
                self.register(info)
                revived.append(info.token)
            except Exception as exc:
                log.warning('session_rehydrate_failed', extra={'fields': {
                    'token': info.token[:8], 'mesh': info.mesh, 'err': str(exc)}})
        self.store.write(Session.keep_only, revived)
        self.persist_enabled = True
        if rows:
            # claudemesh writes this info line to stderr; meshd keeps the stream.
            log.warning('sessions_rehydrated', extra={'fields': {
                'revived': len(revived), 'persisted': len(rows)}})
