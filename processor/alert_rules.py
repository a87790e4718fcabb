"""Alert rules: what the worker checks on each finalised window of each series.

The rules come from the file named by ``PROCESSOR_ALERT_RULES_FILE``, YAML (``.yaml``,
``.yml``) or JSON (``.json``)::

    rules:
      - name: coder-errors            # required, unique, [A-Za-z0-9_.-]+
        metric: error_rate            # a window metric, or hour/<metric> or day/<metric>
        op: ">"                       # >, >=, <, <= (quoted: a bare > starts a YAML block)
        threshold: 0.05
        for: 2                        # consecutive windows, default 1
        agent: "coder*"               # glob on the agent, default "*"
        dimensions: {model: "gpt-4o*"}  # dimension name -> glob
        min_spans: 20                 # windows with fewer spans are ignored, default 0
        severity: warning             # info | warning | critical, default warning
      - name: coder-silent
        kind: silent                  # an agent with spans in each of the last `windows`
        windows: 5                    # windows has none
        agent: coder
        severity: critical

Unset (or empty), the worker checks ``DEFAULT_RULES``; ``none`` switches alerting off. The
series of every agent, ``__all__``, is matched only by a rule whose ``agent`` is exactly
``__all__``: a glob such as ``*`` means "each agent", and the system's totals would otherwise
alert alongside the agent that caused them. A rule with ``dimensions`` matches only series
that have each of those dimensions (a non-LLM series has model ``""``, matched by ``""`` or
``*``).

Validation is done by pydantic models; the rules come out as plain frozen ``AlertRule``
values. Every mistake raises ``ValueError`` naming the file, the rule (its number, counted
from 1, and name), the key and, in YAML, the line.
"""

from __future__ import annotations

import difflib
import json
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from processor.core.aggregate import WindowAggregate
from processor.core.calendar import DAY_PREFIX, HOUR_PREFIX
from processor.core.rollup import ALL_AGENTS

Op = Literal[">", ">=", "<", "<="]
Severity = Literal["info", "warning", "critical"]
Kind = Literal["threshold", "silent"]

OPS: tuple[str, ...] = get_args(Op)
SEVERITIES: tuple[str, ...] = get_args(Severity)
KINDS: tuple[str, ...] = get_args(Kind)

# The metrics of one window (schemas/metrics.md): an empty aggregate's, the latency ones (absent
# without invocations), and whether every source partition had closed the window.
_LATENCY_METRICS = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_max_ms")
WINDOW_METRICS: frozenset[str] = frozenset(
    [*WindowAggregate().metrics(), *_LATENCY_METRICS, "window_complete"]
)
# The metrics of an hour or a day (``hour/<metric>``, ``day/<metric>``, without the prefix).
PERIOD_METRICS: frozenset[str] = (WINDOW_METRICS - {"window_complete"}) | {"incomplete_windows"}

# The order metric names are listed in messages: the window's own, as metrics.md has them.
_METRIC_ORDER = [*WindowAggregate().metrics(), *_LATENCY_METRICS, "window_complete"]

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


def is_known_metric(name: str) -> bool:
    """A window metric, or ``hour/`` or ``day/`` and a metric of an hour or a day."""
    for prefix in (HOUR_PREFIX, DAY_PREFIX):
        if name.startswith(prefix):
            return name[len(prefix) :] in PERIOD_METRICS
    return name in WINDOW_METRICS


