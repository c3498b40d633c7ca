"""Metrics (prometheus-client) and traces (OpenTelemetry): README "Observability".

``metrics`` defines every metric and serves ``/metrics``; ``tracing`` owns the tracer
provider and trace-context propagation; ``transports`` is the HTTP and gRPC middleware;
``hooks`` holds the one call each other path (unit of work, Stripe, dispatcher) makes.
"""
