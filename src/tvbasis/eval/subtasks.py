"""The structured many-task benchmark: 36 sub-tasks carved from the 8 bundled datasets by label groups.

Sub-tasks of one source share its input distribution (the same kind of text) and differ in the labels they
separate, which is the setting the task-vector-bases paper motivates: many tasks with shared structure, where
similar tasks can share a basis. A sub-task keeps the rows of its labels only, in every split, and gets its own
zero-shot head from those labels' names. Names are ``<source>-<k>`` (``hwu-3``), k counting from 1.

How each source is carved (a pure function of its sorted label list, so the carving is deterministic):

=============  ====  ==================================================================================
source         subs  groups
=============  ====  ==================================================================================
20NG           4     by newsgroup hierarchy: comp.*, rec.*, sci.*, the rest (alt, misc, soc, talk)
Yahoo          2     the sorted labels in halves
DBPedia        5     by type family: athletes; places and structures; works and organisations; events;
                     other people and animals
banking        6     the sorted labels in 6 near-equal consecutive groups
clinc          6     the sorted labels in 6 near-equal consecutive groups
hwu            8     by scenario (the label's prefix before ``_``), consecutive scenarios merged until a
                     group has ≥ 6 intents (a short last group joins the one before)
mcid           2     the sorted labels in halves
stackoverflow  3     the sorted labels in 3 near-equal consecutive groups
=============  ====  ==================================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

#: DBPedia's 40 kept fine types by family
DBPEDIA_FAMILIES: dict[str, tuple[str, ...]] = {
    "athletes": ("AmericanFootballPlayer", "AustralianRulesFootballPlayer", "BasketballPlayer", "Cyclist",
                 "FigureSkater", "GaelicGamesPlayer", "GolfPlayer", "Gymnast", "IceHockeyPlayer", "MartialArtist",
                 "TennisPlayer"),
    "places": ("Airport", "Bridge", "Dam", "Diocese", "HistoricBuilding", "Hospital", "Lake", "RailwayLine"),
    "works": ("AcademicJournal", "Airline", "Album", "Bank", "Magazine", "Manga", "VideoGame"),
    "events": ("Election", "FootballMatch", "NCAATeamSeason", "NationalFootballLeagueSeason", "OlympicEvent",
               "SoccerTournament"),
    "people_animals": ("ChristianBishop", "CollegeCoach", "Congressman", "MemberOfParliament", "Amphibian", "Bird",
                       "Fish", "Mollusca"),
}
#: sub-tasks per source for the sources carved into consecutive chunks of the sorted labels
CHUNKS: dict[str, int] = {"Yahoo": 2, "banking": 6, "clinc": 6, "mcid": 2, "stackoverflow": 3}
#: the smallest number of intents in one HWU sub-task
HWU_MIN_CLASSES = 6


def chunks(labels: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """``labels`` in ``n`` consecutive groups whose sizes differ by at most one (the larger ones first)."""
    size, extra = divmod(len(labels), n)
    out, start = [], 0
    for i in range(n):
        stop = start + size + (1 if i < extra else 0)
        out.append(tuple(labels[start:stop]))
        start = stop
    return out


def hwu_groups(labels: Sequence[str], min_classes: int = HWU_MIN_CLASSES) -> list[tuple[str, ...]]:
    scenarios: dict[str, list[str]] = {}
    for lab in labels:
        scenarios.setdefault(lab.split("_", 1)[0], []).append(lab)
    groups: list[list[str]] = []
    current: list[str] = []
    for name in sorted(scenarios):
        current.extend(scenarios[name])
        if len(current) >= min_classes:
            groups.append(current)
            current = []
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return [tuple(g) for g in groups]


def newsgroup_groups(labels: Sequence[str]) -> list[tuple[str, ...]]:
    by = {h: tuple(lab for lab in labels if lab.startswith(h + ".")) for h in ("comp", "rec", "sci")}
    rest = tuple(lab for lab in labels if not any(lab in g for g in by.values()))
    return [by["comp"], by["rec"], by["sci"], rest]


def label_groups(source: str, labels: Sequence[str]) -> list[tuple[str, ...]]:
    """The label groups of ``source`` (canonical task name) given its sorted labels."""
    labels = sorted(labels)
    if source == "20NG":
        groups = newsgroup_groups(labels)
    elif source == "DBPedia":
        groups = [tuple(sorted(fam)) for fam in DBPEDIA_FAMILIES.values()]
        missing = set(labels) - {lab for g in groups for lab in g}
        if missing:
            raise ValueError(f"DBPedia labels without a family: {sorted(missing)}")
    elif source == "hwu":
        groups = hwu_groups(labels)
    elif source in CHUNKS:
        groups = chunks(labels, CHUNKS[source])
    else:
        raise ValueError(f"no carving for {source!r}")
    return [g for g in groups if len(g) >= 2]