@dataclass(frozen=True, slots=True)
class AlertRule:
    """One rule. A threshold rule fires when ``metric op threshold`` holds in ``for_windows``
    consecutive windows of a series it matches (windows with fewer than ``min_spans`` spans
    ignored); a silent rule when an agent that had spans in each of the last
    ``silent_windows`` windows has none."""

    name: str
    kind: Kind
    metric: str | None = None  # None for silent
    op: Op | None = None
    threshold: float | None = None
    for_windows: int = 1  # 1 for silent
    agent: str = "*"  # glob
    dimensions: tuple[tuple[str, str], ...] = ()  # sorted (name, glob)
    min_spans: int = 0
    severity: Severity = "warning"
    silent_windows: int = 0  # 0 for threshold rules

    def __post_init__(self) -> None:
        if self.kind == "threshold":
            if self.metric is None or self.op not in _COMPARE or self.threshold is None:
                raise ValueError(f"threshold rule {self.name!r} needs a metric, op and threshold")
            if self.for_windows < 1 or self.silent_windows != 0:
                raise ValueError(
                    f"threshold rule {self.name!r}: for_windows >= 1, silent_windows 0"
                )
        elif self.kind == "silent":
            if self.silent_windows < 1:
                raise ValueError(f"silent rule {self.name!r} needs silent_windows >= 1")
            if self.metric is not None or self.op is not None or self.threshold is not None:
                raise ValueError(f"silent rule {self.name!r} has no metric, op or threshold")
        else:
            raise ValueError(f"rule {self.name!r}: kind must be threshold or silent")

    def matches(self, agent: str, dimensions: Mapping[str, str]) -> bool:
        """Whether the series (its agent and dimension values) is one the rule watches.

        ``__all__`` (every agent) only when the rule names it: ``agent: __all__``."""
        if agent == ALL_AGENTS:
            if self.agent != ALL_AGENTS:
                return False
        elif not fnmatchcase(agent, self.agent):
            return False
        for name, pattern in self.dimensions:
            value = dimensions.get(name)
            if value is None or not fnmatchcase(value, pattern):
                return False
        return True

    def holds(self, value: float | None) -> bool:
        """Whether a window's value meets the condition; an absent value (``None``: e.g. no
        latency without invocations) or NaN never does, nor any value for a silent rule."""
        if value is None or self.op is None or self.threshold is None:
            return False
        return _COMPARE[self.op](value, self.threshold)


DEFAULT_RULES: tuple[AlertRule, ...] = (
    AlertRule(
        name="error-rate",
        kind="threshold",
        metric="error_rate",
        op=">",
        threshold=0.05,
        for_windows=2,
        min_spans=20,
        severity="warning",
    ),
    AlertRule(
        name="slow-p95",
        kind="threshold",
        metric="latency_p95_ms",
        op=">",
        threshold=5000.0,
        for_windows=2,
        severity="warning",
    ),
)


# --- validation models -------------------------------------------------------------------------

_NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


class _RuleModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: Annotated[str, Field(pattern=_NAME_PATTERN)]
    agent: Annotated[str, Field(min_length=1)] = "*"
    dimensions: dict[Annotated[str, Field(min_length=1)], str] = Field(default_factory=dict)
    severity: Severity = "warning"


class _ThresholdModel(_RuleModel):
    kind: Literal["threshold"] = "threshold"
    metric: str
    op: Op
    threshold: float
    for_windows: int = Field(default=1, ge=1, alias="for")
    min_spans: int = Field(default=0, ge=0)

    @field_validator("metric")
    @classmethod
    def _metric_is_known(cls, value: str) -> str:
        if not is_known_metric(value):
            raise ValueError(_unknown_metric(value))
        return value

    def rule(self) -> AlertRule:
        return AlertRule(
            name=self.name,
            kind="threshold",
            metric=self.metric,
            op=self.op,
            threshold=float(self.threshold),
            for_windows=self.for_windows,
            agent=self.agent,
            dimensions=tuple(sorted(self.dimensions.items())),
            min_spans=self.min_spans,
            severity=self.severity,
        )


class _SilentModel(_RuleModel):
    kind: Literal["silent"]
    windows: int = Field(ge=1)

    def rule(self) -> AlertRule:
        return AlertRule(
            name=self.name,
            kind="silent",
            agent=self.agent,
            dimensions=tuple(sorted(self.dimensions.items())),
            severity=self.severity,
            silent_windows=self.windows,
        )


# The keys of each kind of rule, in the order the docs list them.
_THRESHOLD_KEYS = [
    "name",
    "kind",
    "metric",
    "op",
    "threshold",
    "for",
    "agent",
    "dimensions",
    "min_spans",
    "severity",
]
_SILENT_KEYS = ["name", "kind", "windows", "agent", "dimensions", "severity"]
_THRESHOLD_ONLY = [key for key in _THRESHOLD_KEYS if key not in _SILENT_KEYS]

_MISSING_HINTS = {
    "name": "a unique name of letters, digits, _ . -",
    "metric": "a window metric such as error_rate, or hour/<metric> or day/<metric>",
    "op": "one of " + ", ".join(OPS) + " (quoted in YAML)",
    "threshold": "the number the metric is compared with",
    "windows": "how many windows with spans come before the silence (>= 1)",
}


