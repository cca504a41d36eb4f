"""rlhfkit.clients: Python clients (sync and asyncio) and the `rlhfkit` command line."""

from rlhfkit.clients.client import AsyncClient, Client, generate_request

__all__ = ["AsyncClient", "Client", "generate_request"]
