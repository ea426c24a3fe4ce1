"""Structured log lines: one JSON object per line, `ts` last (spec/daemon.md §1.9).

Modules log with `log.info('event_name', extra={'fields': {...}})`; the record's message is
the event name and the fields become keys. Info lines go to stdout, warnings and errors to
stderr. A few lifecycle lines carry no `level` key, as claudemesh's do. Handlers are set
up once, by the CLI, never at import.
"""
import json
import logging
import os
import sys

from meshd.clock import iso_now

# Lines that claudemesh writes without a `level` key.
_UNLEVELLED = frozenset({'host_fingerprint_written', 'broker_status', 'daemon_started',
                         'daemon_shutdown'})
_LEVEL_NAMES = {logging.DEBUG: 'debug', logging.INFO: 'info', logging.WARNING: 'warn',
                logging.ERROR: 'error', logging.CRITICAL: 'error'}


# syslog priorities, as journald reads them from a `<N>` line prefix (sd-daemon(3)).
_JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                     logging.CRITICAL: 2}


class JsonFormatter(logging.Formatter):
    """Formats records as the daemon's JSON lines; under systemd (JOURNAL_STREAM set) each
    line starts with its journald priority, so `journalctl -p warning` works."""

    def __init__(self, journal=False):
        super().__init__()
        self.journal = journal

    def format(self, record):
        message = record.getMessage()
        line = {}
        if record.levelno != logging.INFO or message not in _UNLEVELLED:
            line['level'] = _LEVEL_NAMES.get(record.levelno, 'info')
        line['msg'] = message
        fields = getattr(record, 'fields', None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line['err'] = self.formatException(record.exc_info)
        line['ts'] = iso_now()
        text = json.dumps(line, ensure_ascii=False, default=str, separators=(',', ':'))
        if self.journal:
            return '<%d>%s' % (_JOURNAL_PRIORITY.get(record.levelno, 6), text)
        return text


class _Below(logging.Filter):
    def __init__(self, level):
        super().__init__()
        self.level = level

    def filter(self, record):
        return record.levelno < self.level


def setup(debug=False):
    """Route records to stdout (info) and stderr (warnings and errors) as JSON lines."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = JsonFormatter(journal=bool(os.environ.get('JOURNAL_STREAM')))
    out = logging.StreamHandler(sys.stdout)
    out.setLevel(logging.DEBUG if debug else logging.INFO)
    out.addFilter(_Below(logging.WARNING))
    out.setFormatter(formatter)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(formatter)
    root.addHandler(out)
    root.addHandler(err)
    root.setLevel(logging.DEBUG if debug else logging.INFO)



def setup_file(path, also_stderr=False, debug=False):
    """Route every record to the file at `path` (created 0600), and to stderr as well when
    `also_stderr`: for processes whose stdout is a protocol (the MCP server, hooks)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = JsonFormatter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    handler = logging.StreamHandler(os.fdopen(fd, 'a', encoding='utf-8'))
    handler.setFormatter(formatter)
    root.addHandler(handler)
    if also_stderr:
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(formatter)
        root.addHandler(err)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


class LogRotation:
    """Rotates the log a detached daemon writes on its stdout and stderr: past `max_bytes`
    the file becomes `<log>.1` (older ones shift up to `<log>.<keep>`) and both descriptors
    move to a fresh file. A daemon under systemd writes to the journal and never rotates."""

    def __init__(self, path, max_bytes=10 * 1024 * 1024, keep=3):
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep

    def step(self):
        """Rotate when the file is too big; True when it did."""
        try:
            if os.fstat(sys.stdout.fileno()).st_size <= self.max_bytes:
                return False
        except (OSError, ValueError):
            return False
        sys.stdout.flush()
        sys.stderr.flush()
        for number in range(self.keep - 1, 0, -1):
            older = '%s.%d' % (self.path, number)
            if os.path.exists(older):
                os.replace(older, '%s.%d' % (self.path, number + 1))
        os.replace(self.path, self.path + '.1')
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, sys.stdout.fileno())
        os.dup2(fd, sys.stderr.fileno())
        os.close(fd)
        return True
