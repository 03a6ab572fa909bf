"""Launch scripts: TPU-pod renderers (XManager, xpk, TPU VMs) and a local multi-process launcher.

Run from the repository root (`python -m launch.pod ...`, `python -m launch.local ...`); the
package never imports this folder.
"""
