"""Stand-in of modules/shared.py: only `sd_model` (the loaded ForgeDiffusionEngine), set by tests."""
sd_model = None
