"""Transports: HTTP (quart-trio) and gRPC (purerpc), their error tables and the wire mapping."""
