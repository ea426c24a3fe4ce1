"""meshd: per-user mesh daemon and broker (entry script)."""
from gevent import monkey; monkey.patch_all()  # noqa: E702 - before every other import

from meshd.cli import main

if __name__ == '__main__':
    main()
