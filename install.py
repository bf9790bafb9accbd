"""Run by the WebUI at start-up (modules/launch_utils.py:228-240): install only what the WebUI lacks.

Everything DynFuse needs at run time ships with AUTOMATIC1111 v1.10 and Forge (torch, safetensors, numpy,
Pillow, transformers, open-clip-torch). This only fills a gap, with the version the WebUI itself pins, and
never upgrades or replaces a package that is already there.
"""
import launch

# (import name, pip requirement used only when the import name is missing)
NEEDED = [
    ("safetensors", "safetensors"),
    ("open_clip", "open-clip-torch==2.20.0"),
]

for module, requirement in NEEDED:
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"{requirement} for DynFuse")
