"""meshd's self-hostable broker (`meshd broker`), speaking the claudemesh broker protocol.

Modules, in dependency order: protocol (frames, codes, strings), store (peewee models,
migrations, write lock), invite (v1 minting and POST /join), admin (broker-admin verbs),
wsock (the gevent-websocket subclass: frame limits, close frames, pongs), ratelimit, handshake
(hello checks), presence (the connection map), delivery (send, drains, claims, fan-out), http
(the plain HTTP routes), server (BrokerServer, which wires them together), cli (argh commands).
Library modules never monkey-patch gevent; the entry points do.
"""
