"""Print the `uv pip install` options that say what this machine's pip configuration says.

infra/setup.sh installs with uv where it can (the same requirements, resolved and unpacked
several times faster than pip), and pip's configuration (config files and PIP_* variables:
the indexes, local wheel folders, constraint files, certificate, timeout) must still decide
where packages come from: on machines whose pip is pointed at local indexes and capped by a
constraint file, an installer that ignored them could pull another multi-GB torch.

Reads `pip config list` (already merged across pip's files; `:env:` entries are PIP_* variables,
which win over `install.` entries, which win over `global.`), and prints one argument per line.
Options with no uv counterpart that change where packages come from (trusted-host, no-index)
are carried over; others (pip's progress bar, its version check) are dropped.
Stdlib only: it runs with the venv's fresh interpreter before anything is installed.
"""
import shlex
import subprocess
import sys

LIST_OPTIONS = {"extra-index-url": "--extra-index-url", "find-links": "--find-links",
                "constraint": "--constraint", "trusted-host": "--allow-insecure-host"}


def pip_config(python):
    """The merged pip configuration as {option: value}, highest precedence winning."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], check=True,
                         capture_output=True, text=True).stdout
    rank = {"global": 0, "install": 1, ":env:": 2}
    best = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        section, _, option = key.rpartition(".")
        if not sep or section not in rank:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if option not in best or rank[section] >= best[option][0]:
            best[option] = (rank[section], value)
    return {option: value for option, (_, value) in best.items()}


def uv_args(config):
    args = []
    if config.get("index-url"):
        args += ["--index-url", config["index-url"]]
    for option, flag in LIST_OPTIONS.items():
        for value in shlex.split(config.get(option, "")):
            args += [flag, value]
    if config.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    return args


def uv_env(config):
    """Environment for uv: the certificate bundle and the timeout pip would use."""
    env = {}
    if config.get("cert"):
        env["SSL_CERT_FILE"] = config["cert"]
    if config.get("default-timeout") or config.get("timeout"):
        env["UV_HTTP_TIMEOUT"] = config.get("timeout") or config["default-timeout"]
    return env


if __name__ == "__main__":
    # usage: pip_to_uv.py [--env]: uv's options, or with --env its NAME=value variables
    config = pip_config(sys.executable)
    if "--env" in sys.argv[1:]:
        lines = [f"{k}={v}" for k, v in uv_env(config).items()]
    else:
        lines = uv_args(config)
    sys.stdout.write("".join(line + "\n" for line in lines))
