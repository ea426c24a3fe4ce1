"""config.json (the claudemesh schema) and the daemon's options.

Precedence of daemon options: the defaults table below, then config.json's top-level keys,
then the command line. Converters raise ValueError with a readable message; the CLI turns
ValueError and ConfigError into one line on stderr and exit status 2.
"""
import json
import os

from meshd import files
from meshd.exceptions import ConfigError

DEFAULT_TCP_PORT = 47823
CLONE_POLICIES = ('refuse', 'warn', 'allow')
DURABILITIES = ('full', 'normal')
MESH_REQUIRED_KEYS = ('meshId', 'memberId', 'slug', 'pubkey', 'secretKey', 'brokerUrl')
SECRET_MESH_KEYS = ('secretKey', 'rootKey')


def _port(value):
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ValueError('not a valid port: %r' % (value,))
    if not 0 <= port <= 65535 or isinstance(value, bool):
        raise ValueError('not a valid port: %r' % (value,))
    return port


def _choice(choices):
    def convert(value):
        if value not in choices:
            raise ValueError('%r is not one of %s' % (value, ', '.join(choices)))
        return value
    return convert


def _flag(value):
    if isinstance(value, bool):
        return value
    raise ValueError('expected true or false, not %r' % (value,))


def _seconds(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError('expected a number of seconds, not %r' % (value,))
    return value


def _tcp_mode(value):
    if value in ('auto', 'on', 'off'):
        return value
    raise ValueError('tcp must be auto, on or off, not %r' % (value,))


# (name, default, converter, help)
DAEMON_OPTIONS = (
    ('tcp', 'auto', _tcp_mode, 'TCP listener: auto (off inside containers), on or off'),
    ('tcp_port', DEFAULT_TCP_PORT, _port, 'loopback TCP port; 0 picks a free one'),
    ('clone_policy', 'refuse', _choice(CLONE_POLICIES), 'what a host fingerprint mismatch does'),
    ('durability', 'full', _choice(DURABILITIES), 'SQLite synchronous mode: full or normal'),
    ('public_health', False, _flag, 'answer daemon.health on TCP before auth'),
    ('not_surfaced_after', 600, _seconds, 'seconds a message may wait unseen by its agent '
     'before a not_surfaced warning (0: never warn)'),
)


class DaemonOptions:
    """The daemon's resolved, immutable options."""

    __slots__ = tuple(name for name, _default, _convert, _help in DAEMON_OPTIONS)

    def __init__(self, **values):
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError('DaemonOptions is immutable')


def build_options(file_config=None, **overrides):
    """Defaults, then config.json's keys, then `overrides` (None means not given)."""
    values = {}
    file_config = file_config or {}
    for name, default, convert, _help in DAEMON_OPTIONS:
        value = default
        if name in file_config:
            value = file_config[name]
        if overrides.get(name) is not None:
            value = overrides[name]
        try:
            values[name] = convert(value)
        except ValueError as exc:
            raise ConfigError('%s: %s' % (name, exc))
    return DaemonOptions(**values)


def empty_config():
    return {'version': 1, 'meshes': []}


def load_config(path):
    """The parsed config.json; a missing file or one without `meshes` is the empty config."""
    text = files.read_text(path)
    if text is None:
        return empty_config()
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise ConfigError('Failed to load %s: %s' % (path, exc))
    if not isinstance(config, dict):
        raise ConfigError('Failed to load %s: the top level is not an object' % path)
    meshes = config.get('meshes')
    if not isinstance(meshes, list):
        config['meshes'] = []
        return config
    slugs = set()
    for index, mesh in enumerate(meshes):
        if not isinstance(mesh, dict):
            raise ConfigError('Failed to load %s: meshes[%d] is not an object' % (path, index))
        missing = [key for key in MESH_REQUIRED_KEYS if not isinstance(mesh.get(key), str)]
        if missing:
            raise ConfigError('Failed to load %s: meshes[%d] lacks %s'
                              % (path, index, ', '.join(missing)))
        if mesh['slug'] in slugs:
            raise ConfigError('Failed to load %s: mesh %r is listed twice' % (path, mesh['slug']))
        slugs.add(mesh['slug'])
    return config


def save_config(path, config):
    """Write config.json atomically, 0600, in claudemesh's format (indent 2, trailing newline)."""
    files.ensure_private_dir(os.path.dirname(path))
    text = json.dumps(config, indent=2, ensure_ascii=False) + '\n'
    files.write_private(path, text)


def mesh_by_slug(config, slug):
    for mesh in config.get('meshes', []):
        if mesh.get('slug') == slug:
            return mesh
    return None


def public_mesh(mesh):
    """A mesh entry without its secrets, for API answers."""
    return {key: value for key, value in mesh.items() if key not in SECRET_MESH_KEYS}
