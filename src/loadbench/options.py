"""One declaration per option: its type, default, allowed values and help.

Formats, peers, models, sources, optimizers, schedules and the training run declare their options
as `Option`s next to what they configure. Everything else is made from those declarations: the
CLI flags and their `--help` (`loadbench.cli.params`), `loadbench formats` / `models` /
`sources`, the pydantic models that validate experiment and config files (`fields`), and the
Python keyword arguments (checked with `Option.coerce`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field


@dataclass(frozen=True)
class Option:
    """An option: its default, one line of help, and what values it takes.

    `kind` is the type of a value (str, int, float or bool); `choices` the values allowed;
    `minimum`/`maximum` inclusive bounds and `above`/`below` exclusive ones. `parse` turns
    values a type does not describe (lists such as "20,40,80", a remap) into the value, raising
    ValueError with what is wrong. `shown` is how help shows a default that is computed
    ("about 1 MiB"). `choices_text` words the choices in errors ("fine or coarse").
    """

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    kind: type = str
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    parse: Callable[[Any], Any] | None = None
    shown: str | None = None
    choices_text: str | None = None

    @property
    def default_text(self) -> str:
        """The default as help shows it."""
        if self.shown is not None:
            return self.shown
        return show(self.default) if self.default not in (None, [], ()) else "none"

    def describe(self) -> str:
        """Help, allowed values and default in one line: `chunk codec: none|zstd (none)`."""
        text = self.help
        if self.choices and len(self.choices) < 12:
            text += f": {'|'.join(map(str, self.choices))}"
        return f"{text} ({self.default_text})"

    def coerce(self, value: Any) -> Any:
        """`value` (a string from the command line, or a Python value) checked and typed;
        ValueError says what is wrong. None stays None (the default applies)."""
        if value is None:
            return None
        if self.parse is not None:
            return self.parse(value)
        value = _as_kind(value, self.kind)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"must be {self.choices_wording}")
        for bound, ok, words in (
            (self.minimum, lambda v, b: v >= b, "at least"),
            (self.maximum, lambda v, b: v <= b, "at most"),
            (self.above, lambda v, b: v > b, "more than"),
            (self.below, lambda v, b: v < b, "less than"),
        ):
            if bound is not None and not ok(value, bound):
                raise ValueError(f"must be {words} {show(bound)}")
        return value

    @property
    def choices_wording(self) -> str:
        return self.choices_text or f"one of {'|'.join(map(str, self.choices or ()))}"


def show(value: Any) -> str:
    """A value as the command line takes it: `true`, `20,40`, `none`."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, tuple | list):
        return ",".join(show(v) for v in value)
    return str(value)


def _as_kind(value: Any, kind: type) -> Any:
    if kind is bool:
        return as_flag(value)
    if kind is int:
        return as_int(value, minimum=None)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError("must be a number") from None
    return value if isinstance(value, str) else str(value)


def as_int(value: Any, minimum: int | None = 1) -> int:
    """A whole number (from 5, 5.0 or "5"), at least `minimum`."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("must be a whole number")
    try:
        number = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ValueError("must be a whole number") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"must be at least {minimum}")
    return number


def as_flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError("must be true or false")


def as_list(value: Any) -> list[Any]:
    """ "20,40,80", "[20, 40]", (20, 40) and a lone 20 all mean a list of values."""
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


# -- pydantic models from declarations ---------------------------------------------------------


def field(option: Option) -> tuple[Any, Any]:
    """(annotation, FieldInfo) validating the option in a pydantic model: its type, choices,
    bounds and default; None is allowed when the default is None."""
    nullable, default = option.default is None, option.default
    if option.parse is not None:
        parse = _none_or(option.parse) if nullable else option.parse
        annotation: Any = Annotated[Any, BeforeValidator(parse)]
    elif option.choices is not None and option.choices_text is None:
        annotation = Literal[option.choices]  # type: ignore[valid-type]
    elif option.choices is not None:
        annotation = Annotated[option.kind, AfterValidator(_choice(option))]
    else:
        annotation = option.kind
    if nullable:
        annotation = annotation | None
    bounds = {"ge": option.minimum, "le": option.maximum, "gt": option.above,
              "lt": option.below}  # fmt: skip
    bounds = {k: v for k, v in bounds.items() if v is not None and option.parse is None}
    if isinstance(default, list):
        info = Field(default_factory=lambda: list(default), description=option.help, **bounds)
    else:
        info = Field(default, description=option.help, **bounds)
    return annotation, info


def fields(options: Mapping[str, Option]) -> dict[str, Any]:
    """`field` of every option, for `pydantic.create_model(..., **fields(options))`."""
    return {name: field(option) for name, option in options.items()}


def _none_or(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        return None if value is None else parse(value)

    return validate


def _choice(option: Option) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        if value is not None and value not in option.choices:
            raise ValueError(f"must be {option.choices_wording}")
        return value

    return validate


def merged(declarations: Mapping[str, Mapping[str, Option]]) -> dict[str, dict[str, Option]]:
    """{option name: {owner: Option}} from {owner: {option name: Option}}: the options that
    several owners (formats, models, sources) declare, side by side."""
    out: dict[str, dict[str, Option]] = {}
    for owner, options in declarations.items():
        for name, option in options.items():
            out.setdefault(name, {})[owner] = option
    return out


@dataclass(frozen=True)
class OptionGroup:
    """Options shown together (a `--help` panel): {name: {owner: Option}}. Owner "" is the
    group's own option; a named owner (a format, a model, a source kind) declared it."""

    title: str
    options: dict[str, dict[str, Option]]

    @classmethod
    def of(cls, title: str, *plain: Mapping[str, Option],
           owned: Mapping[str, Mapping[str, Option]] | None = None) -> OptionGroup:  # fmt: skip
        """A group of the options in `plain` (the group's own) and in `owned` ({owner:
        options}, e.g. every format's)."""
        options: dict[str, dict[str, Option]] = {}
        for declared in plain:
            for name, option in declared.items():
                options.setdefault(name, {})[""] = option
        for name, owners in merged(owned or {}).items():
            options.setdefault(name, {}).update(owners)
        return cls(title, options)

    def names(self) -> list[str]:
        return list(self.options)
