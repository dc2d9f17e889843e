"""infra/pip_to_uv.py: infra/setup.sh installs with uv, and what pip's configuration says (its
files and PIP_* variables) must reach uv as options, with pip's precedence (a PIP_* variable over
an [install] entry over a [global] one), or an install could ignore a local index or the
constraint file that caps torch. Runs pip's own `pip config list` on a config file of ours."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.servers import REPO

SCRIPT = REPO / "infra" / "pip_to_uv.py"


def _run(tmp_path, conf: str, env_vars: dict, *args: str) -> list[str]:
    path = tmp_path / "pip.conf"
    path.write_text(conf)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    # only our file (and /etc/pip.conf, which pip always reads): not this machine's /etc/xdg/pip
    env.update(PIP_CONFIG_FILE=str(path), XDG_CONFIG_DIRS=str(tmp_path), **env_vars)
    out = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, check=True,
                         capture_output=True, text=True).stdout
    return out.splitlines()


def _pairs(lines: list[str]) -> list[tuple[str, str]]:
    return list(zip(lines[0::2], lines[1::2]))


def test_pip_options_reach_uv_with_pips_precedence(tmp_path):
    conf = ("[global]\nindex-url = https://mirror.example/simple\n"
            "extra-index-url = file:///a/simple file:///b/simple\n"
            "constraint = /caps/torch.txt\nfind-links = /global/wheels\n"
            "[install]\nfind-links = /install/wheels\n")
    lines = _run(tmp_path, conf, {"PIP_TRUSTED_HOST": "mirror.example"})
    pairs = _pairs(lines)
    assert len(lines) == 2 * len(pairs)
    assert pairs[0] == ("--index-url", "https://mirror.example/simple")
    assert ("--extra-index-url", "file:///a/simple") in pairs
    assert ("--extra-index-url", "file:///b/simple") in pairs
    assert ("--constraint", "/caps/torch.txt") in pairs
    # [install] wins over [global]: only the install section's wheel folder
    assert [v for k, v in pairs if k == "--find-links"] == ["/install/wheels"]
    assert ("--allow-insecure-host", "mirror.example") in pairs
    assert "--no-index" not in lines

    # a PIP_* variable wins over both sections, and no-index carries over
    lines = _run(tmp_path, conf, {"PIP_FIND_LINKS": "/env/one /env/two", "PIP_NO_INDEX": "1"})
    assert [v for k, v in _pairs(lines[:-1]) if k == "--find-links"] == ["/env/one", "/env/two"]
    assert lines[-1] == "--no-index"


def test_pip_certificate_and_timeout_reach_uvs_environment(tmp_path):
    conf = "[global]\ncert = /certs/global.pem\ntimeout = 30\n"
    assert _run(tmp_path, conf, {}, "--env") == ["SSL_CERT_FILE=/certs/global.pem",
                                                 "UV_HTTP_TIMEOUT=30"]
    env = _run(tmp_path, conf, {"PIP_CERT": "/certs/env.pem"}, "--env")
    assert env[0] == "SSL_CERT_FILE=/certs/env.pem"
    # no index, wheel folder or constraint configured: no options, uv's defaults apply (PyPI)
    assert _run(tmp_path, "[global]\ntimeout = 30\n", {}) == []
