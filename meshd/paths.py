"""Where meshd keeps its files: everything derives from $MESHD_HOME (spec/daemon.md §1.1)."""
import os


class Paths:
    """The file layout under one home directory (default ~/.meshd)."""

    def __init__(self, home=None):
        if home is None:
            home = os.environ.get('MESHD_HOME') or os.path.join(os.path.expanduser('~'), '.meshd')
        self.home = os.path.abspath(home)
        self.config = os.path.join(self.home, 'config.json')
        self.sessions_dir = os.path.join(self.home, 'sessions')
        self.daemon_dir = os.path.join(self.home, 'daemon')
        self.pid_file = os.path.join(self.daemon_dir, 'meshd.pid')
        self.socket = os.path.join(self.daemon_dir, 'meshd.sock')
        self.token = os.path.join(self.daemon_dir, 'local-token')
        self.database = os.path.join(self.daemon_dir, 'meshd.db')
        self.fingerprint = os.path.join(self.daemon_dir, 'host_fingerprint.json')
        self.log = os.path.join(self.daemon_dir, 'daemon.log')

    def session_keypair(self, mesh, session_id):
        return os.path.join(self.sessions_dir, mesh, '%s.json' % session_id)
