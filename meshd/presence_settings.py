"""Presence settings kept across restarts: what a link's presence should show the mesh.

`profile.set`, `status.set`, `summary.set`, `visible.set` and `groups.*` write here first
(meshd.db) and then send their frames; every time a link opens, its settings are sent again,
because the broker forgets them with the presence (storage/presence_settings.py says why).
The settings of one link are one JSON object: `status`, `summary`, `visible`, `profile`
(avatar, title, bio, capabilities) and `groups` ({name: role or ""}).
"""
import json
import logging

from storage.presence_settings import MEMBER, PresenceSetting

from meshd import clock

log = logging.getLogger(__name__)

PROFILE_KEYS = ('avatar', 'title', 'bio', 'capabilities')


def owner_of(link):
    """The owner key of a link's settings: `member`, or the session's token."""
    return MEMBER if link.kind == 'member' else link.token


def frames_for(settings):
    """The frames that make a fresh presence show `settings`, in a fixed order."""
    frames = []
    if 'status' in settings:
        frames.append({'type': 'set_status', 'status': settings['status']})
    if 'summary' in settings:
        frames.append({'type': 'set_summary', 'summary': settings['summary']})
    if 'visible' in settings:
        frames.append({'type': 'set_visible', 'visible': settings['visible']})
    profile = settings.get('profile') or {}
    if profile:
        frames.append(dict({'type': 'set_profile'}, **profile))
    for name, role in sorted((settings.get('groups') or {}).items()):
        frame = {'type': 'join_group', 'name': name}
        if role:
            frame['role'] = role
        frames.append(frame)
    return frames


class PresenceSettings:
    """The settings of every link, cached from `store` and written through it."""

    def __init__(self, store):
        self.store = store
        self._settings = {}     # (mesh, owner) -> settings dict

    def load(self):
        with self.store.reading():
            rows = PresenceSetting.every()
        for row in rows:
            try:
                settings = json.loads(row.settings)
            except ValueError:
                continue
            if isinstance(settings, dict):
                self._settings[(row.mesh, row.owner)] = settings

    def get(self, mesh, owner):
        return dict(self._settings.get((mesh, owner), {}))

    def update(self, mesh, owner, changes=None, join=None, leave=None):
        """Merge `changes` (status, summary, visible, profile fields) and a group joined
        (`join`: (name, role)) or left (`leave`: name) into the stored settings, durably."""
        settings = self.get(mesh, owner)
        for key, value in (changes or {}).items():
            if key in PROFILE_KEYS:
                settings['profile'] = dict(settings.get('profile') or {}, **{key: value})
            else:
                settings[key] = value
        if join is not None or leave is not None:
            groups = dict(settings.get('groups') or {})
            if join is not None:
                groups[join[0]] = join[1] or ''
            if leave is not None:
                groups.pop(leave, None)
            settings['groups'] = groups
        self.store.write(PresenceSetting.put, mesh, owner, json.dumps(settings, sort_keys=True),
                         clock.now_ms())
        self._settings[(mesh, owner)] = settings
        return settings

    def forget(self, info):
        """A session ended: its settings go with it."""
        if any(owner == info.token for _mesh, owner in self._settings):
            self._settings = {key: value for key, value in self._settings.items()
                              if key[1] != info.token}
            self.store.write(PresenceSetting.forget_owner, info.token)

    def replay(self, link):
        """Send `link`'s settings again (it just opened: a fresh or reattached presence)."""
        frames = frames_for(self._settings.get((link.mesh['slug'], owner_of(link)), {}))
        for frame in frames:
            if not link.send_frame(frame):
                return
        if frames:
            log.info('presence_settings_replayed', extra={'fields': {
                'mesh': link.mesh['slug'], 'link': link.kind, 'frames': len(frames)}})
