"""The Ray shell around the pure policies: actors, Serve deployments and the driver API."""
