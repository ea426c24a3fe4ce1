"""`python3 -m meshd`: meshd/entry.py decides what runs (gevent is patched by meshd.cli)."""
from meshd.entry import main

if __name__ == '__main__':
    main()
