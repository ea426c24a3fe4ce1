"""daemon.version, daemon.health, daemon.reload and meshes.list (spec/daemon.md §8.2)."""
from meshd import __version__

# What this daemon serves, in claudemesh's names (spec/daemon.md §8.2) and meshd's.
IPC_FEATURES = ['version', 'health', 'send', 'inbox', 'events', 'peers', 'profile', 'skills',
                'state', 'memory', 'sessions', 'status', 'groups', 'moderation', 'grants',
                'message_status']


class DaemonMethods:
    """The daemon's own state. `instance()` is (epoch, schema version), `health()` the
    daemon.health answer, `reload()` the daemon.reload one; `links` the LinkTable."""

    def __init__(self, instance, health, reload, links):
        self.instance = instance
        self.health = health
        self.reload = reload
        self.links = links

    def handlers(self):
        return [
            ('daemon.version', self.daemon_version,
             {'result': '{daemon_version, ipc_api, ipc_features, schema_version, epoch}'}),
            ('daemon.health', self.daemon_health,
             {'result': '{ok, pid, epoch, tcp, brokers:{slug:{status, state, detail, '
                        'retry_at}}, sessions:{token_prefix:{status, state}}}'}),
            ('daemon.reload', self.daemon_reload, {'result': '{ok, attached, detached, meshes}'}),
            ('meshes.list', self.meshes_list,
             {'result': '{meshes:[{slug, name, mesh_id, member_id, pubkey, broker_url, '
                        'joined_at, display_name, status, state}]}'}),
        ]

    def daemon_version(self, ctx):
        """The daemon's version, IPC API, schema version and instance epoch."""
        epoch, schema_version = self.instance()
        return {'daemon_version': __version__, 'ipc_api': 'v1', 'ipc_features': IPC_FEATURES,
                'schema_version': schema_version, 'epoch': epoch}

    def daemon_health(self, ctx):
        """Liveness, pid, epoch, TCP address and the state of every broker and session link."""
        return self.health()

    def daemon_reload(self, ctx):
        """Re-read config.json: attach meshes newly listed, detach meshes no longer listed."""
        return self.reload()

    def meshes_list(self, ctx):
        """Every joined mesh (without secret keys) with its member link's status and state."""
        meshes = []
        for slug in sorted(self.links.meshes):
            entry = self.links.meshes[slug]
            link = self.links.member(slug)
            meshes.append({'slug': slug, 'name': entry.get('name'),
                           'mesh_id': entry.get('meshId'), 'member_id': entry.get('memberId'),
                           'pubkey': entry.get('pubkey'), 'broker_url': entry.get('brokerUrl'),
                           'joined_at': entry.get('joinedAt'),
                           'display_name': entry.get('displayName'),
                           'status': link.status if link else 'closed',
                           'state': link.state if link else 'ok'})
        return {'meshes': meshes}
