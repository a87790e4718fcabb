"""What an LLM call cost, from a price table: the user's own, then genai-prices'.

genai-prices (a maintained table with cache-read and cache-write rates, tiers and each price's
start date) prices one call in ~0.3 ms: far too slow for every span. But a model's price at a
given time is linear in the token counts within each of its tiers (a tier applies to the
whole request once its input passes the tier's start). So ``PriceTable`` asks genai-prices
once per model price for the coefficients of each tier, by pricing a few probe usages, and
prices a span with integer arithmetic: exact, the same in any process and on any replay.

Costs are integers in 1e-9 USD (rounded half up per span) like every cost the worker sums;
coefficients are integers in 1e-18 USD per token, exact for any rate with up to twelve
decimals per million tokens.

Token kinds are the parts OpenInference and OTel GenAI report: ``prompt`` (all input tokens,
cache reads and writes and audio included), ``cache_read``, ``cache_write``,
``prompt_audio``, ``completion`` (all output, reasoning and audio included) and
``completion_audio``. Reasoning tokens cost as output tokens, so they need no term.

A lookup is cached per (model, provider, minute of the span's end): prices change at dates
and, for a few providers, at times of day, never within a minute.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

ATTO_PER_NANO = 10**9
_HALF_NANO = ATTO_PER_NANO // 2
_ATTO_PER_USD = Decimal(10**18)
_PER_MILLION = Decimal(1_000_000)
_MS_PER_MINUTE = 60_000
_MAX_CACHED = 8_192

# genai-prices' usage keys of the priced token kinds, in the order of ``Rates``' coefficients.
_USAGE_KEYS = (
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "input_audio_tokens",
    "output_tokens",
    "output_audio_tokens",
)

# Provider names of the conventions (``gen_ai.provider.name``, ``gen_ai.system``,
# OpenInference's ``llm.provider``) that genai-prices spells otherwise. Names it does not know
# leave the provider to be found from the model name.
PROVIDER_ALIASES = {
    "aws.bedrock": "aws",
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
    "az.ai.openai": "azure",
    "az.ai.inference": "azure",
    "gcp.vertex_ai": "google",
    "gcp.gemini": "google",
    "gcp.gen_ai": "google",
    "vertexai": "google",
    "mistral_ai": "mistral",
    "mistralai": "mistral",
    "x_ai": "x-ai",
    "xai": "x-ai",
}


# A model's price in one tier: (a constant per call, then one coefficient per token kind in
# ``_USAGE_KEYS`` order), in 1e-18 USD per token. A cache read's coefficient is its rate minus
# the input rate, since a cache read is also counted among the prompt tokens.
Rates = tuple[int, int, int, int, int, int, int]


@dataclass(frozen=True, slots=True)
class ModelPricing:
    """A model's price at one time: ``tiers`` holds (input tokens above which it applies,
    rates), the lowest first; ``model`` is the model's name as the table spells it."""

    model: str
    tiers: tuple[tuple[int, Rates], ...]

    def cost_nanos(
        self,
        prompt: int,
        completion: int,
        cache_read: int = 0,
        cache_write: int = 0,
        prompt_audio: int = 0,
        completion_audio: int = 0,
    ) -> int:
        """One call's cost in 1e-9 USD (the details are parts of prompt and completion)."""
        tiers = self.tiers
        if len(tiers) == 1:
            c0, c1, c2, c3, c4, c5, c6 = tiers[0][1]
        else:
            c0, c1, c2, c3, c4, c5, c6 = next(
                rates for start, rates in reversed(tiers) if prompt > start or start == 0
            )
        atto = (
            c0
            + c1 * prompt
            + c2 * cache_read
            + c3 * cache_write
            + c4 * prompt_audio
            + c5 * completion
            + c6 * completion_audio
        )
        # Rounded half up to a nano-USD; a negative total (a table's error) counts as free.
        return (atto + _HALF_NANO) // ATTO_PER_NANO if atto > 0 else 0


@dataclass(frozen=True, slots=True)
class OwnPrice:
    """A price of the user's table: USD per million tokens. Cache reads and writes cost as
    input tokens unless a rate is given."""

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "cache_read", "cache_write"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def pricing(self, model: str) -> ModelPricing:
        def atto(usd_per_million: float) -> int:
            return int(Decimal(str(usd_per_million)) * _ATTO_PER_USD / _PER_MILLION)

        base = atto(self.input)
        read = base if self.cache_read is None else atto(self.cache_read)
        write = base if self.cache_write is None else atto(self.cache_write)
        output = atto(self.output)
        rates: Rates = (0, base, read - base, write - base, 0, output, 0)
        return ModelPricing(model, ((0, rates),))


