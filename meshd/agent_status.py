"""Telling a session's broker whether its agent is working (spec/wire.md §7.5, §9.4).

`meshd hook UserPromptSubmit` reports `working` and `meshd hook Stop` reports `idle`; the
broker holds `next`/`low` messages for a working presence and drains it when it turns idle.
The hook must finish within a second, so it only asks the daemon, which posts
`POST /hook/set-status {cwd, pid, status, session_id}` in the background. A broker without
the route (or unreachable) is skipped quietly: the status only refines delivery timing.
"""
import json
import logging
import socket
import urllib.error
import urllib.request

from meshd.exceptions import InviteError
from meshd.greenlets import LOG
from meshd.invite import http_base

log = logging.getLogger(__name__)

STATUSES = ('working', 'idle')
POST_TIMEOUT = 5.0


class HookStatusReporter:
    """Posts hook statuses with `supervisor`; `broker_url(slug)` is a joined mesh's URL."""

    def __init__(self, supervisor, broker_url):
        self.supervisor = supervisor
        self.broker_url = broker_url

    def report(self, info, status):
        """Post `status` for the session `info` in the background; False when it has no
        presence on a broker (nothing to report for)."""
        url = self.broker_url(info.mesh)
        if info.presence is None or not url:
            return False
        body = {'cwd': info.hello_cwd, 'pid': info.pid, 'status': status,
                'session_id': info.session_id}
        self.supervisor.spawn('hook-status', self._post, url, body, on_crash=LOG)
        return True

    def _post(self, broker_url, body):
        try:
            target = http_base(broker_url) + '/hook/set-status'
        except InviteError:
            return
        request = urllib.request.Request(target, data=json.dumps(body).encode('utf-8'),
                                         method='POST',
                                         headers={'Content-Type': 'application/json'})
        try:
            with urllib.request.urlopen(request, timeout=POST_TIMEOUT) as response:
                response.read()
        except (urllib.error.URLError, socket.error, ValueError) as exc:
            log.debug('hook_status_skipped', extra={'fields': {
                'url': target, 'err': str(getattr(exc, 'reason', exc))}})
