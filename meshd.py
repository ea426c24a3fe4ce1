"""meshd: per-user mesh daemon and broker (entry script). meshd/entry.py decides what runs."""
from meshd.entry import main

if __name__ == '__main__':
    main()
