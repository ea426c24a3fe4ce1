"""meshd: per-user mesh daemon and self-hostable broker for AI coding-agent sessions.

This module holds the version only and imports nothing, so that entry points can patch
gevent before anything else is imported.
"""
__version__ = '0.1.0'
