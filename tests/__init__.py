"""meshd test suite. Patches gevent first so nose2 runs patched (STYLE.md fact 3)."""
from gevent import monkey
monkey.patch_all()
