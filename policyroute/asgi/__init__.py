"""The request path in ASGI terms: the gate on the router and the bound chains."""
