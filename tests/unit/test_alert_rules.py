"""The alert rules file: what a user writes in it, what the worker makes of it, and what the
user is told when it is wrong."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from processor.alert_rules import (
    DEFAULT_RULES,
    PERIOD_METRICS,
    WINDOW_METRICS,
    AlertRule,
    is_known_metric,
    load_alert_rules,
)
from processor.core.aggregate import WindowAggregate

FULL_YAML = """\
# alerting for the coder agents
rules:
  - name: coder-errors            # required, unique
    metric: error_rate
    op: ">"
    threshold: 0.05
    for: 2
    agent: "coder*"
    dimensions: {model: "gpt-4o*", region: eu}
    min_spans: 20
    severity: warning
  - name: coder-silent
    kind: silent
    windows: 5
    agent: coder
    severity: critical
  - name: daily-cost
    metric: day/cost_usd
    op: ">="
    threshold: 100
  - name: system.incomplete_hours
    metric: hour/incomplete_windows
    op: ">"
    threshold: 0
    agent: __all__
    severity: info
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, name: str = "rules.yaml") -> str:
    path = write(tmp_path, name, text)
    with pytest.raises(ValueError) as info:
        load_alert_rules(path)
    message = str(info.value)
    assert str(path) in message  # every message says which file
    return message


def one_rule(body: str) -> str:
    """A YAML rules file with one rule, ``body`` its keys (indented by 4)."""
    return "rules:\n  - name: coder-errors\n" + body


# --- defaults and off --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "  "])
def test_unset_gives_the_default_rules(value: str | None) -> None:
    assert load_alert_rules(value) == DEFAULT_RULES


def test_default_rules_are_error_rate_and_slow_p95() -> None:
    by_name = {rule.name: rule for rule in DEFAULT_RULES}
    assert set(by_name) == {"error-rate", "slow-p95"}
    errors = by_name["error-rate"]
    assert (errors.metric, errors.op, errors.threshold) == ("error_rate", ">", 0.05)
    assert (errors.for_windows, errors.min_spans, errors.severity) == (2, 20, "warning")
    slow = by_name["slow-p95"]
    assert (slow.metric, slow.op, slow.threshold) == ("latency_p95_ms", ">", 5000)
    assert (slow.for_windows, slow.min_spans, slow.severity) == (2, 0, "warning")
    for rule in DEFAULT_RULES:
        assert rule.kind == "threshold"
        assert rule.agent == "*" and rule.dimensions == ()
        # each agent, not the system's totals
        assert rule.matches("coder", {}) and not rule.matches("__all__", {})


@pytest.mark.parametrize("value", ["none", "None", "NONE", " none ", Path("none")])
def test_none_switches_alerting_off(value: str | Path) -> None:
    assert load_alert_rules(value) == ()


# --- a full file -------------------------------------------------------------------------------


def test_full_yaml_file(tmp_path: Path) -> None:
    rules = load_alert_rules(str(write(tmp_path, "rules.yaml", FULL_YAML)))
    assert rules == (
        AlertRule(
            name="coder-errors",
            kind="threshold",
            metric="error_rate",
            op=">",
            threshold=0.05,
            for_windows=2,
            agent="coder*",
            dimensions=(("model", "gpt-4o*"), ("region", "eu")),
            min_spans=20,
            severity="warning",
            silent_windows=0,
        ),
        AlertRule(
            name="coder-silent",
            kind="silent",
            metric=None,
            op=None,
            threshold=None,
            for_windows=1,
            agent="coder",
            dimensions=(),
            min_spans=0,
            severity="critical",
            silent_windows=5,
        ),
        AlertRule(
            name="daily-cost",
            kind="threshold",
            metric="day/cost_usd",
            op=">=",
            threshold=100.0,
            for_windows=1,
            agent="*",
            dimensions=(),
            min_spans=0,
            severity="warning",
            silent_windows=0,
        ),
        AlertRule(
            name="system.incomplete_hours",
            kind="threshold",
            metric="hour/incomplete_windows",
            op=">",
            threshold=0.0,
            for_windows=1,
            agent="__all__",
            dimensions=(),
            min_spans=0,
            severity="info",
            silent_windows=0,
        ),
    )
    assert isinstance(rules[2].threshold, float)
    with pytest.raises(AttributeError):
        rules[0].threshold = 1.0  # type: ignore[misc]


