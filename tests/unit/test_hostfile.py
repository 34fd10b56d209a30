"""Hostfiles: DeepSpeed's format, every error with its line/host and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.hostfile import (
    HostEntry,
    HostfileError,
    check_resources,
    format_hostfile,
    hosts_from_list,
    parse_hostfile,
    read_hostfile,
)

REPO = Path(__file__).resolve().parents[2]


def flat(text: str) -> str:
    return " ".join(text.split())


def test_parse_matches_deepspeed_parser():
    from deepspeed.launcher.runner import _parse_hostfile

    text = (
        "# cluster\n"
        "\n"
        "worker-0 slots=8\n"
        "   worker-1   slots=4  # trailing comment\n"
        "worker-2 slots=16 max_slots=16\n"
    )
    ours = parse_hostfile(text)
    assert ours == [
        HostEntry("worker-0", 8, 3),
        HostEntry("worker-1", 4, 4),
        HostEntry("worker-2", 16, 5),
    ]
    assert dict(_parse_hostfile(text.splitlines())) == {e.host: e.slots for e in ours}


@pytest.mark.parametrize(
    "line",
    ["worker-0 slots=8", "worker-0\tslots=2", "w slots=1 extra", "worker-0 slot=8",
     "worker-0", "slots=8", "worker-0 slots=", "worker-0 slots=x"],
)  # fmt: skip
def test_accepts_exactly_what_deepspeed_accepts(line):
    from deepspeed.launcher.runner import _parse_hostfile

    try:
        _parse_hostfile([line])
        deepspeed_ok = True
    except ValueError:
        deepspeed_ok = False
    try:
        parse_hostfile(line)
        ours_ok = True
    except HostfileError:
        ours_ok = False
    assert ours_ok == deepspeed_ok


def test_bad_line_names_line_and_format():
    with pytest.raises(HostfileError) as err:
        parse_hostfile("worker-0 slots=8\nworker-1 slot=8\n", source="hf")
    msg = flat(str(err.value))
    assert "hf line 2" in msg and "'worker-1 slot=8'" in msg and "HOST slots=N" in msg


def test_duplicate_host_names_both_lines():
    with pytest.raises(HostfileError) as err:
        parse_hostfile("a slots=8\nb slots=8\n\na slots=4\n", source="hf")
    msg = flat(str(err.value))
    assert "hf line 4: host a is already listed on line 1" in msg
    assert "list each host once" in msg


def test_zero_slots_and_every_problem_at_once():
    with pytest.raises(HostfileError) as err:
        parse_hostfile("a slots=0\nbad line\na slots=2\n", source="hf")
    problems = err.value.problems
    assert len(problems) == 3
    assert "slots=0" in problems[0] and "line 2" in problems[1] and "line 3" in problems[2]


def test_empty_hostfile():
    with pytest.raises(HostfileError, match="lists no hosts"):
        parse_hostfile("# only a comment\n\n")


def test_missing_hostfile(tmp_path):
    with pytest.raises(HostfileError, match="does not exist"):
        read_hostfile(tmp_path / "nope")


def test_hosts_list():
    assert hosts_from_list("n0, n1", 4) == [HostEntry("n0", 4), HostEntry("n1", 4)]
    with pytest.raises(HostfileError) as err:
        hosts_from_list("n0,,n0,a@b", 2)
    msg = flat(str(err.value))
    assert "host 2 is empty" in msg
    assert "host n0 is listed twice" in msg
    assert "'a@b' is not a host name" in msg


def test_fewer_hosts_than_nodes():
    with pytest.raises(HostfileError) as err:
        check_resources([HostEntry("a", 8, 1)], num_nodes=2, gpus_per_node=8, source="hf")
    msg = flat(str(err.value))
    assert "hf lists 1 host(s) (a) but --nodes is 2" in msg and "add hosts or lower --nodes" in msg


def test_fewer_slots_than_gpus_names_host_and_line():
    entries = parse_hostfile("a slots=8\nb slots=4\nc slots=1\n", source="hf")
    with pytest.raises(HostfileError) as err:
        check_resources(entries, num_nodes=2, gpus_per_node=8, source="hf")
    msg = flat(str(err.value))
    assert "host b (line 2) has slots=4 but --gpus is 8" in msg
    assert "raise its slots or lower --gpus" in msg
    # hosts beyond --nodes are not used (DeepSpeed takes the first num_nodes): c is fine
    check_resources(entries, num_nodes=1, gpus_per_node=8, source="hf")


def test_format_round_trip():
    entries = [HostEntry("a", 8), HostEntry("b", 2)]
    text = format_hostfile(entries)
    assert text == "a slots=8\nb slots=2\n"
    assert [(e.host, e.slots) for e in parse_hostfile(text)] == [("a", 8), ("b", 2)]


@pytest.mark.parametrize(
    ("name", "nodes", "gpus"), [("v100-1x8", 1, 8), ("v100-2x8", 2, 8), ("localhost", 1, 2)]
)
def test_example_hostfiles(name, nodes, gpus):
    entries = read_hostfile(REPO / "hostfiles" / name)
    assert len(entries) == nodes and all(e.slots == gpus for e in entries)
    check_resources(entries, nodes, gpus, name)
