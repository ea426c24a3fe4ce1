"""The LinkTable: every broker link of the daemon, by mesh and by session.

It owns the joined meshes (config.json entries by slug) and their links: one member link
per mesh, one session link per registered session with presence. It opens and closes them
as meshes are attached and detached and sessions come and go, answers lookups (a mesh's
member link, the session link of a key, whether a key is the daemon's own), reads rosters
from several meshes at once, and reconnects every link when the wall clock jumps (a laptop
woke up, DESIGN.md 25). It builds links with the two factories it is given, so it knows
nothing of what a link does with a push.
"""
import logging
import time

import gevent

from meshd.greenlets import LOG

log = logging.getLogger(__name__)


class LinkTable:
    """The daemon's broker links. `member_link(mesh)` and `session_link(mesh, info)` build
    a link (not started); `registered()` lists the registered sessions."""

    def __init__(self, timings, supervisor, member_link, session_link, registered):
        self.timings = timings
        self.supervisor = supervisor
        self._member_link = member_link
        self._session_link = session_link
        self._registered = registered
        self.meshes = {}      # slug -> config.json entry
        self.members = {}     # slug -> MemberLink
        self.sessions = {}    # token -> SessionLink

    # -- meshes --------------------------------------------------------------------------

    def attach(self, mesh):
        """Start the member link of `mesh`, and the links of its registered sessions."""
        slug = mesh['slug']
        self.meshes[slug] = mesh
        self.members[slug] = self._member_link(mesh).start()
        for info in self._registered():
            if info.mesh == slug and info.token not in self.sessions:
                self.open_session(info)

    def detach(self, slug):
        """Close the member link of `slug` and the session links bound to it."""
        self.meshes.pop(slug, None)
        link = self.members.pop(slug, None)
        if link is not None:
            link.close()
        for token, session_link in list(self.sessions.items()):
            if session_link.mesh['slug'] == slug:
                del self.sessions[token]
                session_link.close()

    def replace_meshes(self, wanted):
        """Attach meshes newly in `wanted` (slug -> entry) and detach those no longer in it
        or changed; return (attached, detached) slugs."""
        changed = {slug for slug in set(wanted) & set(self.meshes)
                   if wanted[slug] != self.meshes[slug]}
        detached = sorted((set(self.meshes) - set(wanted)) | changed)
        attached = sorted((set(wanted) - set(self.meshes)) | changed)
        for slug in detached:
            self.detach(slug)
        for slug in attached:
            self.attach(wanted[slug])
        return attached, detached

    def member_pubkey(self, slug):
        mesh = self.meshes.get(slug)
        return mesh.get('pubkey') if mesh else None

    # -- sessions ------------------------------------------------------------------------

    def open_session(self, info):
        """Close any link of the same token or session key, then open this session's link."""
        if info.presence is None:
            return
        mesh = self.meshes.get(info.mesh)
        if mesh is None:
            log.warning('session_broker_no_mesh_config', extra={'fields': {'mesh': info.mesh}})
            return
        self.close_session(info.token)
        for token, link in list(self.sessions.items()):
            if link.pubkey == info.session_pubkey:
                # One presence per session key: a ghost would steal the session's DMs (1.35.0).
                del self.sessions[token]
                link.close()
        self.sessions[info.token] = self._session_link(mesh, info).start()

    def close_session(self, token, goodbye=False):
        """Close a session's link; `goodbye` when the session ended on purpose."""
        link = self.sessions.pop(token, None)
        if link is not None:
            link.close(goodbye=goodbye)

    def session_by_pubkey(self, pubkey):
        for link in self.sessions.values():
            if link.pubkey == pubkey:
                return link
        return None

    # -- lookups -------------------------------------------------------------------------

    def member(self, slug):
        return self.members.get(slug)

    def all(self):
        return list(self.members.values()) + list(self.sessions.values())

    def is_own_pubkey(self, pubkey, slug=None):
        """The member key of a joined mesh, or a live session key of this daemon."""
        pubkey = pubkey.lower()
        meshes = [self.meshes[slug]] if slug in self.meshes else list(self.meshes.values())
        if any(mesh['pubkey'].lower() == pubkey for mesh in meshes):
            return True
        return any(link.pubkey == pubkey for link in self.sessions.values())

    def rosters(self, slugs, max_age=0.0):
        """{slug: peers or None} for `slugs`, read concurrently, each within the RPC timeout."""
        jobs = {}
        for slug in slugs:
            link = self.members.get(slug)
            if link is not None and link.is_open:
                jobs[slug] = self.supervisor.spawn('roster:%s' % slug, link.list_peers, max_age,
                                                   on_crash=LOG)
        gevent.joinall(list(jobs.values()), timeout=self.timings['link_rpc_timeout'] + 1)
        return {slug: (jobs[slug].value if slug in jobs and jobs[slug].successful() else None)
                for slug in slugs}

    def health(self):
        """The `brokers` and `sessions` parts of daemon.health."""
        return ({slug: link.health() for slug, link in self.members.items()},
                {token[:8]: link.health() for token, link in self.sessions.items()})

    # -- running and stopping --------------------------------------------------------------

    def watch_clock(self):
        """Reconnect every link at once when wall-clock time jumps (a laptop woke up)."""
        interval = self.timings['clock_check_interval']
        last_wall, last_mono = time.time(), time.monotonic()
        while not self.supervisor.stopping.wait(interval):
            wall, mono = time.time(), time.monotonic()
            jump = (wall - last_wall) - (mono - last_mono)
            last_wall, last_mono = wall, mono
            if abs(jump) >= self.timings['clock_jump_threshold']:
                log.info('clock_jump_detected', extra={'fields': {'jump_ms': int(jump * 1000)}})
                for link in self.all():
                    link.reconnect_now('clock_jump')

    def close_members(self):
        for link in list(self.members.values()):
            link.close()
        self.members.clear()

    def close_sessions(self):
        for link in list(self.sessions.values()):
            link.close()
        self.sessions.clear()
