"""Container and CI detection (spec/daemon.md §1.4, §2.4)."""
import os
import re

CI_VARIABLES = ('CI', 'GITHUB_ACTIONS', 'GITLAB_CI', 'BUILDKITE', 'CIRCLECI', 'JENKINS_URL')
_CGROUP_PATTERN = re.compile(r'/(docker|kubepods|containerd)/')


def in_container(environ=None, root='/'):
    """True inside Docker, Kubernetes or containerd, where TCP is off by default."""
    environ = os.environ if environ is None else environ
    if environ.get('KUBERNETES_SERVICE_HOST') or environ.get('CONTAINER') == '1':
        return True
    if os.path.exists(os.path.join(root, '.dockerenv')):
        return True
    try:
        with open(os.path.join(root, 'proc/1/cgroup'), 'r') as handle:
            return bool(_CGROUP_PATTERN.search(handle.read()))
    except OSError:
        return False


def in_ci(environ=None):
    """True on a CI host, where no persistent service should be installed."""
    environ = os.environ if environ is None else environ
    return any(environ.get(name) for name in CI_VARIABLES)