class PriceTable:
    """Prices of LLM calls: the user's table (``own``, by model name, case-insensitive) first,
    then genai-prices' (``catalogue=False`` leaves it out). ``model_key`` names a model as the
    table does, for the model dimension."""

    def __init__(self, own: Mapping[str, OwnPrice] | None = None, *, catalogue: bool = True):
        self._own = {name.lower(): price.pricing(name) for name, price in (own or {}).items()}
        self._catalogue = catalogue
        self._cache: dict[tuple[str, str | None, int], ModelPricing | None] = {}
        self._by_price: dict[int, tuple[Any, ModelPricing]] = {}
        self._names: dict[tuple[str, str | None], str] = {}

    def pricing(self, model: str, provider: str | None, end_ms: int) -> ModelPricing | None:
        """The model's price when the call ended; None for a model the tables do not know."""
        key = (model, provider, end_ms // _MS_PER_MINUTE)
        try:
            return self._cache[key]
        except KeyError:
            pass
        found = self._own.get(model.lower())
        if found is None and self._catalogue:
            found = self._from_catalogue(model, provider, key[2] * _MS_PER_MINUTE)
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()  # a bound, not a policy: entries are cheap to make again
        self._cache[key] = found
        return found

    def model_key(self, model: str, provider: str | None) -> str:
        """The model's name as the table spells it (e.g. ``gpt-4o-mini`` for
        ``gpt-4o-mini-2024-07-18``); the name lower-cased for a model the tables do not know."""
        key = (model, provider)
        name = self._names.get(key)
        if name is None:
            name = model.lower()
            if name not in self._own and self._catalogue:
                found = _find_model(model, provider)
                if found is not None:
                    name = found.id
            if len(self._names) >= _MAX_CACHED:
                self._names.clear()
            self._names[key] = name
        return name

    def _from_catalogue(self, model: str, provider: str | None, at_ms: int) -> ModelPricing | None:
        info = _find_model(model, provider)
        if info is None:
            return None
        price = info.get_prices(datetime.fromtimestamp(at_ms / 1000, tz=UTC))
        cached = self._by_price.get(id(price))
        if cached is not None and cached[0] is price:
            return cached[1]
        pricing = _probe(info.id, price)
        self._by_price[id(price)] = (price, pricing)  # the reference keeps the id unique
        return pricing


def _find_model(model: str, provider: str | None) -> Any:
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    provider_id = PROVIDER_ALIASES.get(provider.lower(), provider.lower()) if provider else None
    for candidate in (provider_id, None) if provider_id else (None,):
        try:
            return snapshot.find_provider_model(model, None, candidate, None)[1]
        except LookupError:
            continue
    return None


def _probe(model: str, price: Any) -> ModelPricing:
    """The coefficients of ``price`` in each of its tiers, from genai-prices' own arithmetic:
    within a tier the price is linear, so one probe per token kind gives its coefficient."""
    from genai_prices.types import TieredPrices

    starts = sorted(
        {
            tier.start
            for value in vars(price).values()
            if isinstance(value, TieredPrices)
            for tier in value.tiers
        }
    )
    bounds = [0, *starts]
    tiers: list[tuple[int, Rates]] = []
    for index, start in enumerate(bounds):
        end = bounds[index + 1] if index + 1 < len(bounds) else None
        step = 1_000  # a power of ten: the coefficients come out as exact decimals
        while end is not None and step > 1 and start + 8 * step > end:
            step //= 10
        # A usage inside the tier with every part present (the parts fit in the prompt and
        # the completion even after a probe adds ``step`` to one of them).
        counts = (start + 1 + 5 * step, step, step, step, 2 * step, step)
        base = dict(zip(_USAGE_KEYS, counts, strict=True))
        at_base = _usd(price, base)
        per_token = [
            (_usd(price, {**base, key: base[key] + step}) - at_base) / step for key in _USAGE_KEYS
        ]
        per_call = at_base - sum(
            (c * base[key] for c, key in zip(per_token, _USAGE_KEYS, strict=True)), Decimal(0)
        )
        atto = [int((c * _ATTO_PER_USD).to_integral_value()) for c in (per_call, *per_token)]
        rates: Rates = (atto[0], atto[1], atto[2], atto[3], atto[4], atto[5], atto[6])
        tiers.append((start, rates))
    return ModelPricing(model, tuple(tiers))


def _usd(price: Any, usage: dict[str, int]) -> Decimal:
    from genai_prices import Usage as GenaiUsage

    return Decimal(price.calc_price(GenaiUsage(**usage))["total_price"])


def load_own_prices(path: Path) -> dict[str, OwnPrice]:
    """The user's price table: a JSON or TOML file mapping model names to ``input``,
    ``output`` and optional ``cache_read``, ``cache_write`` USD per million tokens (TOML: a
    table per model). Raises ``ValueError`` saying what to fix."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        document = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise ValueError(f"{path} is not valid {kind}: {exc}") from exc
    models = document.get("models", document) if isinstance(document, dict) else None
    if not isinstance(models, dict) or not models:
        raise ValueError(
            f"{path} must map model names to prices, e.g. "
            '{"my-model": {"input": 1.0, "output": 4.0}}'
        )
    prices: dict[str, OwnPrice] = {}
    for name, entry in models.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: the price of {name!r} must be a table of rates")
        unknown = set(entry) - {"input", "output", "cache_read", "cache_write"}
        if unknown:
            raise ValueError(
                f"{path}: {name!r} has {', '.join(sorted(unknown))}; the rates are input, "
                "output, cache_read and cache_write (USD per million tokens)"
            )
        values: dict[str, float | None] = {}
        for field_name in ("input", "output", "cache_read", "cache_write"):
            value = entry.get(field_name)
            if value is None and field_name in ("input", "output"):
                raise ValueError(f"{path}: {name!r} needs {field_name} (USD per million tokens)")
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(
                    f"{path}: {name!r} {field_name} must be a number >= 0, got {value!r}"
                )
            values[field_name] = None if value is None else float(value)
        prices[str(name)] = OwnPrice(
            input=values["input"] or 0.0,
            output=values["output"] or 0.0,
            cache_read=values["cache_read"],
            cache_write=values["cache_write"],
        )
    return prices
