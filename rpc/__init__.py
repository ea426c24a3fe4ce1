"""Newline-delimited JSON-RPC 2.0 over a Unix socket and loopback TCP, on gevent.

This package never imports `meshd` (DESIGN.md 1): the daemon registers its methods in a
`MethodTable` and hands it to an `RpcServer`; the CLI and the tests share `RpcClient`.
"""
