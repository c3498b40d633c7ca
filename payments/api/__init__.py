"""Transports: HTTP (quart-trio) and gRPC (purerpc), the Auth client and the wire mapping."""
