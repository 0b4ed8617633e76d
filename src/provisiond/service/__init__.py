"""The network service: the DPS service REST API, its admin part, and (later) the device API."""
