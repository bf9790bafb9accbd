"""Stand-in of the AUTOMATIC1111 `modules` package (see tests/standins/README.md)."""
