"""`meshd launch`: run an agent (default `claude`) as a registered session (spec/daemon.md §10.8).

The session token is written to a 0600 file in a 0700 temporary directory and the child
learns only the file's path (MESHD_SESSION_TOKEN_FILE): a token is never printed, put in an
environment value or in argv (DESIGN.md 18). The launch process stays alive while the child
runs, so the registered pid is alive exactly as long as the session.

When the child is Claude Code, its session id is meshd's: a new session passes
`--session-id <uuid>`, and `--resume <uuid>` / `--continue` pass `--resume <uuid>` instead
(Claude Code refuses `--session-id` with either). Unless `--no-channels`, it gets
`--dangerously-load-development-channels server:meshd`, the flag that lets meshd's MCP
server start turns with channel notifications (spec/agents.md §3).
"""
import glob
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import uuid

from rpc.client import RpcCallError, RpcClient, RpcConnectionError

from meshd import clock, config as config_mod, crypto, keystore
from meshd.exceptions import LaunchError

CHANNELS_FLAG = '--dangerously-load-development-channels'
CLAUDE_SESSION_FLAGS = {'--session-id', '--resume', '-r', '--continue', '-c'}


def pick_mesh(config, requested):
    meshes = [m['slug'] for m in config['meshes']]
    if requested:
        if requested not in meshes:
            raise LaunchError('not a member of mesh "%s"' % requested)
        return requested
    if len(meshes) == 1:
        return meshes[0]
    if not meshes:
        raise LaunchError('no mesh joined; run `meshd join <invite-link>` first')
    raise LaunchError('several meshes joined (%s); pick one with --mesh' % ', '.join(meshes))


def is_claude(command):
    return os.path.basename(command[0]) == 'claude'


def _gives(arguments, flag):
    """Whether `arguments` hold `flag`, also as `--flag=value` (or `-rVALUE` for a short one)."""
    return any(arg == flag or arg.startswith(flag + '=')
               or (len(flag) == 2 and arg.startswith(flag) and not arg.startswith('--'))
               for arg in arguments)


def claude_arguments(command, session_id, resumed, channels):
    """`command` with the flags that tie Claude Code to meshd's session (module doc)."""
    own = list(command[1:])
    extra = []
    if not any(_gives(own, flag) for flag in CLAUDE_SESSION_FLAGS):
        # The user's own choice of session stands.
        extra += ['--resume', session_id] if resumed else ['--session-id', session_id]
    if channels and not _gives(own, CHANNELS_FLAG):
        extra += [CHANNELS_FLAG, 'server:meshd']
    return [command[0]] + extra + own


def latest_session(paths, slug, cwd, home=None):
    """The newest Claude Code session of `cwd` that meshd launched (its transcript, under
    ~/.claude/projects, is named by a session id that has a meshd keypair), or None."""
    home = home or os.path.expanduser('~')
    # spec/daemon.md §10.8 names the folder with / replaced by -; Claude Code also replaces
    # every other character that is not a letter or a digit.
    names = {cwd.replace('/', '-'), re.sub(r'[^a-zA-Z0-9]', '-', cwd)}
    transcripts = sorted((path for name in names for path in glob.glob(
        os.path.join(glob.escape(os.path.join(home, '.claude', 'projects', name)), '*.jsonl'))),
        key=os.path.getmtime, reverse=True)
    for path in transcripts:
        session_id = os.path.basename(path)[:-len('.jsonl')]
        if os.path.exists(paths.session_keypair(slug, session_id)):
            return session_id
    return None


def run(paths, command, mesh=None, name=None, role=None, groups=None, resume=None, out=print,
        ensure=None, resume_latest=False, channels=True):
    """Register a session, run `command` under it, deregister; return the child's status.

    `ensure()` makes sure a daemon answers (the CLI starts one when needed);
    `resume_latest` (--continue) resumes the newest meshd session of this directory.
    """
    config = config_mod.load_config(paths.config)
    slug = pick_mesh(config, mesh)
    entry = config_mod.mesh_by_slug(config, slug)
    if resume_latest and not resume:
        resume = latest_session(paths, slug, os.getcwd())
        if resume is None:
            out('meshd: no earlier meshd session in this directory; starting a new one')
    session_id = resume or str(uuid.uuid4())
    if is_claude(command):
        command = claude_arguments(command, session_id, resumed=bool(resume),
                                   channels=channels)
    display_name = name or entry.get('displayName') or os.path.basename(os.getcwd()) or 'session'
    keypair = keystore.load_or_create(paths, slug, session_id)
    presence = crypto.session_presence(entry['pubkey'], entry['secretKey'], keypair.public_key,
                                       keypair.secret_key, clock.now_ms())
    token = secrets.token_hex(32)
    tmpdir = tempfile.mkdtemp(prefix='meshd-')  # 0700
    token_file = os.path.join(tmpdir, 'session-token')
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, 'w') as handle:
        handle.write(token)
    params = {'token': token, 'session_id': session_id, 'mesh': slug,
              'display_name': display_name, 'pid': os.getpid(), 'cwd': os.getcwd(),
              'presence': presence}
    if resume:
        # Resuming means taking the identity over, also from a process that still holds it.
        params['replace'] = True
    if role:
        params['role'] = role
    if groups:
        params['groups'] = ['@' + g.lstrip('@') for g in groups.split(',') if g.strip()]
    try:
        if ensure is not None:
            ensure()
        with RpcClient(socket_path=paths.socket, timeout=5.0) as client:
            client.call('sessions.register', params)
            client.call('session.attach', {'token': token})
            out(_welcome(client, slug, display_name))
    except RpcCallError as exc:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if exc.slug == 'session_exists':
            raise LaunchError('session %s is held by another live process (pid %s); '
                              '`meshd launch --resume %s` takes it over'
                              % (session_id, exc.data.get('pid'), session_id))
        raise LaunchError('session registration refused: %s' % exc.error.get('message'))
    except RpcConnectionError as exc:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise LaunchError('daemon not reachable — %s (run `meshd daemon up`)' % exc)
    env = dict(os.environ, MESHD_SESSION_TOKEN_FILE=token_file, MESHD_MESH=slug,
               MESHD_DISPLAY_NAME=display_name, MESHD_SESSION_ID=session_id,
               MESHD_ROLE=role or '')
    env.setdefault('MCP_TIMEOUT', '30000')
    env.setdefault('MAX_MCP_OUTPUT_TOKENS', '50000')
    try:
        child = subprocess.Popen(command, env=env)
    except OSError as exc:
        _deregister(paths, token)
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise LaunchError('cannot run %s: %s' % (command[0], exc.strerror or exc))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the child
    try:
        status = child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
        _deregister(paths, token)
        shutil.rmtree(tmpdir, ignore_errors=True)
    return status if status >= 0 else 128 - status


def _welcome(client, slug, display_name):
    try:
        health = client.call('daemon.health')
        state = health['brokers'].get(slug, {}).get('status', 'unknown')
        unread = len(client.call('inbox.list', {'unread_only': True, 'mark_seen': False,
                                                'limit': 1000})['items'])
    except (RpcConnectionError, RpcCallError):
        return 'meshd: session "%s" registered on %s' % (display_name, slug)
    return ('meshd: session "%s" on %s (broker %s, %d unread)'
            % (display_name, slug, state, unread))


def _deregister(paths, token):
    try:
        with RpcClient(socket_path=paths.socket, timeout=1.5) as client:
            client.call('sessions.deregister', {'token': token})
    except (RpcConnectionError, RpcCallError):
        pass  # the reaper notices the dead pid anyway
