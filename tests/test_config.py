"""Configuration, TARGET specs and rules: pure parsing, table-driven."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncagent.config import Project, Target, load_project, parse_target_spec, resolve_target
from syncagent.errors import ConfigError, TargetError
from syncagent.ignore import build_rules, rebase_gitignore


@pytest.mark.parametrize("spec,expected", [
    ("gpu", (None, "gpu", None)),
    ("winter@192.168.1.119", ("winter", "192.168.1.119", None)),
    ("winter@192.168.1.119:2222", ("winter", "192.168.1.119", 2222)),
    ("host.example:22", (None, "host.example", 22)),
    ("u@[::1]:2200", ("u", "::1", 2200)),
])
def test_target_specs(spec, expected):
    assert parse_target_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "a@", "@h", "h:", "h:0", "h:70000", "h:x", "a b", "u@h@x",
                                  "h/p", "-oProxyCommand=x"])
def test_bad_target_specs(spec):
    with pytest.raises(TargetError):
        parse_target_spec(spec)


def project(tmp_path, **kw):
    return Project(root=tmp_path / "ClippyFront", **kw)


def test_remote_path_precedence(tmp_path):
    gpu = Target("gpu", "h", remote_path="/srv/app")
    p = project(tmp_path, targets={"gpu": gpu})
    assert resolve_target("gpu", p, env={}).remote_path == "/srv/app"
    assert resolve_target("gpu", p, remote_path="/x", env={}).remote_path == "/x"
    assert resolve_target("u@h", p, env={}).remote_path == "~/ClippyFront"
    assert resolve_target("u@h", p, env={"REMOTE_PATH": "/r"}).remote_path == "/r"


def test_env_fallbacks_of_sync_to_remote_sh(tmp_path):
    t = resolve_target(None, project(tmp_path), env={
        "REMOTE_HOST": "192.168.1.119", "REMOTE_USER": "winter", "REMOTE_PORT": "2222"})
    assert (t.host, t.user, t.port, t.remote_path) == ("192.168.1.119", "winter", 2222,
                                                       "~/ClippyFront")
    with pytest.raises(TargetError):
        resolve_target(None, project(tmp_path), env={})
    with pytest.raises(TargetError):
        resolve_target(None, project(tmp_path), env={"REMOTE_HOST": "h", "REMOTE_PORT": "x"})


def test_single_configured_target_is_the_default(tmp_path):
    p = project(tmp_path, targets={"gpu": Target("gpu", "h"), "sandbox": Target("sandbox", "s")},
                project_targets=("gpu",))
    assert resolve_target(None, p, env={}).name == "gpu"


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "syncagent.toml").write_text(text)
    return tmp_path


def test_config_file_is_read(tmp_path):
    root = write(tmp_path, 'exclude = ["media/"]\n[targets.gpu]\nhost = "h"\nport = 2222\n')
    p = load_project(root)
    assert p.exclude == ("media/",)
    assert p.targets["gpu"].port == 2222


def test_pyproject_section(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.syncagent]\nexclude = ["x/"]\n')
    assert load_project(tmp_path).exclude == ("x/",)


@pytest.mark.parametrize("text,needle", [
    ("exclude = [\n", "invalid TOML"),
    ('exclude = "x"\n', "syncagent.toml:1: 'exclude' must be a list"),
    ('\n\nexclud = []\n', "syncagent.toml:3: unknown key 'exclud'"),
    ('[targets.gpu]\nhost = "h"\nprot = 1\n', "syncagent.toml:3: unknown key 'prot' in [targets.gpu]"),
    ('[targets.gpu]\nhost = "h"\nport = "22"\n', "port must be an integer"),
    ('[targets.gpu]\nuser = "u"\n', "needs a 'host'"),
])
def test_malformed_config_names_file_line_and_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        load_project(write(tmp_path, text))
    assert needle in str(e.value)
    assert e.value.exit_code == 2


@pytest.mark.parametrize("path,is_dir,excluded", [
    ("venv", True, True), (".venv", True, True), ("app/__pycache__", True, True),
    ("x.pyc", False, True), (".git", True, True), ("instance", True, True),
    (".env", False, True), (".env.worker", False, True), (".env.worker.example", False, False),
    ("bin/ffmpeg", False, True), ("bin/tool", False, False), ("a/data", True, True),
    ("x.log", False, True), ("a.py.swp", False, True), ("4913", False, True),
    ("a.py~", False, True), (".#a.py", False, True), ("a.py___jb_tmp___", False, True),
    (".syncagent", True, True), ("app/tasks.py", False, False), ("node_modules", True, True),
])
def test_default_rules(path, is_dir, excluded):
    assert build_rules().excluded(path, is_dir) == excluded


def test_config_negates_and_gitignores_nest():
    rules = build_rules(extra=["!data/", "*.bin"], gitignores={"": ["/build"], "sub": ["*.out"]})
    assert not rules.excluded("data", True)
    assert rules.excluded("x.bin")
    assert rules.excluded("build", True) and not rules.excluded("a/build", True)
    assert rules.excluded("sub/deep/a.out") and not rules.excluded("a.out")


def test_rebase_gitignore():
    assert rebase_gitignore("d", ["# c", "", "*.o", "/top", "a/b", "!keep.o", "dir/"]) == [
        "d/**/*.o", "d/top", "d/a/b", "!d/**/keep.o", "d/**/dir/"]