def test_yml_and_json_files_read_alike(tmp_path: Path) -> None:
    from_yaml = load_alert_rules(write(tmp_path, "rules.yaml", FULL_YAML))
    document = yaml.safe_load(FULL_YAML)
    from_json = load_alert_rules(write(tmp_path, "rules.json", json.dumps(document)))
    from_yml = load_alert_rules(write(tmp_path, "rules.YML", FULL_YAML))
    assert from_yaml == from_json == from_yml


def test_an_empty_rules_list_means_no_rules(tmp_path: Path) -> None:
    assert load_alert_rules(write(tmp_path, "rules.yaml", "rules: []\n")) == ()


# --- matching series ---------------------------------------------------------------------------


def rule(**overrides: object) -> AlertRule:
    fields: dict[str, object] = {
        "name": "r",
        "kind": "threshold",
        "metric": "error_rate",
        "op": ">",
        "threshold": 0.1,
    }
    fields.update(overrides)
    return AlertRule(**fields)  # type: ignore[arg-type]


def test_agent_globs() -> None:
    coders = rule(agent="coder*")
    assert coders.matches("coder", {})
    assert coders.matches("coder-v2", {})
    assert not coders.matches("planner", {})
    assert not coders.matches("Coder", {})  # case matters, as agent names do
    assert rule(agent="coder").matches("coder", {})
    assert not rule(agent="coder").matches("coder-v2", {})
    assert rule(agent="*-v[0-9]").matches("coder-v2", {})
    assert rule(agent="?lanner").matches("planner", {})


def test_all_agents_series_only_when_named() -> None:
    for pattern in ("*", "__*", "__all_?", "[_]_all__"):
        assert not rule(agent=pattern).matches("__all__", {}), pattern
    named = rule(agent="__all__")
    assert named.matches("__all__", {})
    assert not named.matches("coder", {})
    # the overflow series is an agent series as any other
    assert rule(agent="*").matches("__overflow__", {})


def test_dimension_globs() -> None:
    gpt = rule(dimensions=(("model", "gpt-4o*"),))
    assert gpt.matches("coder", {"model": "gpt-4o-mini"})
    assert gpt.matches("coder", {"model": "gpt-4o", "region": "eu"})
    assert not gpt.matches("coder", {"model": "claude-sonnet-4-0"})
    # a series without the dimension is not one the rule watches
    assert not gpt.matches("coder", {})
    assert not gpt.matches("coder", {"region": "eu"})
    both = rule(agent="coder*", dimensions=(("model", "gpt-*"), ("region", "eu")))
    assert both.matches("coder-v2", {"model": "gpt-4o", "region": "eu"})
    assert not both.matches("coder-v2", {"model": "gpt-4o", "region": "us"})
    assert not both.matches("planner", {"model": "gpt-4o", "region": "eu"})
    # non-LLM spans of a per-model series have model ""
    assert rule(dimensions=(("model", ""),)).matches("coder", {"model": ""})
    assert rule(dimensions=(("model", "*"),)).matches("coder", {"model": ""})
    assert not rule(dimensions=(("model", "?*"),)).matches("coder", {"model": ""})


def test_matching_from_a_file(tmp_path: Path) -> None:
    rules = {r.name: r for r in load_alert_rules(write(tmp_path, "rules.yaml", FULL_YAML))}
    errors = rules["coder-errors"]
    assert errors.matches("coder-2", {"model": "gpt-4o-mini", "region": "eu"})
    assert not errors.matches("coder-2", {"model": "gpt-4o-mini", "region": "us"})
    assert rules["system.incomplete_hours"].matches("__all__", {})
    assert not rules["daily-cost"].matches("__all__", {})


# --- holds -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "below", "equal", "above"),
    [
        (">", False, False, True),
        (">=", False, True, True),
        ("<", True, False, False),
        ("<=", True, True, False),
    ],
)
def test_holds_for_each_op(op: str, below: bool, equal: bool, above: bool) -> None:
    r = rule(op=op, threshold=10.0)
    assert (r.holds(9.5), r.holds(10.0), r.holds(10.5)) == (below, equal, above)
    assert r.holds(10) is equal  # ints, as counts come
    # absent (no invocations: no latency) never holds, nor NaN
    assert r.holds(None) is False
    assert r.holds(float("nan")) is False


