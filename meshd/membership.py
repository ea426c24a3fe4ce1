"""Joining and leaving meshes: edits of config.json, then a reload of a running daemon.

`meshd join`, `meshd leave` and `meshd import-claudemesh` work without a daemon; when one is
running they call `daemon.reload`, which attaches or detaches the mesh at once (DESIGN.md 9).
"""
import os
import socket

from rpc.client import RpcCallError, RpcClient, RpcConnectionError

from meshd import config as config_mod, crypto, files, invite as invite_mod
from meshd.exceptions import ConfigError, MembershipError


def reload_running_daemon(paths):
    """Ask a running daemon to re-read config.json; None when no daemon answers."""
    if not os.path.exists(paths.socket):
        return None
    try:
        with RpcClient(socket_path=paths.socket, timeout=10.0) as client:
            return client.call('daemon.reload')
    except (RpcConnectionError, RpcCallError):
        return None


def join(paths, link, display_name=None):
    """Enroll a fresh member key with the invite's broker and add the mesh to config.json.

    Returns (entry without secret, warnings, reload answer or None).
    """
    config = config_mod.load_config(paths.config)
    invite = invite_mod.parse_invite(link)
    joined = [m for m in config['meshes'] if m.get('meshId') == invite['mesh_id']
              or m.get('slug') == invite['mesh_slug']]
    if joined:
        # Before the broker is asked: enrolling again would spend the invite for nothing.
        raise MembershipError('already joined mesh "%s" (`meshd leave %s` first to join it '
                              'again)' % (joined[0]['slug'], joined[0]['slug']))
    warnings = []
    if invite_mod.is_insecure_remote(invite['broker_url']):
        warnings.append('warning: %s is unencrypted ws:// to a remote host; use wss:// (TLS) '
                        'through a reverse proxy' % invite['broker_url'])
    public, secret = crypto.generate_keypair()
    name = display_name or '%s-%d' % (socket.gethostname(), os.getpid())
    entry = invite_mod.enroll(invite, public, name)
    entry['secretKey'] = secret
    if display_name:
        entry['displayName'] = display_name
    config['meshes'] = [m for m in config['meshes'] if m.get('slug') != entry['slug']]
    config['meshes'].append(entry)
    config_mod.save_config(paths.config, config)
    files.write_private(os.path.join(paths.home, 'invite-%s.txt' % entry['slug']),
                        link.strip() + '\n')
    return config_mod.public_mesh(entry), warnings, reload_running_daemon(paths)


def leave(paths, slug):
    """Remove `slug` from config.json; MembershipError when it is not joined."""
    config = config_mod.load_config(paths.config)
    if config_mod.mesh_by_slug(config, slug) is None:
        raise MembershipError('not a member of mesh "%s"' % slug)
    config['meshes'] = [m for m in config['meshes'] if m.get('slug') != slug]
    config_mod.save_config(paths.config, config)
    return reload_running_daemon(paths)


def import_claudemesh(paths, source):
    """Copy the meshes of a claudemesh config.json; returns the imported slugs."""
    if not os.path.exists(source):
        raise MembershipError('no claudemesh config at %s' % source)
    try:
        theirs = config_mod.load_config(source)
    except ConfigError as exc:
        raise MembershipError(str(exc))
    if not theirs['meshes']:
        raise MembershipError('%s lists no mesh' % source)
    ours = config_mod.load_config(paths.config)
    slugs = [m['slug'] for m in theirs['meshes']]
    ours['meshes'] = [m for m in ours['meshes'] if m.get('slug') not in slugs]
    ours['meshes'].extend(theirs['meshes'])
    config_mod.save_config(paths.config, ours)
    return slugs, reload_running_daemon(paths)
