"""Drive `meshd mcp` with the official MCP Python SDK's client (run by tests/test_mcp.py).

A separate process, not imported by the suite: the SDK runs on asyncio, the suite on gevent.
It spawns the server with this environment, initializes, lists the tools, calls two of them
and prints one `key value` line per result. The DM target is MESHD_TEST_TARGET.
"""
import asyncio
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

ENTRY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'meshd.py')


def text_of(result):
    if result.is_error:
        raise SystemExit('tool failed: %s' % result.content[0].text)
    return ' '.join(part.text for part in result.content).replace('\n', ' | ')


async def main():
    server = StdioServerParameters(command=sys.executable, args=[ENTRY, 'mcp'],
                                   env=dict(os.environ))
    async with stdio_client(server) as (read, write):
        async with ClientSession(read, write) as session:
            initialized = await session.initialize()
            print('server', initialized.server_info.name)
            print('version', initialized.protocol_version)
            tools = await session.list_tools()
            print('tools', ','.join(tool.name for tool in tools.tools))
            print('mesh_status', text_of(await session.call_tool('mesh_status', {})))
            sent = await session.call_tool('send_message', {
                'to': os.environ['MESHD_TEST_TARGET'], 'message': 'from the sdk'})
            print('send_message', text_of(sent))


if __name__ == '__main__':
    asyncio.run(main())
