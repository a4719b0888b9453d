"""Several nodes serving the same domains: the bus between them and the shared session table."""
