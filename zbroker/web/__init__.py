"""`zbroker web`: the broker over HTTP, Server-Sent Events and WebSocket (docs/web.md).

A separate process and an ordinary client of the broker; it needs aiohttp, which
`pip install 'zbroker[web]'` brings.
"""
