"""Method specs (``conf/methods/<method>.yaml``): the pydantic schema, loading and the check of
one knob value.

The YAML is the one copy of every paper number (defaults, ranges, steps); the code holds none of
them. Used by :mod:`methods.infer` (a tuned config's knobs are checked against the spec before any
weights load) and by the search (:mod:`search.core.config` narrows a spec to one backbone and data
set and applies ``--set``). Every failure is a one-line ``OvssError`` that names the key.
"""

from __future__ import annotations

import math
import os
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
    ``crf: false``); the K best are then re-scored with the full pipeline
    (:mod:`search.engine.rerank`)."""

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
    #: knob values that replace the paper defaults (trial 0) and stay searched (``set`` fixes)
    defaults: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, SpaceParam] = Field(default_factory=dict)   # replaces the method's
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
        for name, preset in self.presets.items():
            for k in preset.defaults:
                if k not in self.defaults:
                    raise ValueError(f"presets.{name}.defaults: knob {k!r} has no entry in "
                                     f"defaults")
            for k in preset.space:
                if k not in self.defaults:
                    raise ValueError(f"presets.{name}.space.{k}: knob has no entry in defaults")
        return self


def conf_dirs() -> list[Path]:
    """Where method YAMLs are looked up: ``$OVSS_CONF_PATH`` (colon list) first, then ``conf/``."""
    extra = [Path(p) for p in os.environ.get("OVSS_CONF_PATH", "").split(os.pathsep) if p]
    return [*extra, CONF_DIR]


def validation_line(e: ValidationError, where: str) -> str:
    """The first error of a pydantic validation as one line: ``where: key.path: message``."""
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
        raise OvssError(validation_line(e, str(path))) from None


def value_kind(v: Any) -> str:
    """The kind of a YAML value in words (``an integer``, ``text``, ...), for error lines."""
    if isinstance(v, bool):
        return "true or false"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "text"
    return f"a {type(v).__name__}"


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool)."""
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
        if not is_number(value):
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
    if is_number(default) and is_number(value) and not isinstance(default, bool):
        if isinstance(default, int) and not isinstance(value, int):
            raise OvssError(f"{where}={value!r}: knob {knob} takes an integer "
                            f"(its default is {default!r})")
        return float(value) if isinstance(default, float) else value
    if value_kind(value) != value_kind(default):
        raise OvssError(f"{where}={value!r}: knob {knob} takes {value_kind(default)} "
                        f"(its default is {default!r})")
    return value
