"""Authentication and tenancy for fleet's HTTP ingress (see ``fleet.security.keys``)."""
