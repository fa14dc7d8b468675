"""ddsuite.applications: continual replay, federated uploads, NAS proxies, privacy."""
