"""meshd: install from a checkout into a dedicated virtual environment (never `pip install meshd`:
PyPI's `meshd`, `rpc` and `storage` are unrelated projects; DESIGN.md 24)."""
import pathlib
import re

from setuptools import setup

# Read, never import: under PEP 517 the checkout is not on sys.path while setup.py runs.
_VERSION_FILE = pathlib.Path(__file__).with_name('meshd') / '__init__.py'
__version__ = re.search(r"^__version__ = '([^']+)'", _VERSION_FILE.read_text(), re.M).group(1)

setup(
    name='meshd',
    version=__version__,
    description='Per-user mesh daemon and self-hostable broker for AI coding-agent sessions',
    license='MIT',
    python_requires='>=3.9',
    # Never py_modules=['meshd'] beside packages=['meshd']: meshd.py would shadow the package.
    packages=['meshd', 'meshd.api', 'meshd.broker', 'meshd.claude', 'meshd.cli', 'rpc', 'storage'],
    # Ranges admit Debian 12's packaged versions and current PyPI releases (DESIGN.md 7).
    install_requires=[
        'gevent>=22.10',
        'gevent-websocket>=0.10.1',
        'websocket-client>=1.2.3',
        'PyNaCl>=1.5',
        'peewee>=3.14',
        'psutil>=5.9',
        'argh>=0.26.2',
    ],
    extras_require={
        'postgresql': ['psycopg2-binary>=2.9', 'psycogreen>=1.0'],
        # The MCP SDK drives `meshd mcp` in one test, as a client (never in the product).
        'test': ['nose2>=0.12', 'mcp>=1.2; python_version >= "3.10"'],
    },
    entry_points={'console_scripts': ['meshd = meshd.entry:main']},
)
