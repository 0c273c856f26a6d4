"""`domainlm console`: create, watch and compare training jobs in the browser (a client of the CLI)."""
