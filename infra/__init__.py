"""Helpers both services share that are not the wire format: registries, the metrics server,
rate-limited logging, the CLI parser and URL storage (fsspec).

Floor plan: ``infra`` sits on the ground floor beside ``protocol`` and imports neither service.
"""
