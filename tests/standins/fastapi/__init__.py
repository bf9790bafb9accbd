"""Stand-in of the fastapi package (the host's: AUTOMATIC1111 pins 0.94.0, Forge 0.104.1): only `fastapi.responses`."""