def _unknown_metric(name: str) -> str:
    prefix = next((p for p in (HOUR_PREFIX, DAY_PREFIX) if name.startswith(p)), "")
    base = name[len(prefix) :]
    if prefix and base == "window_complete":
        return (
            f"{name} does not exist: window_complete is a window's; hours and days have "
            f"{prefix}incomplete_windows (how many of their windows were incomplete)"
        )
    if not prefix and name == "incomplete_windows":
        return (
            "incomplete_windows exists for hours and days only: "
            "hour/incomplete_windows or day/incomplete_windows"
        )
    known = PERIOD_METRICS if prefix else WINDOW_METRICS
    close = difflib.get_close_matches(base, sorted(known), n=1)
    guess = f' (did you mean "{prefix}{close[0]}"?)' if close else ""
    return (
        f'unknown metric "{name}"{guess}; the window metrics are '
        + ", ".join(_METRIC_ORDER)
        + "; and hour/<metric> or day/<metric> of these (with incomplete_windows, "
        "without window_complete)"
    )


# --- loading -----------------------------------------------------------------------------------


def load_alert_rules(value: str | Path | None) -> tuple[AlertRule, ...]:
    """The rules named by ``PROCESSOR_ALERT_RULES_FILE``: ``DEFAULT_RULES`` when unset or
    empty, none for ``none`` (alerting off), else those of the YAML or JSON file (whose
    ``rules: []`` also means none). Raises ``ValueError`` saying what to fix and where."""
    if value is None:
        return DEFAULT_RULES
    text_value = str(value).strip() if isinstance(value, str) else str(value)
    if text_value == "":
        return DEFAULT_RULES
    if text_value.lower() == "none":
        return ()
    path = Path(text_value) if isinstance(value, str) else value
    return _RulesFile(path).load()


