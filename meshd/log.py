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


class JsonFormatter(logging.Formatter):
    """Formats records as the daemon's JSON lines."""

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
        return json.dumps(line, ensure_ascii=False, default=str, separators=(',', ':'))


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
    formatter = JsonFormatter()
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
