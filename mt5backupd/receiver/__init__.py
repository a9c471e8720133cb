"""The backup receiver: an aiohttp server storing uploads atomically, verified, per client."""
