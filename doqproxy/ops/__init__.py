"""Running in production: config reload, metrics, query log, systemd, privileges."""