class _RulesFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = f"alert rules file {path}"
        self.root: yaml.Node | None = None  # the YAML document's nodes, for line numbers
        self._list_hint = " (each starting with - in YAML)"

    _empty = (
        'is empty; it needs a "rules" list, e.g. rules: [{name: errors, metric: error_rate, '
        'op: ">", threshold: 0.05}], or set PROCESSOR_ALERT_RULES_FILE to "none" to switch '
        "alerting off"
    )

    def fail(self, message: str) -> ValueError:
        return ValueError(f"{self.where}: {message}")

    def load(self) -> tuple[AlertRule, ...]:
        suffix = self.path.suffix.lower()
        if suffix not in (".yaml", ".yml", ".json"):
            raise self.fail(
                "must be YAML (.yaml, .yml) or JSON (.json), named so; "
                'or set PROCESSOR_ALERT_RULES_FILE to "none" to switch alerting off'
            )
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise self.fail(
                f"cannot read it: {exc.strerror or exc}; set PROCESSOR_ALERT_RULES_FILE to a "
                'rules file, unset it for the default rules, or "none" to switch alerting off'
            ) from exc
        except UnicodeDecodeError as exc:
            raise self.fail(f"is not UTF-8 text: {exc}") from exc
        if not text.strip():
            raise self.fail(self._empty)
        document = self._parse_json(text) if suffix == ".json" else self._parse_yaml(text)
        if document is None:  # comments only, or JSON null
            raise self.fail(self._empty)
        return self._rules(document)

    def _parse_json(self, text: str) -> Any:
        self._list_hint = ""
        try:
            return json.loads(text, object_pairs_hook=self._json_object)
        except json.JSONDecodeError as exc:
            raise self.fail(
                f"is not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from exc

    def _json_object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # json.loads would keep the last of two equal keys without a word.
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise self.fail(f'key "{key}" appears twice in one object: keep one')
            result[key] = value
        return result

    def _parse_yaml(self, text: str) -> Any:
        # safe_load's own steps, keeping the nodes: their marks give each key's line.
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            if root is not None:
                self._check_duplicate_keys(root)
            document = loader.construct_document(root) if root is not None else None
        except yaml.MarkedYAMLError as exc:
            raise self.fail(_yaml_problem(exc, text)) from exc
        except yaml.YAMLError as exc:
            raise self.fail(f"is not valid YAML: {exc}") from exc
        finally:
            loader.dispose()
        self.root = root
        return document

    def _check_duplicate_keys(self, root: yaml.Node) -> None:
        # safe_load would keep the last of two equal keys without a word.
        for node in _mappings(root):
            seen: dict[str, int] = {}
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.value == "<<":
                    continue
                line = key.start_mark.line + 1
                if key.value in seen:
                    raise self.fail(
                        f'line {line}: key "{key.value}" appears twice in one mapping '
                        f"(first on line {seen[key.value]}): keep one"
                    )
                seen[key.value] = line

    def _rules(self, document: Any) -> tuple[AlertRule, ...]:
        example = 'e.g. rules: [{name: errors, metric: error_rate, op: ">", threshold: 0.05}]'
        if isinstance(document, list):
            raise self.fail(f'the rules must be under a top-level "rules" key, {example}')
        if not isinstance(document, dict):
            raise self.fail(f'must be a mapping with a "rules" list, {example}')
        unknown = [str(key) for key in document if key != "rules"]
        if unknown:
            raise self.fail(
                f"unknown top-level key {', '.join(json.dumps(k) for k in unknown)}"
                f"{self._line_suffix((unknown[0],), index=None)}; the file holds only "
                '"rules", a list of rules'
            )
        if "rules" not in document:
            raise self.fail(f'has no "rules" list, {example}')
        entries = document["rules"]
        if not isinstance(entries, list):
            raise self.fail(
                f"rules: must be a list of rules{self._list_hint}, got "
                f"{_shown(entries)}{self._line_suffix(('rules',), index=None)}"
            )
        problems: list[str] = []
        rules: list[AlertRule] = []
        first_of_name: dict[str, int] = {}
        for index, entry in enumerate(entries):
            rule = self._rule(index, entry, problems)
            if rule is None:
                continue
            if rule.name in first_of_name:
                problems.append(
                    f'{self._rule_label(index, entry)}: name: "{rule.name}" is already the name '
                    f"of rule {first_of_name[rule.name] + 1}; names must be unique"
                    f"{self._line_suffix(('name',), index=index)}"
                )
                continue
            first_of_name[rule.name] = index
            rules.append(rule)
        if problems:
            shown = problems[:20]
            if len(problems) > len(shown):
                shown.append(f"... and {len(problems) - len(shown)} more")
            raise ValueError("\n".join(f"{self.where}: {problem}" for problem in shown))
        return tuple(rules)

    def _rule(self, index: int, entry: Any, problems: list[str]) -> AlertRule | None:
        label = self._rule_label(index, entry)
        if not isinstance(entry, dict):
            problems.append(
                f"{label}: must be a mapping of keys (name, metric, op, threshold, ...), got "
                f"{_shown(entry)}{self._line_suffix((), index=index)}"
            )
            return None
        kind = entry.get("kind", "threshold")
        if kind not in KINDS:
            problems.append(
                f"{label}: kind: must be one of {', '.join(KINDS)}, got {_shown(kind)}"
                f"{self._line_suffix(('kind',), index=index)}"
            )
            return None
        model: type[_ThresholdModel] | type[_SilentModel]
        if kind == "silent":
            stray = [key for key in _THRESHOLD_ONLY if key in entry]
            for key in stray:
                problems.append(
                    f"{label}: {key}: not allowed in a silent rule (kind: silent), which "
                    "alerts when an agent that had spans has none; remove it, or make the "
                    f"rule a threshold rule{self._line_suffix((key,), index=index)}"
                )
            if stray:
                return None
            model = _SilentModel
        else:
            model = _ThresholdModel
        try:
            return model.model_validate(entry).rule()
        except ValidationError as exc:
            for error in exc.errors():
                loc = tuple(error["loc"])
                field = ".".join(str(part) for part in loc) or "rule"
                problems.append(
                    f"{label}: {field}: {_explain(error, model, entry)}"
                    f"{self._line_suffix(loc, index=index)}"
                )
            return None

    def _rule_label(self, index: int, entry: Any) -> str:
        name = entry.get("name") if isinstance(entry, dict) else None
        return (
            f"rule {index + 1} ({json.dumps(name)})"
            if isinstance(name, str)
            else (f"rule {index + 1}")
        )

    def _line_suffix(self, loc: tuple[Any, ...], *, index: int | None) -> str:
        line = self._line(loc, index)
        return f" (line {line})" if line is not None else ""

    def _line(self, loc: tuple[Any, ...], index: int | None) -> int | None:
        """The YAML line of the key at ``loc`` in rule ``index`` (None: at the top level), or
        of the deepest part of it that exists (the rule, for a missing key)."""
        node = self.root
        if node is None:
            return None
        line: int | None = None
        if index is not None:
            node = _value_of(node, "rules")
            if not isinstance(node, yaml.SequenceNode) or index >= len(node.value):
                return None
            node = node.value[index]
            line = node.start_mark.line + 1
        for part in loc:
            if not isinstance(node, yaml.MappingNode):
                break
            found = next(
                (
                    (key, value)
                    for key, value in node.value
                    if isinstance(key, yaml.ScalarNode) and key.value == str(part)
                ),
                None,
            )
            if found is None:
                break
            line = found[0].start_mark.line + 1
            node = found[1]
        return line


def _mappings(node: yaml.Node) -> Iterator[yaml.MappingNode]:
    stack = [node]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen:  # an alias shares its anchor's node
            continue
        seen.add(id(current))
        if isinstance(current, yaml.MappingNode):
            yield current
            for key, value in current.value:
                stack.extend((key, value))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)


