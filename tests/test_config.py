"""Configuration, TARGET specs and rules: pure parsing, table-driven."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from syncagent.config import (INIT_TEMPLATE, Project, Target, load_project, parse_target_spec,
                              resolve_target, tomllib, write_user_target)
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


# --- the template `syncagent init` writes: every commented setting works once uncommented ---

SETTING = re.compile(r'^(?P<indent>\s*)# (?P<toml>\[[\w."]+\]|[A-Za-z_]\w* = .*|".*",)\s*$')


def template_settings() -> list[tuple[int, int | None]]:
    """(line, line of the [table] it falls under or None) for each commented setting."""
    out, header = [], None
    for i, line in enumerate(INIT_TEMPLATE.splitlines()):
        m = SETTING.match(line) or re.match(r"^(?P<toml>\[[\w.\"]+\])\s*$", line)
        if not m:
            continue
        if m["toml"].startswith("["):
            header = i
        if line.lstrip().startswith("#"):
            out.append((i, header))
    return out


def uncomment(lines: list[str], indexes) -> list[str]:
    out = list(lines)
    for i in indexes:
        m = SETTING.match(out[i])
        if m:
            out[i] = m["indent"] + m["toml"]
    return out


def companions(lines: list[str], header: int | None) -> set[int]:
    """A line's [table] line, and for a target its required `host`."""
    if header is None:
        return set()
    found = {header}
    for i in range(header + 1, len(lines)):
        if lines[i].lstrip("# ").startswith("["):
            break
        if lines[i].startswith("# host = "):
            found.add(i)
    return found


@pytest.fixture
def known_targets(tmp_path, monkeypatch):
    """The template's group names gpu and gpu2: registered as user targets (as `sandbox up`
    registers its own), so a group line can be tried on its own."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("gpu", "gpu2"):
        write_user_target(Target(name, f"{name}.example"))


def load_template_text(tmp_path: Path, text: str):
    root = tmp_path / "project"
    root.mkdir(exist_ok=True)
    (root / "syncagent.toml").write_text(text)
    return load_project(root), tomllib.loads(text)


def test_template_has_settings_to_try():
    keys = {SETTING.match(INIT_TEMPLATE.splitlines()[i])["toml"].split(" ")[0]
            for i, _ in template_settings()}
    assert {"restart_on", "mass_delete_ratio", "default_target", "restart_policy", "[groups]",
            "gpus", "[targets.gpu]", "host", "port", "restart_mode"} <= keys


@pytest.mark.parametrize("index", [i for i, _ in template_settings()],
                         ids=lambda i: INIT_TEMPLATE.splitlines()[i].strip("# ")[:30])
def test_each_template_line_works_uncommented(tmp_path, known_targets, index):
    lines = INIT_TEMPLATE.splitlines()
    header = dict(template_settings())[index]
    text = "\n".join(uncomment(lines, {index} | companions(lines, header))) + "\n"
    project, data = load_template_text(tmp_path, text)
    m = SETTING.match(lines[index])
    if "=" in m["toml"]:  # the key lands where the template says it does
        key = m["toml"].split(" = ")[0]
        table = data
        if header is not None:
            for part in lines[header].strip("# []").replace('"', "").split("."):
                table = table[part]
        assert key in table, f"{key} did not land in its table"
    if lines[index].startswith("# restart_policy"):
        assert project.restart_policy == "rolling" and not project.groups


def test_whole_template_uncommented_is_a_valid_config(tmp_path, known_targets):
    lines = INIT_TEMPLATE.splitlines()
    text = "\n".join(uncomment(lines, range(len(lines)))) + "\n"
    project, _ = load_template_text(tmp_path, text)
    assert project.groups == {"gpus": ("gpu", "gpu2")}
    assert project.restart_policy == "rolling"
    assert project.targets["gpu"].port == 2222
    assert project.exclude == ("media/", "!data/fixtures/")
    assert "*.yml" in project.restart_on


def test_init_writes_a_config_that_loads(tmp_path, capsys):
    from syncagent.cli import main

    assert main(["init", "--path", str(tmp_path)]) == 0
    assert load_project(tmp_path).config_file == tmp_path / "syncagent.toml"
    assert main(["init", "--path", str(tmp_path)]) == 2
    assert "exists" in capsys.readouterr().err
