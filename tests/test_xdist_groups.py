"""`make test` keeps each xdist group on one worker (`--dist loadgroup`): the micro DAG fixture, built once
per session, and the real-Slurm tests rely on it. pytest-xdist 3.8 marks a group by rewriting the node id
(`item._nodeid`), which pytest 9.2 no longer reads: the groups were silently split across workers and the
micro DAG built twice. This fails where that happens again (requirements.txt pins a pytest that works)."""
import pytest


@pytest.mark.xdist_group("probe")
def test_xdist_groups_take_effect(request):
    if not getattr(request.config.option, "loadgroup", False):  # set on xdist's workers under loadgroup
        pytest.skip("not run under `--dist loadgroup` (make test runs it so)")
    nodeid = request.node.nodeid
    group = nodeid.rsplit("@", 1)[1] if nodeid.rfind("@") > nodeid.rfind("]") else ""
    assert group == "probe", "pytest-xdist's loadgroup did not mark this test's group: groups are split"
