"""sd_notify without a dependency: does nothing when $NOTIFY_SOCKET is unset."""
import os
import socket


def notify(state):
    """Send `state` (e.g. 'READY=1') to the service manager; False when there is none."""
    address = os.environ.get('NOTIFY_SOCKET')
    if not address:
        return False
    if address.startswith('@'):
        address = '\0' + address[1:]  # abstract namespace
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect(address)
        sock.sendall(state.encode('utf-8'))
        return True
    except OSError:
        return False
    finally:
        sock.close()
