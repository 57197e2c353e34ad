"""Flower integration: the ServerApp (round loop) and the ClientApp (client half)."""
