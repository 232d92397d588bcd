"""One source of truth for engine settings: every EngineArgs field is declared once (type,
default, help, choices) and the CLI flags, the README's configuration table and the
model-config.yaml template are checked against that declaration, so a field added without a
flag or documentation fails here. Also: the engine config's typed sub-configs, and the
config -> models import direction."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pagedbackend.cli import build_parser, engine_args_from
from pagedbackend.config import (CacheConfig, DeviceConfig, EngineArgs, EngineConfig, LoadConfig, ParallelConfig,
                                 SchedulerConfig, Setting, config_table_markdown, engine_settings)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEMPLATES = [ROOT / "adapters" / "torchserve" / "model-config.yaml", ROOT / "model_store" / "model-config.yaml"]
HEADING = "## Configuration (`EngineArgs`, also `LLM(**kwargs)`)"


def fake_setting(name: str = "new_knob") -> Setting:
    """A setting that is declared nowhere else: every check below must report it."""
    return Setting(name=name, accepts=(int,), optional=False, default=3, help="a new knob", choices=None,
                   minimum=None, check=None, doc_default=None, negative_aliases=())


# ---------------------------------------------------------------------------- the declaration
def test_every_field_is_declared_with_type_default_and_help():
    settings = engine_settings()
    assert [s.name for s in settings] == [f.name for f in dataclasses.fields(EngineArgs)]
    for s in settings:
        assert s.help and not s.help.endswith("."), s.name
        assert s.type in (str, int, float, bool), s.name
        if s.choices is not None and not s.required:
            assert s.default in s.choices or (s.optional and s.default is None and s.doc_default), s.name
        if not s.required:
            s.validate(s.default)  # every default passes its own declaration
    assert EngineArgs.settings() == settings
    required = [s.name for s in settings if s.required]
    assert required == ["model"]


def test_declared_defaults_are_the_dataclass_defaults():
    args = EngineArgs(model="m")
    for s in engine_settings():
        if not s.required:
            assert getattr(args, s.name) == s.default


# ---------------------------------------------------------------------------- CLI
def _engine_subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    out = {}
    for action in parser._subparsers._group_actions:  # noqa: SLF001 - walking argparse's tree
        for name, sub in action.choices.items():
            if name == "generate":
                out["generate"] = sub
            if name == "serve":
                for serve_action in sub._subparsers._group_actions:  # noqa: SLF001
                    out["serve pytriton"] = serve_action.choices["pytriton"]
    return out


def cli_problems(settings, parser: argparse.ArgumentParser) -> list[str]:
    flags = {opt: action for action in parser._actions for opt in action.option_strings}  # noqa: SLF001
    problems = []
    for s in settings:
        names = [s.flag] + ([f"--no-{s.flag[2:]}", *s.negative_aliases] if s.type is bool else [])
        for flag in names:
            if flag not in flags:
                problems.append(f"{s.name}: no {flag} flag")
            elif flags[flag].dest != s.name:
                problems.append(f"{s.name}: {flag} sets {flags[flag].dest!r}")
        if s.flag in flags:
            action = flags[s.flag]
            if not s.required and action.default != s.default:
                problems.append(f"{s.name}: flag default {action.default!r} != declared {s.default!r}")
            if s.choices is not None and s.type is not bool and tuple(action.choices or ()) != s.choices:
                problems.append(f"{s.name}: flag choices {action.choices!r} != declared {s.choices!r}")
    return problems


@pytest.mark.parametrize("command", ["generate", "serve pytriton"])
def test_every_field_has_a_flag(command):
    parser = _engine_subparsers()[command]
    assert cli_problems(engine_settings(), parser) == []
    assert cli_problems([fake_setting()], parser) == ["new_knob: no --new-knob flag"]


def test_the_flags_the_old_cli_missed_exist():
    parser = _engine_subparsers()["generate"]
    flags = {opt for action in parser._actions for opt in action.option_strings}  # noqa: SLF001
    for flag in ("--tokenizer", "--tensor-parallel-size", "--load-format", "--max-logprobs", "--max-prompt-chars",
                 "--enable-prefix-caching", "--no-enable-prefix-caching", "--no-prefix-caching",
                 "--enable-chunked-prefill", "--no-enable-chunked-prefill", "--no-chunked-prefill"):
        assert flag in flags


def _parse(*argv: str) -> EngineArgs:
    ns = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", *argv])
    return engine_args_from(ns)


def test_no_flags_give_the_declared_defaults():
    assert _parse() == EngineArgs(model="m")


def _other_value(s: Setting):
    if s.type is bool:
        return not s.default
    if s.choices is not None:
        return next(c for c in s.choices if c != s.default)
    if s.type is int:
        return (s.default or 0) + 3
    if s.type is float:
        return (s.default or 0.25) / 2
    return f"/some/{s.name}"


def test_every_flag_reaches_its_field():
    values = {s.name: _other_value(s) for s in engine_settings() if not s.required}
    argv = []
    for s in engine_settings():
        if s.name not in values:
            continue
        value = values[s.name]
        if s.type is bool:
            argv.append(s.flag if value else f"--no-{s.flag[2:]}")
        else:
            argv += [s.flag, str(value)]
    assert _parse(*argv) == EngineArgs(model="m", **values)


def test_boolean_flags_and_their_old_spellings():
    assert _parse("--no-prefix-caching").enable_prefix_caching is False
    assert _parse("--no-enable-prefix-caching").enable_prefix_caching is False
    assert _parse("--no-prefix-caching", "--enable-prefix-caching").enable_prefix_caching is True
    assert _parse("--no-chunked-prefill").enable_chunked_prefill is False
    assert _parse("--no-enable-chunked-prefill").enable_chunked_prefill is False
    assert _parse().enable_prefix_caching is True and _parse().enable_chunked_prefill is True


def test_a_bad_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _parse("--load-format", "gguf")
    assert "invalid choice: 'gguf'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- README table
def readme_rows(text: str) -> list[list[str]]:
    section = text[text.index(HEADING) + len(HEADING):]
    lines = section.lstrip("\n").splitlines()
    table = []
    for line in lines:
        if not line.startswith("|"):
            break
        table.append(line)
    assert table[0].replace(" ", "") == "|argument|default|meaning|" and set(table[1]) <= set("|-: ")
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in table[2:]]


def readme_problems(settings, text: str) -> list[str]:
    rows = readme_rows(text)
    names = [re.fullmatch(r"`(\w+)`", r[0]).group(1) if re.fullmatch(r"`(\w+)`", r[0]) else r[0] for r in rows]
    problems = [f"{s.name}: no README row" for s in settings if s.name not in names]
    problems += [f"{n}: README row for an unknown field" for n in names if n not in {s.name for s in settings}]
    if not problems and names != [s.name for s in settings]:
        problems.append(f"README rows out of declaration order: {names}")
    by_name = dict(zip(names, rows))
    for s in settings:
        row = by_name.get(s.name)
        if row is None:
            continue
        if len(row) != 3:
            problems.append(f"{s.name}: README row has {len(row)} cells")
            continue
        if row[1] != s.documented_default:
            problems.append(f"{s.name}: README default {row[1]!r} != declared {s.documented_default!r}")
        if row[2] != s.help:
            problems.append(f"{s.name}: README meaning differs from the declared help")
    return problems


def test_readme_table_has_one_row_per_field_in_order_with_the_declared_default():
    text = README.read_text()
    problems = readme_problems(engine_settings(), text)
    assert problems == [], ("README configuration table out of date; regenerate it with "
                            f"`python -m pagedbackend.config --write README.md`: {problems}")
    assert config_table_markdown() in text


def test_readme_check_catches_an_undocumented_field_and_a_wrong_default():
    text = README.read_text()
    assert readme_problems([*engine_settings(), fake_setting()], text) == ["new_knob: no README row"]
    broken = text.replace("| `block_size` | 16 |", "| `block_size` | 32 |")
    assert readme_problems(engine_settings(), broken) == ["block_size: README default '32' != declared '16'"]
    missing = "\n".join(line for line in text.splitlines() if not line.startswith("| `seed` |"))
    assert readme_problems(engine_settings(), missing) == ["seed: no README row"]


# ---------------------------------------------------------------------------- model-config.yaml
_KEY_LINE = re.compile(r"^  (# )?([a-z_]+):(?:\s|$)")


def template_handler_lines(text: str) -> list[tuple[str, bool, str]]:
    """(key, commented, the `key: value` text) for each key line of the handler: block."""
    lines = text.splitlines()
    start = lines.index("handler:") + 1
    out = []
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break
        m = _KEY_LINE.match(line)
        if m:
            out.append((m.group(2), bool(m.group(1)), line.strip().removeprefix("# ")))
    return out


def template_problems(settings, text: str) -> list[str]:
    from pagedbackend.adapters.torchserve.config import HANDLER_KEYS  # noqa: PLC0415

    engine = [s for s in settings if s.name != "model"]
    entries = template_handler_lines(text)
    keys = [k for k, _, _ in entries]
    expected = [*HANDLER_KEYS, *(s.name for s in engine)]
    problems = [f"{k}: not in the handler: block" for k in expected if k not in keys]
    problems += [f"{k}: handler key that is neither an EngineArgs field nor a handler key" for k in keys
                 if k not in expected]
    if len(keys) != len(set(keys)):
        problems.append(f"duplicate handler keys: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    if not problems and keys != expected:
        problems.append(f"handler keys out of declaration order: {keys}")
    by_name = {s.name: s for s in engine}
    for key, commented, line in entries:
        s = by_name.get(key)
        if s is None:
            continue
        value = yaml.safe_load(line)[key]
        if commented:
            try:
                s.validate(value)
            except ValueError as e:
                problems.append(f"{key}: the commented example is not valid ({e})")
        elif value != s.default:
            problems.append(f"{key}: uncommented value {value!r} is not the default {s.default!r}")
    return problems


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: str(p.relative_to(ROOT)))
def test_model_config_template_names_every_field_with_valid_values(path):
    from pagedbackend.adapters.torchserve.config import validate_model_config  # noqa: PLC0415

    text = path.read_text()
    assert template_problems(engine_settings(), text) == []
    validate_model_config(yaml.safe_load(text))  # the uncommented part is a valid config as it stands


def test_template_check_catches_a_missing_field_and_a_non_default_value():
    text = TEMPLATES[0].read_text()
    assert template_problems([*engine_settings(), fake_setting()], text) == ["new_knob: not in the handler: block"]
    missing = "\n".join(line for line in text.splitlines() if "# load_format:" not in line)
    assert template_problems(engine_settings(), missing) == ["load_format: not in the handler: block"]
    changed = text.replace("  max_num_seqs: 256", "  max_num_seqs: 64")
    assert template_problems(engine_settings(), changed) == [
        "max_num_seqs: uncommented value 64 is not the default 256"]
    bad = text.replace("# block_size: 16", "# block_size: 12")
    assert len(template_problems(engine_settings(), bad)) == 1


# ---------------------------------------------------------------------------- EngineConfig
FLAT = {
    "block_size": "cache_config", "num_kv_blocks": "cache_config", "kv_cache_memory_fraction": "cache_config",
    "enable_prefix_caching": "cache_config", "swap_space": "cache_config",
    "max_num_seqs": "scheduler_config", "max_num_batched_tokens": "scheduler_config",
    "max_model_len": "scheduler_config", "enable_chunked_prefill": "scheduler_config",
    "scheduling_policy": "scheduler_config", "preemption_mode": "scheduler_config",
    "device": "device_config", "dtype": "device_config", "tensor_parallel_size": "parallel_config",
    "load_format": "load_config",
}


def test_engine_config_is_made_of_typed_sub_configs_with_flat_views(model_dir):
    config = EngineArgs(model=str(model_dir("llama")), block_size=32, max_num_seqs=8, num_kv_blocks=50,
                        preemption_mode="swap", swap_space=0.5).create_engine_config()
    assert isinstance(config, EngineConfig)
    assert isinstance(config.cache_config, CacheConfig) and isinstance(config.scheduler_config, SchedulerConfig)
    assert isinstance(config.parallel_config, ParallelConfig) and isinstance(config.device_config, DeviceConfig)
    assert isinstance(config.load_config, LoadConfig)
    assert (config.block_size, config.max_num_seqs, config.num_kv_blocks) == (32, 8, 50)
    assert (config.preemption_mode, config.swap_space, config.device, config.dtype) == ("swap", 0.5, "cpu",
                                                                                         torch.float32)
    assert config.tokenizer == str(model_dir("llama"))
    for name, owner in FLAT.items():
        assert getattr(config, name) == getattr(getattr(config, owner), name), name
    config.num_kv_blocks = 123  # what the engine does once the runner sized the cache
    assert config.cache_config.num_kv_blocks == 123
    config.scheduler_config.max_num_seqs = 4
    assert config.max_num_seqs == 4
    # Every engine setting that is not an "auto" choice or the model is readable on the config.
    for s in engine_settings():
        if s.name != "model":
            assert hasattr(config, s.name), s.name


@pytest.mark.parametrize("make,message", [
    (lambda: CacheConfig(block_size=12, num_kv_blocks=None, kv_cache_memory_fraction=0.5),
     "block_size must be one of"),
    (lambda: CacheConfig(block_size=16, num_kv_blocks=0, kv_cache_memory_fraction=None),
     "num_kv_blocks must be at least 1"),
    (lambda: CacheConfig(block_size=16, num_kv_blocks=None, kv_cache_memory_fraction=2.0),
     "kv_cache_memory_fraction must be in"),
    (lambda: CacheConfig(block_size=16, num_kv_blocks=None, kv_cache_memory_fraction=0.5, swap_space=-1),
     "swap_space must be a non-negative number"),
    (lambda: SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=8, max_model_len=64),
     "max_num_batched_tokens=8 must be at least max_num_seqs=16"),
    (lambda: SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
                             enable_chunked_prefill=False), "must be at least max_model_len=64"),
    (lambda: SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
                             scheduling_policy="lifo"), "scheduling_policy must be one of"),
    (lambda: SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=None, max_model_len=64),
     "max_num_batched_tokens must be resolved"),
    (lambda: ParallelConfig(tensor_parallel_size=0), "tensor_parallel_size must be at least 1"),
    (lambda: ParallelConfig(tensor_parallel_size=2), "'uni' is for one rank only"),
    (lambda: ParallelConfig(tensor_parallel_size=2, distributed_executor_backend="ray"),
     "distributed_executor_backend must be one of"),
    (lambda: DeviceConfig(device="tpu", dtype=torch.float32), "device must be one of"),
    (lambda: DeviceConfig(device="auto", dtype=torch.float32), "device must be resolved"),
    (lambda: DeviceConfig(device="cpu", dtype=torch.float64), "dtype must be one of"),
    (lambda: LoadConfig(load_format="gguf"), "load_format must be one of"),
])
def test_each_sub_config_validates_itself(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_swap_preemption_needs_swap_space(model_dir):
    with pytest.raises(ValueError, match="swap_space must be positive when preemption_mode is 'swap'"):
        EngineArgs(model=str(model_dir("llama")), preemption_mode="swap", swap_space=0).create_engine_config()


# ---------------------------------------------------------------------------- import direction
def test_models_never_import_the_engine_config():
    """config.py imports the model package; nothing under pagedbackend/models imports
    pagedbackend.config, at run time or hidden in a function."""
    for path in (ROOT / "pagedbackend" / "models").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "pagedbackend.config", f"{path.name} imports pagedbackend.config"
                if node.module == "pagedbackend":
                    assert "config" not in [a.name for a in node.names], path.name
            elif isinstance(node, ast.Import):
                assert "pagedbackend.config" not in [a.name for a in node.names], path.name
    probe = ("import sys, pagedbackend; before = 'pagedbackend.config' in sys.modules; "
             "import pagedbackend.models, pagedbackend.models.config, pagedbackend.models.loader; "
             "print(before, 'pagedbackend.config' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.split()
    if before == "False":  # `import pagedbackend` is lazy: importing the models must not pull the config in
        assert after == "False"


def test_config_imports_the_model_config_at_module_level():
    tree = ast.parse((ROOT / "pagedbackend" / "config.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                assert not isinstance(inner, (ast.Import, ast.ImportFrom)), \
                    f"function-local import in config.py's {node.name}()"
    import pagedbackend.config as config
    import pagedbackend.models as models

    assert config.ModelConfig is models.ModelConfig and config.HFConfig is models.HFConfig
