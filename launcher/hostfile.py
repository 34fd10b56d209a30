"""DeepSpeed hostfiles: ``HOST slots=N`` per line, ``#`` comments, blank lines.

`parse_hostfile` accepts what DeepSpeed's own parser (`deepspeed.launcher.runner._parse_hostfile`)
accepts, minus what would only fail later (``slots=0``), and reports *every* problem with its line
number and the fix. `check_resources` compares a hostfile with ``--nodes``/``--gpus``: DeepSpeed
takes the first ``num_nodes`` hosts and ``num_gpus`` slots on each; `select_slots` applies
``--include``/``--exclude`` with DeepSpeed's own parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from maml_ds.config import ConfigError

# DeepSpeed's pattern, anchored at the start of the stripped line; anything after the slot
# count (e.g. an MPI-style "max_slots=8" or a trailing comment) is ignored, as DeepSpeed does.
_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")
_HOST_NAME = re.compile(r"^[A-Za-z0-9._\-]+$")
"""Host names we generate from --hosts: no '@' or ':' (DeepSpeed's --include syntax) nor '#'."""


class HostfileError(ConfigError):
    """A hostfile or --hosts problem; the message names the line or host and the fix."""


@dataclass(frozen=True)
class HostEntry:
    host: str
    slots: int
    line: int | None = None
    """1-based line in the hostfile it came from (None when generated from --hosts)."""


def parse_hostfile(text: str, source: str = "hostfile") -> list[HostEntry]:
    """Entries of a hostfile, in order; raise HostfileError listing every bad line."""
    entries: list[HostEntry] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            problems.append(
                f"{source} line {number}: {line!r} is not 'HOST slots=N' (e.g. 'worker-0 slots=8')"
            )
            continue
        host, slots = match.group(1), int(match.group(2))
        if host in first_line:
            problems.append(
                f"{source} line {number}: host {host} is already listed on line "
                f"{first_line[host]}; list each host once, with all its slots"
            )
            continue
        first_line[host] = number
        if slots < 1:
            problems.append(
                f"{source} line {number}: host {host} has slots={slots}; use slots >= 1"
            )
            continue
        entries.append(HostEntry(host, slots, number))
    if not entries and not problems:
        problems.append(
            f"{source} lists no hosts: write one 'HOST slots=N' line per node (see hostfiles/)"
        )
    if problems:
        raise HostfileError(problems)
    return entries


def read_hostfile(path: str | Path) -> list[HostEntry]:
    path = Path(path)
    if not path.is_file():
        raise HostfileError([f"--hostfile {path} does not exist"])
    return parse_hostfile(path.read_text(), source=str(path))


def hosts_from_list(hosts: str, slots: int) -> list[HostEntry]:
    """Entries for ``--hosts h1,h2,...``, each with `slots` slots."""
    names = [h.strip() for h in hosts.split(",")]
    problems: list[str] = []
    seen: set[str] = set()
    entries: list[HostEntry] = []
    for position, name in enumerate(names, start=1):
        if not name:
            problems.append(f"--hosts {hosts!r}: host {position} is empty (write h1,h2,...)")
        elif not _HOST_NAME.match(name):
            problems.append(
                f"--hosts: {name!r} is not a host name (letters, digits, '.', '-', '_' only)"
            )
        elif name in seen:
            problems.append(f"--hosts: host {name} is listed twice; list each node once")
        else:
            seen.add(name)
            entries.append(HostEntry(name, slots))
    if problems:
        raise HostfileError(problems)
    return entries


def check_resources(
    entries: list[HostEntry], num_nodes: int, gpus_per_node: int, source: str
) -> None:
    """Enough hosts for --nodes and enough slots on each used host for --gpus."""
    problems: list[str] = []
    if len(entries) < num_nodes:
        problems.append(
            f"{source} lists {len(entries)} host(s) ({', '.join(e.host for e in entries)}) but "
            f"--nodes is {num_nodes}: add hosts or lower --nodes"
        )
    for entry in entries[:num_nodes]:
        if entry.slots < gpus_per_node:
            where = f" (line {entry.line})" if entry.line is not None else ""
            problems.append(
                f"{source}: host {entry.host}{where} has slots={entry.slots} but --gpus is "
                f"{gpus_per_node}: raise its slots or lower --gpus"
            )
    if problems:
        raise HostfileError(problems)


def format_hostfile(entries: list[HostEntry]) -> str:
    return "".join(f"{e.host} slots={e.slots}\n" for e in entries)


def select_slots(
    entries: list[HostEntry], include: str | None, exclude: str | None
) -> list[HostEntry]:
    """The hosts and slot counts that DeepSpeed's ``--include``/``--exclude`` leave of `entries`
    (``host1:0,1@host2`` syntax), computed by DeepSpeed's own parser."""
    from deepspeed.launcher.runner import parse_inclusion_exclusion

    flag = "--include" if include else "--exclude"
    try:
        active = parse_inclusion_exclusion(
            {e.host: e.slots for e in entries}, include or "", exclude or ""
        )
    except (ValueError, KeyError) as err:
        raise HostfileError([f"{flag} {include or exclude!r}: {err}"]) from None
    selected = [HostEntry(host, len(slots)) for host, slots in active.items() if slots]
    if not selected:
        raise HostfileError([f"{flag} {include or exclude!r} leaves no slot to run on"])
    return selected
