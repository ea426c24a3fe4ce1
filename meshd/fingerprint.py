"""Host fingerprint: catches a daemon directory copied to another machine (spec/daemon.md §1.3).

Not attacker-grade: it stops restored backups and cloned home directories from running a
second daemon under the same identity. v2 (current) hashes the machine id and a stable
hardware MAC; v1 records are recognised only to upgrade them.
"""
import hashlib
import json
import re
import socket

import psutil

from meshd import files
from meshd.clock import iso_now

MATCH, MISMATCH, FIRST_RUN, UNAVAILABLE = 'match', 'mismatch', 'first_run', 'unavailable'

_V2_IGNORE = re.compile(r'^(lo|docker|br-|bridge|veth|tap|tun|tailscale|wg|utun|ppp|vboxnet|'
                        r'vmnet|awdl|llw|anpi|ap\d)', re.IGNORECASE)
_V1_IGNORE = re.compile(r'^(lo|docker|br-|veth|tap|tun|tailscale|wg|utun|ppp|vboxnet|vmnet|'
                        r'awdl|llw)', re.IGNORECASE)
_ZERO_MAC = '00:00:00:00:00:00'
_MACHINE_ID_FILES = ('/etc/machine-id', '/var/lib/dbus/machine-id')


def host_id(machine_id_files=_MACHINE_ID_FILES):
    """'linux:' + the first non-empty machine id, or '' when there is none."""
    for path in machine_id_files:
        text = (files.read_text(path) if _readable(path) else None) or ''
        if text.strip():
            return 'linux:' + text.strip()
    return ''


def _readable(path):
    try:
        with open(path, 'rb'):
            return True
    except OSError:
        return False


def _link_family():
    return getattr(psutil, 'AF_LINK', getattr(socket, 'AF_PACKET', None))


def interface_macs():
    """[(name, mac)] of interfaces that have a non-loopback IP address and a non-zero MAC.

    Node's os.networkInterfaces() lists only interfaces with an IP address; this mirrors it
    so that a record written by claudemesh on the same host hashes the same.
    """
    link = _link_family()
    result = []
    for name, addresses in sorted(psutil.net_if_addrs().items()):
        has_ip = any(a.family in (socket.AF_INET, socket.AF_INET6)
                     and not _is_loopback(a.address) for a in addresses)
        macs = [a.address.lower().replace('-', ':') for a in addresses if a.family == link]
        macs = [mac for mac in macs if mac and mac != _ZERO_MAC]
        if has_ip and macs:
            result.append((name, macs[0]))
    return result


def _is_loopback(address):
    return address.startswith('127.') or address.split('%')[0] == '::1'


def stable_mac_v2(interfaces):
    """The first hardware MAC by interface name; a locally administered one only as fallback."""
    hardware, fallback = [], []
    for name, mac in interfaces:
        if _V2_IGNORE.match(name):
            continue
        first_byte = int(mac.split(':')[0], 16)
        (fallback if first_byte & 0x02 else hardware).append((name, mac))
    chosen = hardware or fallback
    return sorted(chosen)[0][1] if chosen else ''


def mac_v1(interfaces):
    candidates = sorted('%s::%s' % (name, mac) for name, mac in interfaces
                        if not _V1_IGNORE.match(name))
    return candidates[0].split('::', 1)[1] if candidates else ''


def fingerprint_v2(hid, mac):
    return hashlib.sha256(b'v2\x00' + hid.encode() + b'\x00' + mac.encode()).hexdigest()


def fingerprint_v1(hid, mac):
    return hashlib.sha256(hid.encode() + b'\x00' + mac.encode()).hexdigest()


class HostIdentity:
    """The current host's id and MACs, read once."""

    def __init__(self, hid=None, interfaces=None):
        self.host_id = host_id() if hid is None else hid
        self.interfaces = interface_macs() if interfaces is None else interfaces
        self.stable_mac = stable_mac_v2(self.interfaces)

    @property
    def fingerprint(self):
        return fingerprint_v2(self.host_id, self.stable_mac)

    def record(self):
        return {'schema_version': 2, 'fingerprint': self.fingerprint, 'host_id': self.host_id,
                'stable_mac': self.stable_mac, 'written_at': iso_now()}


def write_record(path, identity):
    """Write the current v2 record (0600); return it."""
    record = identity.record()
    files.write_private(path, json.dumps(record, indent=2) + '\n')
    return record


def check(path, identity):
    """Compare the stored record with this host: (outcome, stored record or None)."""
    text = files.read_text(path)
    if text is None:
        return FIRST_RUN, write_record(path, identity)
    try:
        stored = json.loads(text)
    except ValueError:
        return UNAVAILABLE, None
    if not isinstance(stored, dict):
        return UNAVAILABLE, None
    version = stored.get('schema_version')
    if version == 2:
        if stored.get('fingerprint') == identity.fingerprint:
            return MATCH, stored
        stored_id = stored.get('host_id') or ''
        if stored_id and stored_id == identity.host_id:
            write_record(path, identity)  # host_id wins: the MAC moved (dock, VPN, new NIC)
            return MATCH, stored
        return MISMATCH, stored
    if version == 1:
        current_v1 = fingerprint_v1(identity.host_id, mac_v1(identity.interfaces))
        if stored.get('fingerprint') == current_v1:
            write_record(path, identity)
            return MATCH, stored
        return MISMATCH, stored
    return UNAVAILABLE, None


def mismatch_message(stored, identity):
    """The lines printed when the policy refuses to start (spec/daemon.md §1.3)."""
    return ('host_fingerprint mismatch: this daemon dir was started on a different host.\n'
            '  stored host_id: %s\n'
            '  current host_id: %s\n'
            'Run `meshd daemon accept-host` to write a fresh fingerprint.'
            % ((stored or {}).get('host_id', ''), identity.host_id))
