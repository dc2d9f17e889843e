"""A method spec narrowed to one search: one backbone and data set, a preset, ``--set`` applied.

Everything here runs before Ray starts, so a wrong key or value is a one-line ``OvssError`` that
names it. The spec itself (schema, loading, knob checks) is :mod:`methods.spec`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from methods.base import OvssError
from methods.spec import (
    CategoricalParam,
    MethodSpec,
    Preset,
    ProxySpec,
    SpaceParam,
    check_knob_value,
    is_number,
    validation_line,
    value_kind,
)


class ResolvedMethod(BaseModel):
    """A method spec narrowed to one backbone and data set, with ``--set`` applied."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    method: str
    backbone_name: str
    backbone: dict[str, Any]
    settings: dict[str, Any]
    defaults: dict[str, Any]
    space: dict[str, SpaceParam]


def resolve(
    spec: MethodSpec,
    backbone: str | None = None,
    dataset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    preset: Preset | None = None,
) -> ResolvedMethod:
    """Narrow ``spec`` to one backbone/data set; apply preset settings and ``--set`` overrides."""
    name = backbone or spec.default_backbone
    if name not in spec.backbones:
        raise OvssError(f"unknown backbone {name!r} for method {spec.method}: choose one of "
                        f"{', '.join(spec.backbones)}")
    bb = spec.backbones[name]
    settings = copy.deepcopy(spec.settings)
    if dataset and dataset in spec.datasets:
        settings.update(spec.datasets[dataset].settings)
    if preset is not None:
        settings.update(preset.settings)
    defaults = {**spec.defaults, **bb.defaults, **(preset.defaults if preset else {})}
    space = {**spec.space, **bb.space}
    loading = bb.loading_fields(name)
    if preset is not None and preset.space:      # a preset's space is what it searches
        space = dict(preset.space)
    all_overrides = {**(preset.set if preset else {}), **(overrides or {})}
    for key, value in all_overrides.items():
        _apply_override(spec, key, value, settings, defaults, space, loading)
    # precedence of trial 0: --set / a preset's set, then a preset's defaults, then the method's
    # settings-dependent values (a protocol's per data set), then the YAML's
    fixed = {k for k in all_overrides if k in defaults} | set(preset.defaults if preset else {})
    for k, v in _knob_defaults(spec.method, settings).items():
        if k in defaults and k not in fixed:
            defaults[k] = v
    # The paper defaults are trial 0: in the shipped YAML they must lie in the space; a space the
    # user narrowed with --set may exclude one, and trial 0 then takes the nearest value.
    for k, p in space.items():
        if p.contains(defaults[k]):
            continue
        if not any(key.startswith(f"space.{k}.") for key in all_overrides):
            raise OvssError(f"default {k}={defaults[k]!r} of method {spec.method} lies outside "
                            f"its search space {p.model_dump(exclude_none=True)}")
        defaults[k] = _nearest(p, defaults[k])
    return ResolvedMethod(method=spec.method, backbone_name=name, backbone=loading,
                          settings=settings, defaults=defaults, space=space)


def _knob_defaults(method: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The method's settings-dependent trial-0 knob values (``Segmenter.knob_defaults``)."""
    from methods import get_segmenter_class

    try:
        cls = get_segmenter_class(method)
    except OvssError:          # a spec without a method package (config tests)
        return {}
    return dict(cls.knob_defaults(settings))


def resolve_proxy(spec: MethodSpec, resolved: ResolvedMethod,
                  preset: Preset | None = None) -> ProxySpec:
    """The proxy of a two-stage search: the method's ``proxy`` with the preset's on top. A
    proxy may fix only knobs the search does not sample (the re-ranked trials keep their
    sampled values)."""
    settings: dict[str, Any] = {}
    fixed: dict[str, Any] = {}
    for p in (spec.proxy, preset.proxy if preset else None):
        if p is not None:
            settings.update(p.settings)
            fixed.update(p.set)
    if not settings and not fixed:
        raise OvssError(f"--rerank-top: method {spec.method} declares no proxy (a `proxy:` block "
                        f"in conf/methods/{spec.method}.yaml)")
    for k in fixed:
        if k in resolved.space:
            raise OvssError(f"proxy.set.{k}: the knob is searched; a proxy may fix only knobs "
                            f"the search does not sample")
    return ProxySpec(settings=settings, set=fixed)


def _nearest(p: SpaceParam, v: Any) -> Any:
    if isinstance(p, CategoricalParam):
        return p.choices[0]
    return min(max(v, p.low), p.high)


def _apply_override(spec, key, value, settings, defaults, space, loading) -> None:
    parts = key.split(".")
    try:
        if len(parts) == 1 and key in defaults:
            value = check_knob_value(key, value, defaults[key], space.get(key), f"--set {key}")
            defaults[key] = value          # a fixed knob is no longer searched
            space.pop(key, None)
            return
        if parts[0] == "space" and len(parts) == 3 and parts[1] in defaults:
            knob, field = parts[1], parts[2]
            if knob not in space:
                raise OvssError(f"--set {key}: knob {knob!r} is not searched")
            data = space[knob].model_dump()
            if field not in data:
                raise OvssError(f"--set {key}: {space[knob].type} space has no field {field!r} "
                                f"(fields: {', '.join(data)})")
            data[field] = value
            space[knob] = _SPACE_ADAPTER.validate_python(data)
            return
        if parts[0] == "settings" and len(parts) == 2 and parts[1] in settings:
            settings[parts[1]] = _check_setting(key, value, settings[parts[1]])
            return
        if parts[0] == "backbone" and len(parts) == 2:
            _check_backbone_field(spec, parts[1])
            loading[parts[1]] = value
            return
    except ValidationError as e:
        raise OvssError(validation_line(e, f"--set {key}={value!r}")) from None
    raise OvssError(
        f"unknown --set key {key!r}: use a knob ({', '.join(defaults)}), space.<knob>.<field>, "
        f"settings.<name> ({', '.join(settings) or 'none'}) or backbone.<field>")


def _check_setting(key: str, value: Any, current: Any) -> Any:
    """A ``--set settings.<name>`` value must be of the kind of the YAML's value (a number for a
    number, true/false for a flag, ...); a number given for a text setting becomes text."""
    if current is None:
        return value
    if isinstance(current, str) and is_number(value):
        return str(value)
    if is_number(current) and is_number(value):
        if isinstance(current, int) and not isinstance(value, int):
            raise OvssError(f"--set {key}={value!r}: takes an integer (now {current!r})")
        return value
    if isinstance(value, float) and not math.isfinite(value) and is_number(current):
        raise OvssError(f"--set {key}={value!r}: takes a finite number (now {current!r})")
    if value_kind(value) != value_kind(current):
        raise OvssError(f"--set {key}={value!r}: takes {value_kind(current)} (now {current!r})")
    return value


def _check_backbone_field(spec: MethodSpec, field: str) -> None:
    if field == "name":
        raise OvssError("--set backbone.name: choose the backbone with --backbone")
    known = spec.known_backbone_fields()
    if field not in known:
        raise OvssError(f"--set backbone.{field}: method {spec.method} backbones have no field "
                        f"{field!r} (fields: {', '.join(known)})")


_SPACE_ADAPTER: TypeAdapter = TypeAdapter(SpaceParam)


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["tau=6", "space.tau.high=7"]`` -> ``{"tau": 6, "space.tau.high": 7}`` (YAML values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise OvssError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            out[k.strip()] = v
    return out
