"""Stand-in of modules/paths.py: `script_path` is the WebUI root (paths_internal.py:9)."""
import os

script_path = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
