"""--format Go templates and images --filter (issue 13): what docker's users script with.

The template cases are those docker's documentation shows for inspect, images and ps; the
expected text is what Go's text/template prints for the same data."""

from __future__ import annotations

import json

import pytest

from kiln.gotemplate import Template, TemplateError, render_rows
from tests.builder.conftest import broot, build_context, kb  # noqa: F401 - fixtures

DATA = {"Id": "sha256:ab", "Config": {"Env": ["A=1", "B=2"], "Labels": {"x": "1", "a b": "é"},
                                      "Cmd": None},
        "RepoTags": [], "Size": 12, "Ok": True}


@pytest.mark.parametrize("template, want", [
    ("{{.Id}}", "sha256:ab"),
    ("{{.Config.Env}}", "[A=1 B=2]"),
    ("{{json .Config.Env}}", '["A=1","B=2"]'),
    ("{{.Config.Env | json}}", '["A=1","B=2"]'),
    ("{{json .Config.Env}}{{json .Size}}", '["A=1","B=2"]12'),
    ('{{index .Config.Labels "a b"}}', "é"),
    ('{{join .Config.Env ","}}', "A=1,B=2"),
    ("{{range .Config.Env}}<{{.}}>{{end}}", "<A=1><B=2>"),
    ("{{range .RepoTags}}{{.}}{{else}}untagged{{end}}", "untagged"),
    ("{{if .RepoTags}}tagged{{else}}none{{end}}", "none"),
    ("{{.Config.Labels}}", "map[a b:é x:1]"),
    ("{{.Nope}} {{.Config.Nope.Deeper}}", "<no value> <no value>"),
    ("{{len .Config.Env}} {{.Ok}} {{.Size}}", "2 true 12"),
    ("a {{- .Id -}} b", "asha256:abb"),
    ("{{upper .Id}}", "SHA256:AB"),
])
def test_templates_print_as_go_does(template, want):
    assert Template(template).render(DATA) == want


@pytest.mark.parametrize("template, why", [
    ("{{.Id", "not closed"), ("{{nosuch .Id}}", "function 'nosuch' not defined"),
    ("{{range .X}}", "without {{end}}"), ("{{end}}", "unexpected {{end}}"),
    ("{{}}", "empty action"),
])
def test_bad_templates_are_clear_errors(template, why):
    with pytest.raises(TemplateError, match=why.replace("{", r"\{").replace("}", r"\}")):
        Template(template)


def test_table_aligns_columns_under_docker_headers():
    out = render_rows(r"table {{.ID}}\t{{.Repository}}", [{"ID": "abc", "Repository": "x/y"},
                                                         {"ID": "defgh", "Repository": "z"}],
                      {"ID": "IMAGE ID"})
    assert out == "IMAGE ID   REPOSITORY\nabc        x/y\ndefgh      z\n"


def test_images_inspect_and_ps_formats_and_filters(kb, tmp_path):  # noqa: F811
    ctx = build_context(tmp_path, 'FROM busybox\nLABEL tier=web\nRUN echo > /made\n')
    kb("build", "-q", "-t", "webapp:1", str(ctx))
    kb("build", "-q", str(build_context(tmp_path, "FROM busybox\nRUN echo two > /two\n",
                                        name="dangling")))
    out = kb("images", "--format", "{{.Repository}}:{{.Tag}}").out.split()
    assert "docker.io/library/webapp:1" in out and "<none>:<none>" in out
    assert kb("images", "-f", "reference=webapp", "--format", "{{.Tag}}").out == "1\n"
    assert kb("images", "-f", "label=tier=web", "--format", "{{.Repository}}").out == (
        "docker.io/library/webapp\n")
    dangling = kb("images", "-f", "dangling=true", "--format", "{{.Repository}}").out
    assert dangling == "<none>\n"
    assert kb("images", "-f", "label=tier=db", "-q").out == ""
    table = kb("images", "-f", "reference=webapp", "--format", r"table {{.ID}}\t{{.Tag}}").out
    header, row = table.splitlines()
    assert header.split() == ["IMAGE", "ID", "TAG"] and row.split()[1] == "1"
    p = kb("images", "-f", "colour=red", check=False)
    assert p.returncode == 125 and "invalid filter" in p.err
    info = json.loads(kb("inspect", "webapp:1").out)[0]
    assert kb("inspect", "--format", "{{.Id}} {{index .Config.Labels \"tier\"}}",
              "webapp:1").out == f"{info['Id']} web\n"
    assert json.loads(kb("inspect", "-f", "{{json .Config}}", "webapp:1").out) == info["Config"]
    p = kb("inspect", "-f", "{{.Id", "webapp:1", check=False)
    assert p.returncode == 125 and "not closed" in p.err
    kb("run", "--name", "fmt-ps", "--network", "none", "webapp:1", "true")
    try:
        out = kb("ps", "-a", "--format", "{{.Names}} {{.State}} {{.Image}} {{.Command}}").out
        assert "fmt-ps exited webapp:1 \"true\"" in out
    finally:
        kb("rm", "fmt-ps", check=False)


def test_version_info_and_system_df(kb, tmp_path):  # noqa: F811
    from kiln import __version__

    assert kb("version", "-f", "{{.Client.Version}}").out == f"{__version__}\n"
    assert json.loads(kb("version", "-f", "json").out)["Client"]["Arch"]
    info = json.loads(kb("info", "-f", "json").out)
    assert info["StoreRoot"] == str(kb.root) and info["Driver"] == "overlay"
    assert info["CgroupVersion"] in ("1", "2") and info["Images"] >= 1
    assert kb("system", "info", "-f", "{{.Images}}").out == f"{info['Images']}\n"

    def df() -> dict:
        return {r["Type"]: r for r in json.loads(kb("system", "df", "--format", "json").out)}

    before = df()
    ctx = build_context(tmp_path, "FROM busybox\nRUN head -c 300000 /dev/urandom > /blob\n")
    kb("build", "-q", "-t", "dfimage", str(ctx))
    kb("run", "--name", "df-ctr", "--network", "none", "dfimage", "sh", "-c",
       "head -c 200000 /dev/urandom > /written")
    try:
        after = df()
        assert after["Images"]["TotalCount"] == before["Images"]["TotalCount"] + 1
        assert after["Images"]["Size"] - before["Images"]["Size"] >= 600_000  # blob + dir
        assert after["Images"]["Active"] == before["Images"]["Active"] + 1
        assert after["Containers"]["Size"] - before["Containers"]["Size"] >= 200_000
        assert after["Containers"]["Reclaimable"] >= 200_000  # it has exited
        assert after["Build Cache"]["TotalCount"] > before["Build Cache"]["TotalCount"]
        table = kb("system", "df").out.splitlines()
        assert table[0].split() == ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]
    finally:
        kb("rm", "df-ctr", check=False)
