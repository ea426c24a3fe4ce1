"""Files written safely: private ones created with their final mode, never widened for an instant
(spec/daemon.md §1.1), and atomic replacement for every file meshd rewrites.

Secrets (`local-token`, `config.json`, keypairs, the fingerprint record, session-token
files) are created with `os.open(..., mode)`; rewrites go through an O_EXCL temporary file
in the same directory and `rename`, so a reader sees the old or the new file, never half.
"""
import base64
import os
import secrets

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def missing_dirs(path):
    """The directories that do not exist yet on the way to `path`, outermost first."""
    missing = []
    probe = os.path.abspath(path)
    while not os.path.isdir(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return list(reversed(missing))


def ensure_private_dir(path):
    """Create `path` and its missing parents with mode 0700; narrow an existing wider one."""
    for directory in missing_dirs(path):
        try:
            os.mkdir(directory, PRIVATE_DIR)
        except FileExistsError:
            pass
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
    return path


def write_private(path, data, fsync=True):
    """Atomically replace `path` with `data` (bytes or str), mode 0600 from creation."""
    write_atomic(path, data, PRIVATE_FILE, fsync)


def write_atomic(path, data, mode, fsync=True):
    """Atomically replace `path` with `data` (bytes or str), `mode` from creation."""
    if isinstance(data, str):
        data = data.encode('utf-8')
    directory = os.path.dirname(path) or '.'
    tmp = os.path.join(directory, '.%s.%s.tmp' % (os.path.basename(path), secrets.token_hex(6)))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, 'wb') as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)     # the umask may have narrowed the creation mode
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_text(path):
    """The file's text, or None when it does not exist."""
    try:
        with open(path, 'r', encoding='utf-8') as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def ensure_local_token(path):
    """Read the TCP credential, creating it when missing or empty (spec/daemon.md §1.5)."""
    existing = (read_text(path) or '').strip()
    if existing:
        return existing
    if os.path.exists(path):
        os.unlink(path)  # an empty file: replace it
    token = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b'=').decode('ascii')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    with os.fdopen(fd, 'w') as handle:
        handle.write(token + '\n')
    return token
