"""Secure aggregation (SecAgg+, issue 25): placeholder, replaced below."""
