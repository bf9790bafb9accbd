"""Stand-in of Forge's `backend` package (see tests/standins_forge/README.md)."""
