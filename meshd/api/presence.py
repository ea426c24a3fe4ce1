"""profile.set, status.set, summary.set, visible.set, groups.join and groups.leave.

How a presence shows itself to the mesh (spec/wire.md §4.3): an attached session's own
presence, else the daemon's member presence; without a mesh (and no session), every joined
mesh. What is set is stored first (meshd/presence_settings.py) and re-sent whenever the link
opens, so a restart or a long disconnect loses none of it; the frames have no reply, so a
call succeeds once they are written. When no selected link is open the call answers
`broker_unreachable`, and the settings, already stored, go out when a link opens.
"""
from rpc.protocol import RpcError, invalid_params

from storage.presence_settings import MEMBER

from meshd import broker_calls as calls
from meshd.presence_settings import PROFILE_KEYS, frames_for

STATUSES = ('idle', 'working', 'dnd')
MAX_TEXT = 1024
MAX_GROUP = 256
MAX_CAPABILITIES = 32


def _short_text(value, name):
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise invalid_params("'%s' must be a string of at most %d characters" % (name, MAX_TEXT))
    return value


def _group_name(name):
    if not isinstance(name, str) or not name.strip().lstrip('@').strip():
        raise invalid_params("missing 'name' (string, e.g. \"@reviewers\")")
    name = name.strip().lstrip('@')
    if len(name) > MAX_GROUP or any(c.isspace() for c in name):
        raise invalid_params("'name' must be one word of at most %d characters" % MAX_GROUP)
    return name


class PresenceMethods:
    """Presence settings over `routes` (meshd/api/routing.py), stored in `settings`
    (meshd/presence_settings.py) and kept in `links`' presences."""

    def __init__(self, routes, settings):
        self.routes = routes
        self.settings = settings

    def handlers(self):
        optional = {'session': 'optional'}
        return [
            ('profile.set', self.profile_set, dict(optional, result='{ok, applied, meshes}')),
            ('status.set', self.status_set, dict(optional, result='{ok, status, meshes}')),
            ('summary.set', self.summary_set, dict(optional, result='{ok, summary, meshes}')),
            ('visible.set', self.visible_set, dict(optional, result='{ok, visible, meshes}')),
            ('groups.join', self.groups_join, dict(optional, result='{ok, group, meshes}')),
            ('groups.leave', self.groups_leave, dict(optional, result='{ok, group, meshes}')),
        ]

    def profile_set(self, ctx, mesh: str = None, summary: str = None, status: str = None,
                    visible: bool = None, avatar: str = None, title: str = None,
                    bio: str = None, capabilities: list = None):
        """Set any of summary, status, visibility and profile fields (default: every mesh)."""
        changes = {}
        if summary is not None:
            changes['summary'] = _short_text(summary, 'summary')
        if status is not None:
            if status not in STATUSES:
                raise invalid_params("'status' must be idle, working or dnd")
            changes['status'] = status
        if visible is not None:
            changes['visible'] = visible
        for key, value in (('avatar', avatar), ('title', title), ('bio', bio)):
            if value is not None:
                changes[key] = _short_text(value, key)
        if capabilities is not None:
            if (len(capabilities) > MAX_CAPABILITIES
                    or not all(isinstance(c, str) and 0 < len(c) <= MAX_GROUP
                               for c in capabilities)):
                raise invalid_params("'capabilities' must be at most %d short strings"
                                     % MAX_CAPABILITIES)
            changes['capabilities'] = capabilities
        if not changes:
            raise invalid_params('nothing to set: pass summary, status, visible, avatar, title, '
                                 'bio or capabilities')
        meshes = self._apply(ctx, mesh, changes=changes)
        return {'ok': True, 'applied': sorted(changes), 'meshes': meshes}

    def status_set(self, ctx, status: str = None, mesh: str = None):
        """Say whether this presence is idle, working or dnd (dnd holds next and low messages)."""
        if status not in STATUSES:
            raise invalid_params("'status' must be idle, working or dnd")
        return {'ok': True, 'status': status,
                'meshes': self._apply(ctx, mesh, changes={'status': status})}

    def summary_set(self, ctx, summary: str = None, mesh: str = None):
        """One line saying what this presence is doing, shown in every peer list."""
        summary = _short_text(summary, 'summary')
        return {'ok': True, 'summary': summary,
                'meshes': self._apply(ctx, mesh, changes={'summary': summary})}

    def visible_set(self, ctx, visible: bool = None, mesh: str = None):
        """Show or hide this presence in other members' peer lists."""
        if visible is None:
            raise invalid_params("missing 'visible' (boolean)")
        return {'ok': True, 'visible': visible,
                'meshes': self._apply(ctx, mesh, changes={'visible': visible})}

    def groups_join(self, ctx, name: str = None, role: str = None, mesh: str = None):
        """Join @name: messages to the group reach this presence from now on."""
        group = _group_name(name)
        if role is not None and (not isinstance(role, str) or len(role) > MAX_GROUP):
            raise invalid_params("'role' must be a string of at most %d characters" % MAX_GROUP)
        return {'ok': True, 'group': '@' + group,
                'meshes': self._apply(ctx, mesh, join=(group, role or ''))}

    def groups_leave(self, ctx, name: str = None, mesh: str = None):
        """Leave @name."""
        group = _group_name(name)
        return {'ok': True, 'group': '@' + group, 'meshes': self._apply(ctx, mesh, leave=group)}

    # -- storing, then sending -----------------------------------------------------------

    def _apply(self, ctx, mesh, changes=None, join=None, leave=None):
        slugs = self.routes.many(ctx, mesh)
        frames = _frames(changes, join, leave)
        written, errors = [], []
        for slug in slugs:
            owner, link = self._owner_and_link(ctx, slug)
            self.settings.update(slug, owner, changes, join=join, leave=leave)
            try:
                for frame in frames:
                    calls.notify(link, slug, frame)
                written.append(slug)
            except RpcError as exc:     # this mesh's link is down
                errors.append(exc)
        if errors and not written:
            error = errors[0]
            error.data['detail'] = '%s; saved, and sent when the link opens' % (
                error.data.get('detail') or 'not connected')
            raise error
        return written

    def _owner_and_link(self, ctx, slug):
        session = ctx.session
        if session is not None and session.presence is not None and session.mesh == slug:
            return session.token, self.routes.links.sessions.get(session.token)
        return MEMBER, self.routes.links.member(slug)


def _frames(changes, join, leave):
    """The frames of one call: the changes as a presence's settings, then the group."""
    changes = changes or {}
    settings = {key: value for key, value in changes.items() if key not in PROFILE_KEYS}
    profile = {key: value for key, value in changes.items() if key in PROFILE_KEYS}
    if profile:
        settings['profile'] = profile
    frames = frames_for(settings)
    if join is not None:
        frames.extend(frames_for({'groups': {join[0]: join[1]}}))
    if leave is not None:
        frames.append({'type': 'leave_group', 'name': leave})
    return frames