def test_silent_rules_hold_on_no_value() -> None:
    silent = AlertRule(name="s", kind="silent", silent_windows=3)
    assert not silent.holds(0.0) and not silent.holds(None)


# --- mistakes ----------------------------------------------------------------------------------


def test_bad_op(tmp_path: Path) -> None:
    message = error_of(
        tmp_path,
        one_rule('    metric: error_rate\n    op: "=>"\n    threshold: 0.05\n'),
        name="x.yaml",
    )
    path = tmp_path / "x.yaml"
    assert message == (
        f'alert rules file {path}: rule 1 ("coder-errors"): op: must be one of >, >=, <, <=, '
        'got "=>" (line 4)'
    )


def test_unquoted_greater_than_in_yaml_gets_a_hint(tmp_path: Path) -> None:
    # a bare > is a YAML block scalar: empty here
    message = error_of(tmp_path, one_rule("    metric: spans\n    op: >\n    threshold: 1\n"))
    assert 'op: must be one of >, >=, <, <=, got ""' in message
    assert 'quote the operator: op: ">"' in message
    # and >= is a YAML syntax error
    message = error_of(tmp_path, one_rule("    metric: spans\n    op: >=\n    threshold: 1\n"))
    assert "is not valid YAML: line 4, column 10" in message
    assert 'quote the operator: op: ">="' in message


def test_missing_threshold(tmp_path: Path) -> None:
    message = error_of(tmp_path, one_rule('    metric: error_rate\n    op: ">"\n'))
    assert 'rule 1 ("coder-errors"): threshold: required' in message
    assert "(line 2)" in message  # the rule's line: the key is not there


def test_threshold_must_be_a_finite_number(tmp_path: Path) -> None:
    for value in ('"0.05"', "true", ".inf"):
        message = error_of(
            tmp_path, one_rule(f'    metric: error_rate\n    op: ">"\n    threshold: {value}\n')
        )
        assert 'rule 1 ("coder-errors"): threshold: must be a finite number' in message
        assert "(line 5)" in message


@pytest.mark.parametrize("value", ["0", "-1", "1.5", '"2"'])
def test_for_must_be_at_least_one_window(tmp_path: Path, value: str) -> None:
    message = error_of(
        tmp_path,
        one_rule(f'    metric: error_rate\n    op: ">"\n    threshold: 0.05\n    for: {value}\n'),
    )
    assert 'rule 1 ("coder-errors"): for: must be' in message
    assert "(line 6)" in message
    if value == "0":
        assert "for: must be an integer >= 1 (consecutive windows), got 0" in message


def test_unknown_key(tmp_path: Path) -> None:
    message = error_of(
        tmp_path,
        one_rule('    metric: error_rate\n    op: ">"\n    threshold: 0.05\n    treshold: 1\n'),
    )
    assert 'rule 1 ("coder-errors"): treshold: unknown key (did you mean "threshold"?)' in message
    assert "name, kind, metric, op, threshold, for, agent, dimensions, min_spans, severity" in (
        message
    )
    assert "(line 6)" in message
    # the Python name of `for` is no key of the file
    message = error_of(
        tmp_path,
        one_rule('    metric: spans\n    op: ">"\n    threshold: 1\n    for_windows: 2\n'),
    )
    assert "for_windows: unknown key" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, "rules: []\nrule: []\n")
    assert 'unknown top-level key "rule"' in message
    assert "(line 2)" in message


def test_unknown_metric(tmp_path: Path) -> None:
    message = error_of(tmp_path, one_rule('    metric: eror_rate\n    op: ">"\n    threshold: 1\n'))
    assert 'rule 1 ("coder-errors"): metric: unknown metric "eror_rate"' in message
    assert 'did you mean "error_rate"?' in message
    assert "spans, errors, error_rate, invocations" in message  # the known ones are listed
    assert "latency_p95_ms" in message and "window_complete" in message
    assert "hour/<metric> or day/<metric>" in message
    assert "(line 3)" in message


