"""The broker's plain HTTP routes on the WebSocket port (spec/wire.md §9.4).

Routes match PATH_INFO (a query string is ignored); every answer carries the CORS header,
OPTIONS gets 204, unknown routes 404 `not found`, and request bodies are limited to
MAX_MESSAGE_BYTES (413). Handler errors become 500 `{ok:false, error}`, never a traceback.
"""
import json
import logging
import re

from storage import migrate

from meshd import __version__
from meshd.broker import invite, migrations

log = logging.getLogger(__name__)

CORS = ('Access-Control-Allow-Origin', '*')
CODE_ROUTE = re.compile(r'^/api/public/invite-code/([A-Za-z0-9]+)$')
CLAIM_ROUTE = re.compile(r'^/invites/[^/]+/claim$')


class HttpRoutes(object):
    """WSGI application for the non-WebSocket routes, on `store`. `uptime()` is the
    broker's, `dm_ttl` and `max_message_bytes` its settings, `hook_status(body)` and
    `join(store, body)` the handlers of the two POST routes."""

    def __init__(self, store, uptime, dm_ttl, max_message_bytes, hook_status, join):
        self.store = store
        self.uptime = uptime
        self.dm_ttl = dm_ttl
        self.max_message_bytes = max_message_bytes
        self.hook_status = hook_status
        self.join = join

    def __call__(self, environ, start_response):
        try:
            status, body, ctype = self.route(environ)
        except Exception as exc:
            log.exception('HTTP handler failed')
            status, body, ctype = 500, {'ok': False, 'error': str(exc) or 'internal error'}, None
        if isinstance(body, (dict, list)):
            data = json.dumps(body, separators=(',', ':'), ensure_ascii=False).encode('utf-8')
            ctype = 'application/json'
        else:
            data = (body or '').encode('utf-8')
            ctype = ctype or 'text/plain; charset=utf-8'
        headers = [CORS, ('Content-Length', str(len(data)))]
        if status != 204:
            headers.append(('Content-Type', ctype))
        start_response('%d %s' % (status, _REASONS.get(status, 'OK')), headers)
        return [data] if status != 204 else []

    def route(self, environ):
        method = environ.get('REQUEST_METHOD', 'GET')
        path = environ.get('PATH_INFO', '/')
        if method == 'OPTIONS':
            return 204, '', None
        if method == 'GET' and path == '/health':
            return 200, self.health(), None
        if method == 'GET' and path == '/health/ready':
            return self.ready()
        if method == 'POST' and path == '/join':
            body, err = self._read_json(environ)
            if err:
                return err
            with self.store.connection():
                status, answer = self.join(self.store, body)
            return status, answer, None
        if method == 'POST' and path == '/hook/set-status':
            body, err = self._read_json(environ)
            if err:
                return err
            with self.store.connection():
                status, answer = self.hook_status(body)
            return status, answer, None
        if method == 'POST' and CLAIM_ROUTE.match(path):
            return 501, {'error': 'invite_v2_disabled'}, None
        match = CODE_ROUTE.match(path)
        if method == 'GET' and match:
            with self.store.connection():
                return 200, invite.code_lookup(match.group(1)), None
        return 404, 'not found', None

    def health(self):
        """`{status, db, version, gitSha, uptime, dmTtlSeconds}`."""
        return {'status': 'ok', 'db': 'up' if self.store.ping() else 'down',
                'version': __version__, 'gitSha': 'unknown', 'uptime': int(self.uptime()),
                'dmTtlSeconds': int(self.dm_ttl)}

    def ready(self):
        if not self.store.ping():
            return 503, {'status': 'not_ready', 'reason': 'db_down'}, None
        if migrate.schema_version(self.store) < migrations.HEAD:
            return 503, {'status': 'not_ready', 'reason': 'migration_missing'}, None
        return 200, {'status': 'ready', 'version': __version__}, None

    def _read_json(self, environ):
        limit = self.max_message_bytes
        try:
            length = int(environ.get('CONTENT_LENGTH') or 0)
        except ValueError:
            length = 0
        if length > limit:
            return None, (413, {'ok': False, 'error': 'payload too large'}, None)
        raw = environ['wsgi.input'].read(min(length, limit + 1) if length else limit + 1)
        if len(raw) > limit:
            return None, (413, {'ok': False, 'error': 'payload too large'}, None)
        try:
            return json.loads(raw.decode('utf-8') or 'null'), None
        except ValueError:
            return None, None


_REASONS = {200: 'OK', 204: 'No Content', 400: 'Bad Request', 404: 'Not Found', 429: 'Too Many Requests',
            413: 'Payload Too Large', 500: 'Internal Server Error', 501: 'Not Implemented',
            503: 'Service Unavailable'}
