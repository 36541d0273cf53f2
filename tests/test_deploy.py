"""The operator's kit in deploy/: the alert rules pass promtool, and neither the rules nor the
Grafana dashboard name a metric the sidecar does not export.

The names are checked against a real sidecar's /metrics (its `# TYPE` lines, with the
suffixes a histogram's samples add: `_bucket`, `_sum`, `_count`), so a
renamed metric fails here rather than as an empty panel or an alert that can never fire. The
dashboard's queries are also handed to promtool as recording rules, which parses their PromQL.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.peers.mcp_clients import eventually
from tests.peers.ops import Admin, assert_session_not_found, mcp_session, raw_post
from tests.peers.processes import SidecarFactory, UpstreamHandle

pytestmark = pytest.mark.one_path  # admin, store and CLI: nothing through the proxy

P = "mcp_sidecar_"
DEPLOY = Path(__file__).parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "mcp-sidecar.json"
PROMTOOL = shutil.which("promtool")
METRIC = re.compile(r"\bmcp_sidecar_[a-z_]+\b")
# prometheus-client's text format already names counters `..._total` in their TYPE line.
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count")}

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (Debian's prometheus) is not installed; .ci/run installs it"
)


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def dashboard_queries() -> list[str]:
    return [
        target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])
    ]


@needs_promtool
def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=RULES.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Grafana's variables replaced by what they expand to, each query as a recording rule."""
    rules = {"groups": [{"name": "dashboard", "rules": []}]}
    for number, query in enumerate(dashboard_queries()):
        expr = query.replace("$__rate_interval", "5m").replace("$job", ".*")
        rules["groups"][0]["rules"].append(
            {"record": f"dashboard:query_{number}", "expr": expr.replace("$instance", ".*")}
        )
    # JSON is YAML: promtool reads it as a rules file.
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules), encoding="utf-8")
    checked = promtool("check", "rules", path.name, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_has_datasource_and_instance_variables_and_uses_them() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "instance" in variables
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])
    titles = " ".join(p["title"].lower() for p in panels)
    for wanted in ("sessions by state", "rejections", "overhead", "upstream", "store flush"):
        assert wanted in titles


async def test_dashboard_and_rules_name_only_metrics_the_sidecar_exports(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    async with mcp_session(sidecar.url) as client:
        assert await client.echo("scrape") == "scrape"
    text = (await Admin(sidecar.admin_url).get("/metrics")).text
    exported = exported_names(text)
    assert "mcp_sidecar_session_limit" in exported
    assert "mcp_sidecar_ready" in exported
    assert "mcp_sidecar_stuck_clients" in exported
    for source in (RULES, RULE_TESTS, DASHBOARD):
        named = set(METRIC.findall(source.read_text(encoding="utf-8")))
        assert named, source.name
        unknown = sorted(named - exported)
        assert unknown == [], f"{source.name} names metrics the sidecar does not export"


async def test_limit_ready_and_stuck_gauges_show_the_config_and_the_clients(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(
        upstream.url, sessions={"max_sessions": 50, "max_sessions_per_client": 5}
    )
    admin = Admin(sidecar.admin_url)
    scrape = await admin.scrape()
    assert scrape.value(P + "session_limit", scope="global") == 50
    assert scrape.value(P + "session_limit", scope="per_client") == 5
    assert scrape.value(P + "ready") == 1
    assert scrape.value(P + "stuck_clients") == 0
    async with mcp_session(sidecar.url) as client:
        closed_id = client.session_id
    assert_session_not_found(await raw_post(sidecar.url, closed_id))
    assert (await admin.scrape()).value(P + "stuck_clients") == 1
    # The session's creation and its close, each committed before its answer (SPEC 2.6).
    assert (await admin.scrape()).value(P + "store_transactions") >= 2
    sidecar.reload(sessions={"max_sessions": 80, "max_sessions_per_client": 0})

    async def reloaded() -> bool:
        return (await admin.scrape()).value(P + "session_limit", scope="global") == 80

    await eventually(reloaded, what="the reloaded max_sessions in session_limit")
    assert (await admin.scrape()).value(P + "session_limit", scope="per_client") == 0


def exported_names(exposition: str) -> set[str]:
    """Every sample name the page can carry, from its `# TYPE name kind` lines."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            names.update(family + suffix for suffix in SUFFIXES.get(kind, ("",)))
    return names