@pytest.mark.parametrize(
    ("metric", "says"),
    [
        ("hour/window_complete", "hour/incomplete_windows"),
        ("day/window_complete", "day/incomplete_windows"),
        ("incomplete_windows", "hours and days only"),
        ("week/spans", 'unknown metric "week/spans"'),
        ("day/cost", 'did you mean "day/cost_usd"?'),
    ],
)
def test_metrics_of_windows_hours_and_days(tmp_path: Path, metric: str, says: str) -> None:
    message = error_of(tmp_path, one_rule(f'    metric: {metric}\n    op: ">"\n    threshold: 1\n'))
    assert 'rule 1 ("coder-errors"): metric: ' in message
    assert says in message


def test_known_metrics_are_the_windows_own() -> None:
    window = set(WindowAggregate().metrics())
    assert window < WINDOW_METRICS
    assert {"latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_max_ms"} < (
        WINDOW_METRICS
    )
    assert "window_complete" in WINDOW_METRICS and "window_complete" not in PERIOD_METRICS
    assert "incomplete_windows" in PERIOD_METRICS and "incomplete_windows" not in WINDOW_METRICS
    for name in ("spans", "latency_p99_ms", "window_complete", "hour/cost_usd"):
        assert is_known_metric(name)
    for name in ("day/latency_max_ms", "day/incomplete_windows"):
        assert is_known_metric(name)
    for name in ("hour/window_complete", "incomplete_windows", "hour/", "minute/spans", "cost"):
        assert not is_known_metric(name)


def test_duplicate_name(tmp_path: Path) -> None:
    text = (
        "rules:\n"
        "  - name: slow\n    metric: latency_p95_ms\n    op: '>'\n    threshold: 5000\n"
        "  - name: slow\n    metric: latency_p99_ms\n    op: '>'\n    threshold: 9000\n"
    )
    message = error_of(tmp_path, text)
    assert 'rule 2 ("slow"): name: "slow" is already the name of rule 1' in message
    assert "unique" in message
    assert "(line 6)" in message


def test_bad_names(tmp_path: Path) -> None:
    message = error_of(
        tmp_path,
        "rules:\n  - name: coder errors\n    metric: spans\n    op: '>'\n    threshold: 1\n",
    )
    assert 'rule 1 ("coder errors"): name: may hold only letters, digits, _ . and -' in message
    message = error_of(tmp_path, "rules:\n  - metric: spans\n    op: '>'\n    threshold: 1\n")
    assert "rule 1: name: required" in message


def test_silent_rule_with_a_metric(tmp_path: Path) -> None:
    text = (
        "rules:\n  - name: quiet\n    kind: silent\n    windows: 3\n    metric: spans\n    for: 2\n"
    )
    message = error_of(tmp_path, text)
    assert 'rule 1 ("quiet"): metric: not allowed in a silent rule' in message
    assert 'rule 1 ("quiet"): for: not allowed in a silent rule' in message
    assert "(line 5)" in message and "(line 6)" in message


def test_silent_rule_without_windows(tmp_path: Path) -> None:
    message = error_of(tmp_path, "rules:\n  - name: quiet\n    kind: silent\n    agent: coder\n")
    assert 'rule 1 ("quiet"): windows: required for a silent rule' in message
    message = error_of(tmp_path, "rules:\n  - name: quiet\n    kind: silent\n    windows: 0\n")
    assert 'rule 1 ("quiet"): windows: must be an integer >= 1' in message


def test_bad_kind_and_severity(tmp_path: Path) -> None:
    message = error_of(tmp_path, "rules:\n  - name: q\n    kind: absent\n")
    assert 'rule 1 ("q"): kind: must be one of threshold, silent, got "absent" (line 3)' in message
    message = error_of(
        tmp_path,
        one_rule("    metric: spans\n    op: '<'\n    threshold: 1\n    severity: page\n"),
    )
    assert 'severity: must be one of info, warning, critical, got "page" (line 6)' in message


