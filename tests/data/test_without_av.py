"""PyAV is the optional `video` extra: without it every unijax module imports, the main job's
and the converter's import chains included, and only the video paths fail, naming the extra."""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# `None` in sys.modules makes `import av` raise ImportError, as if PyAV were not installed.
BLOCK_AV = "import sys; sys.modules['av'] = None\n"


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", BLOCK_AV + textwrap.dedent(code), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_every_module_imports_without_av_and_video_names_the_extra():
    result = _python("""
        import importlib, json, pkgutil
        import unijax.main, unijax.data.write  # the main job's and the converter's chains
        import unijax
        failed = {}
        for m in pkgutil.walk_packages(unijax.__path__, "unijax."):
            if m.name == "unijax.sample":  # defines the same flags as unijax.main
                continue
            try:
                importlib.import_module(m.name)
            except Exception as e:
                failed[m.name] = repr(e)
        from unijax.data import video
        try:
            video.sample_frames(b"not a video")
            message = None
        except ImportError as e:
            message = str(e)
        print(json.dumps({"failed": failed, "message": message, "av": "av" in sys.modules
                          and sys.modules["av"] is not None}))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["failed"] == {} and out["av"] is False
    assert "pip install -e '.[video]'" in out["message"]


def test_write_cli_without_av():
    run_write = """
        import runpy
        sys.argv = ["unijax.data.write", *sys.argv[1:]]
        runpy.run_module("unijax.data.write", run_name="__main__", alter_sys=True)
    """
    result = _python(run_write, "--help")  # absl prints the flags and exits with 1
    assert "Error" not in result.stderr, result.stderr[-3000:]
    assert "--format: <captions|obelics|mmc4|video>" in result.stdout
    result = _python(run_write, "--format=video", f"--input={ROOT}", "--output=/nonexistent/v")
    assert result.returncode != 0
    assert "pip install -e '.[video]'" in result.stderr
