"""The last hop into Claude Code (spec/agents.md, DESIGN.md 26): the `meshd mcp` server, the
`meshd hook` command, and `meshd install-claude`, which writes both into Claude Code's
configuration."""
