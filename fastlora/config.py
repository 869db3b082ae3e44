"""Adapter configurations with PEFT's field names, defaults and ``adapter_config.json`` format."""

from __future__ import annotations

import enum
import functools
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from fastlora._warn import warn
from fastlora.io import atomic_write_text

__all__ = ["CONFIG_NAME", "PeftType", "TaskType", "PeftConfig", "LoraConfig", "register_config"]

CONFIG_NAME = "adapter_config.json"

# adapter_config.json is written with its keys sorted, as PEFT writes it, except inside these dicts: the first
# pattern that matches a module wins, so their order is part of their meaning (PEFT keeps it from 0.22 on).
ORDERED_KEYS = frozenset({"rank_pattern", "alpha_pattern"})


def _sorted_keys(value: Any, keep_order: bool = False) -> Any:
    """``value`` with the keys of its dicts sorted, at every depth but inside the ``ORDERED_KEYS`` dicts."""
    if isinstance(value, dict):
        items = value.items() if keep_order else sorted(value.items())
        return {key: _sorted_keys(item, key in ORDERED_KEYS) for key, item in items}
    if isinstance(value, (list, tuple)):
        return [_sorted_keys(item) for item in value]
    return value


class PeftType(str, enum.Enum):
    LORA = "LORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    LOHA = "LOHA"
    ADALORA = "ADALORA"

    def __str__(self) -> str:
        return self.value


class TaskType(str, enum.Enum):
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


# peft_type -> config class; methods register themselves with ``register_config``.
_CONFIG_CLASSES: dict[str, type[PeftConfig]] = {}


def register_config(cls):
    """Make ``cls`` loadable by its peft_type, and let its constructor take PEFT's unsupported fields at
    their defaults (``LoraConfig(use_dora=False)`` works) and refuse them otherwise with a clear error."""
    _CONFIG_CLASSES[cls.PEFT_TYPE.value] = cls
    dataclass_init = cls.__init__

    @functools.wraps(dataclass_init)
    def __init__(self, *args, **kwargs):
        for key, default in cls.UNSUPPORTED_AT_DEFAULT.items():
            if key in kwargs:
                _check_unsupported(cls, key, kwargs.pop(key), default)
        dataclass_init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def _check_unsupported(cls, key: str, value: Any, default: Any) -> None:
    if value != default and not (default is None and value in ({}, [], False)):
        raise NotImplementedError(f"{cls.__name__}: fastlora does not support {key}={value!r}")


@dataclass
class PeftConfig:
    """Fields every adapter config shares (PEFT's ``PeftConfig``)."""

    PEFT_TYPE: ClassVar[PeftType | None] = None
    # PEFT fields fastlora reads but does not implement: accepted only at these (PEFT's default) values.
    UNSUPPORTED_AT_DEFAULT: ClassVar[dict[str, Any]] = {}
    # PEFT fields with no effect here, read silently (they are not "unknown").
    IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset({"peft_version"})

    task_type: TaskType | str | None = None
    peft_type: PeftType | str | None = None
    auto_mapping: dict | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self):
        if self.PEFT_TYPE is not None:
            if self.peft_type not in (None, self.PEFT_TYPE, self.PEFT_TYPE.value):
                raise ValueError(f"{type(self).__name__} has peft_type {self.PEFT_TYPE.value}, got {self.peft_type!r}")
            self.peft_type = self.PEFT_TYPE
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                valid = ", ".join(t.value for t in TaskType)
                raise ValueError(f"unknown task_type {self.task_type!r}; expected one of {valid}") from None

    @property
    def is_prompt_learning(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, enum.Enum):
                out[key] = value.value
            elif isinstance(value, (set, frozenset)):
                out[key] = sorted(value)
        return out

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        text = json.dumps(_sorted_keys(self.to_dict()), indent=2)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), text)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build the config ``data`` describes, dispatching on ``peft_type`` when called on the base class.

        Unknown keys are dropped with a warning; PEFT features fastlora lacks raise when not at default.
        """
        data = dict(data)
        if cls is PeftConfig or cls.PEFT_TYPE is None:
            peft_type = data.get("peft_type")
            if peft_type is None:
                raise ValueError("adapter config has no 'peft_type'; expected one of " + ", ".join(_CONFIG_CLASSES))
            peft_type = str(getattr(peft_type, "value", peft_type))
            if peft_type not in _CONFIG_CLASSES:
                raise ValueError(
                    f"unknown peft_type {peft_type!r}; this fastlora supports {', '.join(sorted(_CONFIG_CLASSES))}"
                )
            cls = _CONFIG_CLASSES[peft_type]
        known = {f.name for f in fields(cls)}
        for key, default in cls.UNSUPPORTED_AT_DEFAULT.items():
            _check_unsupported(cls, key, data.pop(key, default), default)
        unknown = sorted(set(data) - known - cls.IGNORED_KEYS)
        if unknown:
            warn(f"{cls.__name__}: ignoring unknown config keys {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, **kwargs) -> PeftConfig:
        """Read ``adapter_config.json`` from a local folder; ``kwargs`` override what the file says."""
        folder = os.path.join(path, subfolder) if subfolder else os.fspath(path)
        config_file = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {folder!r}")
        with open(config_file, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as err:
                raise ValueError(f"{config_file} is not valid JSON: {err}") from None
        data.update(kwargs)
        return cls.from_dict(data)


@register_config
@dataclass
class LoraConfig(PeftConfig):
    """PEFT's ``LoraConfig``: same fields, same defaults, same meaning.

    ``target_modules``: a list of names matched exactly or as a dotted suffix, a string matched as a
    full regex, or ``"all-linear"`` (every linear layer but the output head); None takes the default
    table for the model type.
    """

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LORA
    UNSUPPORTED_AT_DEFAULT: ClassVar[dict[str, Any]] = {
        "use_dora": False,
        "use_qalora": False,
        "lora_bias": False,
        "layer_replication": None,
        "megatron_config": None,
        "loftq_config": None,
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "velora_config": None,
        "alora_invocation_tokens": None,
        "monteclora_config": None,
        "trainable_token_indices": None,
        "target_parameters": None,
        "use_bdlora": None,
        "arrow_config": None,
        "kasa_config": None,
        "runtime_config": None,
        "astra_config": None,
    }
    IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset({"peft_version", "megatron_core", "qalora_group_size",
                                                         "ensure_weight_tying"})

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        _check_rank("r", self.r)
        for key, rank in (self.rank_pattern or {}).items():
            _check_rank(f"rank_pattern[{key!r}]", rank)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = sorted(set(self.exclude_modules))
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a str (a regex)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform")
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})


def _check_rank(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
