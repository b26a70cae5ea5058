"""Command-line interfaces: ``mesh-agent`` and ``mesh-policy`` (thin layers over the SDK)."""
