"""Method specs (``conf/methods/<method>.yaml``): load, validate with pydantic, apply ``--set``.

Everything here runs before Ray starts, so a wrong key or value is a one-line ``OvssError`` that
names it. The YAML is the one copy of every paper number (defaults, ranges, steps); the code holds
none of them.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from methods.base import CONF_DIR, OvssError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IntParam(_Strict):
    """An integer knob sampled in ``[low, high]`` (inclusive) on a grid of ``step``."""

    type: Literal["int"]
    low: int
    high: int
    step: int = 1
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        _check_range(self.low, self.high, self.step, self.log)
        return self

    def contains(self, v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and self.low <= v <= self.high


class FloatParam(_Strict):
    """A float knob in ``[low, high]``; ``step`` makes it discrete, ``log`` log-uniform."""

    type: Literal["float"]
    low: float
    high: float
    step: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        _check_range(self.low, self.high, self.step, self.log)
        if self.step is not None and self.log:
            raise ValueError("step and log cannot be combined")
        return self

    def contains(self, v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and (
            self.low - 1e-12 <= float(v) <= self.high + 1e-12)


class CategoricalParam(_Strict):
    """A knob chosen among ``choices`` (str, int, float or bool values)."""

    type: Literal["categorical"]
    choices: list[bool | int | float | str] = Field(min_length=1)

    def contains(self, v: Any) -> bool:
        return v in self.choices


SpaceParam = Annotated[IntParam | FloatParam | CategoricalParam, Field(discriminator="type")]


def _check_range(low: float, high: float, step: float | None, log: bool) -> None:
    if low > high:
        raise ValueError(f"low {low} is above high {high}")
    if step is not None and step <= 0:
        raise ValueError(f"step {step} must be positive")
    if log and low <= 0:
        raise ValueError(f"log scale needs low > 0, got {low}")


class BackboneSpec(BaseModel):
    """One backbone: the method's loading fields (free-form) plus optional overrides."""

    model_config = ConfigDict(extra="allow")
    defaults: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, SpaceParam] = Field(default_factory=dict)

    def loading_fields(self, name: str) -> dict[str, Any]:
        extra = dict(self.model_extra or {})
        return {"name": name, **extra}


class DatasetOverride(_Strict):
    settings: dict[str, Any] = Field(default_factory=dict)


class ProxySpec(_Strict):
    """The search stage of a two-stage search (``search.run --rerank-top K``): settings and knob
    values that replace the method's for the proxy trials (e.g. PnP ``drop_iters: 1``,
    ``crf: false``); the K best are then re-scored with the full pipeline (search/rerank.py)."""

    settings: dict[str, Any] = Field(default_factory=dict)
    set: dict[str, Any] = Field(default_factory=dict)


class Preset(_Strict):
    backbone: str | None = None
    dataset: str | None = None
    num_samples: int | None = None
    max_concurrent: int | None = None
    max_images: int | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    set: dict[str, Any] = Field(default_factory=dict)
    proxy: ProxySpec | None = None      # merged over the method's proxy
    rerank_top: int | None = Field(default=None, ge=1)   # default of --rerank-top


class MethodSpec(_Strict):
    """The whole ``conf/methods/<method>.yaml``."""

    method: str
    description: str = ""
    default_backbone: str
    backbones: dict[str, BackboneSpec] = Field(min_length=1)
    settings: dict[str, Any] = Field(default_factory=dict)
    datasets: dict[str, DatasetOverride] = Field(default_factory=dict)
    defaults: dict[str, Any] = Field(min_length=1)
    space: dict[str, SpaceParam] = Field(default_factory=dict)
    presets: dict[str, Preset] = Field(default_factory=dict)
    #: Loading fields ``--set backbone.<field>`` may give beyond those the backbones above use
    #: (every method also takes ``path``: a local copy of the weights).
    backbone_fields: list[str] = Field(default_factory=list)

    def known_backbone_fields(self) -> list[str]:
        fields = {"path", *self.backbone_fields}
        for bb in self.backbones.values():
            fields.update(bb.model_extra or {})
        return sorted(fields)
    proxy: ProxySpec | None = None

    @model_validator(mode="after")
    def _check(self) -> MethodSpec:
        proxies = [("proxy", self.proxy)] + [(f"presets.{n}.proxy", p.proxy)
                                             for n, p in self.presets.items()]
        for where, proxy in proxies:
            for k in (proxy.settings if proxy else {}):
                if k not in self.settings:
                    raise ValueError(f"{where}.settings.{k}: not a setting of the method")
            for k in (proxy.set if proxy else {}):
                if k not in self.defaults:
                    raise ValueError(f"{where}.set.{k}: knob has no entry in defaults")
        if self.default_backbone not in self.backbones:
            raise ValueError(f"default_backbone {self.default_backbone!r} is not in backbones")
        for name, bb in self.backbones.items():
            for k in [*bb.defaults, *bb.space]:
                if k not in self.defaults:
                    raise ValueError(f"backbones.{name}: knob {k!r} has no entry in defaults")
        for k in self.space:
            if k not in self.defaults:
                raise ValueError(f"space.{k}: knob has no entry in defaults")
        return self