def _value_of(node: yaml.Node, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, value in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return value
    return None


def _yaml_problem(exc: yaml.MarkedYAMLError, text: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "cannot be parsed"
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    message = f"is not valid YAML: {where}{problem}"
    if exc.context and exc.problem:
        message += f" ({exc.context}"
        if exc.context_mark is not None and exc.context_mark is not mark:
            message += f" from line {exc.context_mark.line + 1}"
        message += ")"
    if mark is not None:
        lines = text.splitlines()
        if mark.line < len(lines) and re.match(r"\s*(-\s*)?op\s*:\s*>", lines[mark.line]):
            message += '; quote the operator: op: ">=" (a bare > starts a YAML text block)'
    if "alias" in f"{exc.context} {exc.problem}":
        message += '; quote a glob that starts with *: agent: "*" (a bare * names a YAML alias)'
    return message


def _shown(value: Any) -> str:
    try:
        shown = json.dumps(value, default=str)
    except ValueError:
        shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _explain(error: Any, model: type[_RuleModel], entry: Mapping[str, Any]) -> str:
    """A pydantic error as what to fix."""
    kind = error["type"]
    loc = tuple(error["loc"])
    key = str(loc[0]) if loc else ""
    got = f", got {_shown(error.get('input'))}" if "input" in error else ""
    ctx = error.get("ctx") or {}
    if kind == "missing":
        hint = _MISSING_HINTS.get(key)
        if key == "windows":
            return f"required for a silent rule: {hint}"
        return f"required: {hint}" if hint else "required"
    if kind == "extra_forbidden":
        keys = _SILENT_KEYS if model is _SilentModel else _THRESHOLD_KEYS
        close = difflib.get_close_matches(key, keys, n=1)
        guess = f' (did you mean "{close[0]}"?)' if close else ""
        what = "a silent rule's" if model is _SilentModel else "a rule's"
        return f"unknown key{guess}; {what} keys are {', '.join(keys)}"
    if kind == "literal_error":
        choices = {"op": OPS, "severity": SEVERITIES, "kind": KINDS}.get(key)
        listed = ", ".join(choices) if choices else ctx.get("expected", "")
        message = f"must be one of {listed}{got}"
        if key == "op" and error.get("input") == "":
            message += ' (in YAML quote the operator: op: ">")'
        return message
    if kind in ("greater_than_equal", "greater_than"):
        bound = ctx.get("ge", ctx.get("gt"))
        sign = ">=" if kind == "greater_than_equal" else ">"
        what = {"for": " (consecutive windows)", "windows": " (windows)"}.get(key, "")
        return f"must be an integer {sign} {bound}{what}{got}"
    if kind == "int_type":
        return f"must be a whole number{got}"
    if kind in ("float_type", "finite_number"):
        return f"must be a finite number{got}"
    if kind == "string_type":
        return f"must be a string{got} (quote it)"
    if kind == "string_too_short":
        return f"must not be empty{got}"
    if kind == "string_pattern_mismatch":
        return f"may hold only letters, digits, _ . and -{got}"
    if kind == "dict_type":
        return f'must map dimension names to globs, e.g. {{model: "gpt-4o*"}}{got}'
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    return f"{error['msg']}{got}"