def test_bad_dimensions(tmp_path: Path) -> None:
    base = "    metric: spans\n    op: '<'\n    threshold: 1\n"
    message = error_of(tmp_path, one_rule(base + "    dimensions: {model: 4}\n"))
    assert 'rule 1 ("coder-errors"): dimensions.model: must be a string, got 4' in message
    message = error_of(tmp_path, one_rule(base + "    dimensions: [model]\n"))
    assert "dimensions: must map dimension names to globs" in message


def test_every_mistake_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    text = (
        "rules:\n"
        "  - name: a\n    metric: spans\n    op: '=='\n    threshold: 1\n"
        "  - name: b\n    metric: spans\n    op: '>'\n"
    )
    lines = error_of(tmp_path, text).splitlines()
    assert len(lines) == 2
    assert 'rule 1 ("a"): op:' in lines[0]
    assert 'rule 2 ("b"): threshold: required' in lines[1]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("rules:\n  name: a\n  metric: spans\n", "rules: must be a list of rules"),
        ("rules: coder-errors\n", "rules: must be a list of rules"),
        ("rules:\n", "rules: must be a list of rules"),
        ("- name: a\n", 'the rules must be under a top-level "rules" key'),
        ("alerts: []\n", 'unknown top-level key "alerts"'),
        ("{}\n", 'has no "rules" list'),
        ("just text\n", 'must be a mapping with a "rules" list'),
        ("rules:\n  - coder-errors\n", "rule 1: must be a mapping of keys"),
    ],
)
def test_rules_must_be_a_list_of_mappings(tmp_path: Path, text: str, says: str) -> None:
    assert says in error_of(tmp_path, text)


def test_non_list_rules_in_json(tmp_path: Path) -> None:
    message = error_of(tmp_path, '{"rules": {"name": "a"}}', name="rules.json")
    assert 'rules: must be a list of rules, got {"name": "a"}' in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "rules.yaml"
    with pytest.raises(ValueError, match="cannot read it") as info:
        load_alert_rules(str(path))
    assert str(path) in str(info.value)
    assert '"none" to switch alerting off' in str(info.value)


@pytest.mark.parametrize("text", ["", "  \n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    assert "is empty" in error_of(tmp_path, text)


def test_other_file_kinds_are_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, "rules = []\n", name="rules.toml")
    assert "must be YAML (.yaml, .yml) or JSON (.json)" in message


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    text = "rules:\n  - name: a\n    metric: spans\n   op: '>'\n"
    message = error_of(tmp_path, text)
    assert re.search(r"is not valid YAML: line 4, column \d+: ", message), message


def test_unquoted_star_glob_gets_a_hint(tmp_path: Path) -> None:
    message = error_of(tmp_path, one_rule("    metric: spans\n    agent: *\n"))
    assert "is not valid YAML: line 4, column 13" in message
    assert 'quote a glob that starts with *: agent: "*"' in message


def test_json_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    text = '{"rules": [\n  {"name": "a", "metric": "spans",}\n]}'
    message = error_of(tmp_path, text, name="rules.json")
    assert "is not valid JSON: line 2, column 35" in message


def test_a_key_given_twice(tmp_path: Path) -> None:
    message = error_of(tmp_path, one_rule("    metric: spans\n    op: '>'\n    op: '<'\n"))
    assert 'line 5: key "op" appears twice in one mapping (first on line 4)' in message
    message = error_of(tmp_path, '{"rules": [{"name": "a", "name": "b"}]}', name="rules.json")
    assert 'key "name" appears twice' in message


def test_json_validation_errors_name_the_rule_and_field(tmp_path: Path) -> None:
    text = json.dumps({"rules": [{"name": "a", "metric": "spans", "op": ">", "threshold": 1}]})
    text = text[:-2] + ', {"name": "b", "metric": "spans", "op": "~", "threshold": 1}]}'
    message = error_of(tmp_path, text, name="rules.json")
    assert message == (
        f'alert rules file {tmp_path / "rules.json"}: rule 2 ("b"): op: must be one of '
        '>, >=, <, <=, got "~"'
    )


def test_rules_made_in_code_are_checked() -> None:
    with pytest.raises(ValueError):
        AlertRule(name="x", kind="threshold")
    with pytest.raises(ValueError):
        AlertRule(name="x", kind="silent")
    with pytest.raises(ValueError):
        AlertRule(name="x", kind="silent", metric="spans", silent_windows=2)
