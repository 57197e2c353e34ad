"""Real deployment: TLS/auth material and a launcher for SuperLink + SuperNodes on one host."""