class ResolvedMethod(BaseModel):
    """A method spec narrowed to one backbone and data set, with ``--set`` applied."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    method: str
    backbone_name: str
    backbone: dict[str, Any]
    settings: dict[str, Any]
    defaults: dict[str, Any]
    space: dict[str, SpaceParam]


def conf_dirs() -> list[Path]:
    """Where method YAMLs are looked up: ``$OVSS_CONF_PATH`` (colon list) first, then ``conf/``."""
    extra = [Path(p) for p in os.environ.get("OVSS_CONF_PATH", "").split(os.pathsep) if p]
    return [*extra, CONF_DIR]


def _one_line(e: ValidationError, where: str) -> str:
    err = e.errors()[0]
    tags = ("function-after", "int", "float", "categorical")
    loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(tags))
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {loc + ': ' if loc else ''}{msg}"


def load_method_spec(method: str) -> MethodSpec:
    for d in conf_dirs():
        path = d / "methods" / f"{method}.yaml"
        if path.is_file():
            break
    else:
        raise OvssError(f"no config for method {method!r}: conf/methods/{method}.yaml not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise OvssError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        return MethodSpec.model_validate(raw)
    except ValidationError as e:
        raise OvssError(_one_line(e, str(path))) from None


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
    defaults = {**spec.defaults, **bb.defaults}
    space = {**spec.space, **bb.space}
    loading = bb.loading_fields(name)
    all_overrides = {**(preset.set if preset else {}), **(overrides or {})}
    for key, value in all_overrides.items():
        _apply_override(spec, key, value, settings, defaults, space, loading)
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
        raise OvssError(_one_line(e, f"--set {key}={value!r}")) from None
    raise OvssError(
        f"unknown --set key {key!r}: use a knob ({', '.join(defaults)}), space.<knob>.<field>, "
        f"settings.<name> ({', '.join(settings) or 'none'}) or backbone.<field>")


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "true or false"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "text"
    return f"a {type(v).__name__}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_knob_value(knob: str, value: Any, default: Any, param: SpaceParam | None,
                     where: str, kind_only: bool = False) -> Any:
    """``value`` for ``knob`` (a fixed knob, or a tuned config's param), checked against the
    knob's space when it has one (only its int / float type with ``kind_only``), else against
    the kind of its default. Returns the value (an int given for a float knob becomes a float);
    OvssError naming the knob otherwise."""
    if kind_only and isinstance(param, CategoricalParam):
        param = None
    where_in = ""
    if isinstance(param, (IntParam, FloatParam)) and not kind_only:
        where_in = f" in [{param.low:g}, {param.high:g}]"
    if isinstance(param, CategoricalParam):
        if value not in param.choices:
            raise OvssError(f"{where}={value!r}: knob {knob} takes one of "
                            f"{', '.join(map(str, param.choices))}")
        return value
    if isinstance(param, IntParam):
        if not (isinstance(value, int) and not isinstance(value, bool)):
            raise OvssError(f"{where}={value!r}: knob {knob} takes an integer{where_in}")
    if isinstance(param, FloatParam):
        if not _is_number(value):
            raise OvssError(f"{where}={value!r}: knob {knob} takes a number{where_in}")
        value = float(value)
    if param is not None and kind_only:
        return value
    if param is not None:
        if not param.contains(value):
            raise OvssError(f"{where}={value!r}: knob {knob} lies outside its search space "
                            f"[{param.low:g}, {param.high:g}]")
        return value
    if default is None:
        return value
    if _is_number(default) and _is_number(value) and not isinstance(default, bool):
        if isinstance(default, int) and not isinstance(value, int):
            raise OvssError(f"{where}={value!r}: knob {knob} takes an integer "
                            f"(its default is {default!r})")
        return float(value) if isinstance(default, float) else value
    if _kind(value) != _kind(default):
        raise OvssError(f"{where}={value!r}: knob {knob} takes {_kind(default)} "
                        f"(its default is {default!r})")
    return value


def _check_setting(key: str, value: Any, current: Any) -> Any:
    """A ``--set settings.<name>`` value must be of the kind of the YAML's value (a number for a
    number, true/false for a flag, ...); a number given for a text setting becomes text."""
    if current is None:
        return value
    if isinstance(current, str) and _is_number(value):
        return str(value)
    if _is_number(current) and _is_number(value):
        if isinstance(current, int) and not isinstance(value, int):
            raise OvssError(f"--set {key}={value!r}: takes an integer (now {current!r})")
        return value
    if isinstance(value, float) and not math.isfinite(value) and _is_number(current):
        raise OvssError(f"--set {key}={value!r}: takes a finite number (now {current!r})")
    if _kind(value) != _kind(current):
        raise OvssError(f"--set {key}={value!r}: takes {_kind(current)} (now {current!r})")
    return value


def _check_backbone_field(spec: MethodSpec, field: str) -> None:
    if field == "name":
        raise OvssError("--set backbone.name: choose the backbone with --backbone")
    known = spec.known_backbone_fields()
    if field not in known:
        raise OvssError(f"--set backbone.{field}: method {spec.method} backbones have no field "
                        f"{field!r} (fields: {', '.join(known)})")


from pydantic import TypeAdapter  # noqa: E402

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
