"""The registry: keys, duplicates, unknown names, entry validation, plugin loading and failures."""

from __future__ import annotations

import sys
import textwrap
from typing import Literal

import pytest

import optiplug
from optiplug.registry import plugin_failures, reload_plugins


class DemoConfig(optiplug.OptimizerConfig):
    name: Literal["demo_sgd"] = "demo_sgd"
    lr: float = 0.1


def build_demo(ctx, cfg):
    import torch

    return torch.optim.SGD(ctx.param_groups(0.0), lr=cfg.lr)


def make_plugin(entry_config=DemoConfig):
    class Plugin:
        @optiplug.hookimpl
        def register_optimizers(self, register):
            register(optiplug.OptimizerEntry(config=entry_config, build=build_demo, summary="demo"))

    return Plugin()


def test_default_plugin_registers_optimizers_and_schedulers():
    names = {row.name for row in optiplug.list_optimizers()}
    assert {"adamw", "sgd", "adam", "adagrad", "rmsprop"} <= names
    schedulers = {row.name for row in optiplug.list_schedulers()}
    assert {
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
        "cosine_with_min_lr",
        "warmup_stable_decay",
        "reduce_lr_on_plateau",
    } <= schedulers
    assert optiplug.get_entry("adamw").config.model_fields["name"].default == "adamw"


def test_registered_plugin_is_recorded_and_removed(temp_plugin):
    temp_plugin(make_plugin(), "demo-plugin")
    row = next(r for r in optiplug.list_optimizers() if r.name == "demo_sgd")
    assert row.plugin == "demo-plugin"
    assert optiplug.get_entry("demo_sgd").summary == "demo"
    from optiplug.registry import unregister_plugin

    unregister_plugin("demo-plugin")
    assert "demo_sgd" not in {r.name for r in optiplug.list_optimizers()}


def test_duplicate_name_names_both_plugins_and_blocks_only_that_name(temp_plugin):
    temp_plugin(make_plugin(), "acme-one")
    temp_plugin(make_plugin(), "acme-two")
    with pytest.warns(RuntimeWarning, match="'demo_sgd' is registered twice"):
        names = {r.name for r in optiplug.list_optimizers()}
    assert "demo_sgd" not in names and "adamw" in names  # every other name keeps working
    with pytest.raises(optiplug.DuplicateNameError) as info:
        optiplug.get_entry("demo_sgd")
    message = str(info.value)
    assert "optimizer 'demo_sgd' is registered twice" in message
    assert "'acme-one'" in message and "'acme-two'" in message
    assert message.endswith("uninstall one")  # run-time plugins: no environment variable can turn them off
    with pytest.raises(optiplug.DuplicateNameError):
        optiplug.parse_optimizer({"name": "demo_sgd"})
    assert optiplug.parse_optimizer("adamw").name == "adamw"
    failures = {f.name: f.cause for f in optiplug.registry.plugin_failures()}
    assert "registered twice" in failures["acme-two"]


def test_a_plugin_whose_register_hook_raises_is_left_out(temp_plugin):
    class Raising:
        @optiplug.hookimpl
        def register_optimizers(self, register):
            register(optiplug.OptimizerEntry(config=DemoConfig, build=build_demo))
            raise RuntimeError("cannot register today")

    temp_plugin(Raising(), "raising-plugin")
    with pytest.warns(RuntimeWarning, match="plugin 'raising-plugin' was left out"):
        names = {r.name for r in optiplug.list_optimizers()}
    assert "adamw" in names and "demo_sgd" not in names  # its partial registration is dropped too
    causes = {f.name: f.cause for f in plugin_failures()}
    assert causes["raising-plugin"] == "register_optimizers raised RuntimeError: cannot register today"


def test_unknown_name_suggests_close_matches():
    with pytest.raises(optiplug.UnknownNameError) as info:
        optiplug.get_entry("adamww")
    message = str(info.value)
    assert message.startswith("unknown optimizer 'adamww'. Did you mean 'adamw'")
    assert "registered: " in message and "sgd" in message and "(see `optiplug list`)" in message


def test_unknown_scheduler_name():
    with pytest.raises(optiplug.UnknownNameError, match=r"unknown scheduler 'cosin'\. Did you mean 'cosine'"):
        optiplug.get_scheduler_entry("cosin")


def test_entry_config_must_declare_a_literal_name():
    class NoLiteral(optiplug.OptimizerConfig):
        name: str = "x"

    with pytest.raises(optiplug.PluginError, match=r'must declare its name as `name: Literal\["..."\] = "..."`'):
        optiplug.OptimizerEntry(config=NoLiteral, build=build_demo)

    class NotAConfig:
        pass

    with pytest.raises(optiplug.PluginError, match=r"must be a subclass of optiplug\.OptimizerConfig"):
        optiplug.OptimizerEntry(config=NotAConfig, build=build_demo)


def test_register_rejects_wrong_entry_type(temp_plugin):
    class Bad:
        @optiplug.hookimpl
        def register_optimizers(self, register):
            register({"name": "oops"})

    temp_plugin(Bad(), "bad-entry")
    with pytest.warns(RuntimeWarning, match="plugin 'bad-entry' was left out"):
        assert "adamw" in {r.name for r in optiplug.list_optimizers()}
    causes = {f.name: f.cause for f in plugin_failures()}
    assert causes["bad-entry"] == (
        "register_optimizers raised PluginError: plugin 'bad-entry' registered {'name': 'oops'} as a optimizer; "
        "expected optiplug.OptimizerEntry"
    )


def test_misspelled_hook_is_reported():
    class Typo:
        @optiplug.hookimpl
        def register_optimiser(self, register):  # British spelling: not a hook
            pass

    from optiplug.registry import register_plugin

    with pytest.raises(optiplug.PluginError) as info:
        register_plugin(Typo(), "typo-plugin")
    assert "unknown hook(s) register_optimiser (misspelled?)" in str(info.value)
    assert "register_optimizers" in str(info.value)


# ---- real entry-point discovery from distributions on sys.path --------------------------------


def _write_distribution(root, dist: str, module: str, source: str, entry_name: str | None = None):
    """A real installed distribution: a module plus its .dist-info with an entry point of group optiplug."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[optiplug]\n{entry_name or module} = {module}\n")
    (info / "RECORD").write_text("")


GOOD_PLUGIN = """
    from typing import Literal
    import optiplug

    class EpConfig(optiplug.OptimizerConfig):
        name: Literal["ep_sgd"] = "ep_sgd"
        lr: float = 0.05

    def build(ctx, cfg):
        import torch
        return torch.optim.SGD(ctx.param_groups(0.0), lr=cfg.lr)

    @optiplug.hookimpl
    def register_optimizers(register):
        register(optiplug.OptimizerEntry(config=EpConfig, build=build, summary="from an entry point"))
"""

BROKEN_PLUGIN = """
    raise RuntimeError("boom at import")
"""

TYPO_PLUGIN = """
    import optiplug

    @optiplug.hookimpl
    def register_optimisers(register):
        pass
"""


@pytest.fixture
def site_dir(tmp_path):
    """``tmp_path`` on ``sys.path`` with every entry point allowed; afterwards only these changes are undone (not
    the test's other patches) and the registry is reloaded without the distributions written there."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        for var in ("OPTIPLUG_LOAD_PLUGINS", "OPTIPLUG_DISABLE_PLUGINS"):
            patch.delenv(var, raising=False)
        yield tmp_path
    for name in ("ep_good", "ep_broken", "ep_typo"):
        sys.modules.pop(name, None)
    reload_plugins()


def test_entry_point_plugins_load_and_failures_are_isolated(site_dir):
    _write_distribution(site_dir, "acme-good", "ep_good", GOOD_PLUGIN)
    _write_distribution(site_dir, "acme-broken", "ep_broken", BROKEN_PLUGIN)
    _write_distribution(site_dir, "acme-typo", "ep_typo", TYPO_PLUGIN)
    reload_plugins()
    with pytest.warns(RuntimeWarning, match="plugin 'acme-broken' was not loaded"):
        rows = {r.name: r for r in optiplug.list_optimizers()}
    assert rows["ep_sgd"].plugin == "acme-good"
    assert "adamw" in rows
    failures = {f.name: f.cause for f in plugin_failures()}
    assert failures["acme-broken"] == "failed to import 'ep_broken': RuntimeError: boom at import"
    assert "unknown hook(s) register_optimisers (misspelled?)" in failures["acme-typo"]
    info = {p.name: p for p in optiplug.registry.loaded_plugins()}
    assert info["acme-good"].version == "1.2.3" and info["acme-good"].hooks == ("register_optimizers",)


def test_duplicate_from_entry_points_names_the_deny_list_value(site_dir):
    _write_distribution(site_dir, "acme-good", "ep_good", GOOD_PLUGIN)
    twin = site_dir / "twin"
    twin.mkdir()
    (site_dir / "ep_twin.py").write_text(textwrap.dedent(GOOD_PLUGIN))
    _write_distribution(twin, "acme-twin", "ep_twin_unused", "")
    (next(twin.glob("*.dist-info")) / "entry_points.txt").write_text("[optiplug]\ntwin = ep_twin\n")
    import sys as _sys

    _sys.path.insert(0, str(twin))
    try:
        reload_plugins()
        with pytest.warns(RuntimeWarning, match="registered twice"), pytest.raises(optiplug.DuplicateNameError) as info:
            optiplug.get_entry("ep_sgd")
    finally:
        _sys.path.remove(str(twin))
        _sys.modules.pop("ep_twin", None)
    assert str(info.value) == (
        "optimizer 'ep_sgd' is registered twice, by plugins 'acme-good' and 'acme-twin': uninstall one, "
        "or set OPTIPLUG_DISABLE_PLUGINS=twin"
    )


def test_allow_and_deny_lists(site_dir, monkeypatch):
    _write_distribution(site_dir, "acme-good", "ep_good", GOOD_PLUGIN)
    monkeypatch.setenv("OPTIPLUG_LOAD_PLUGINS", "")
    reload_plugins()
    assert "ep_sgd" not in {r.name for r in optiplug.list_optimizers()}
    assert "adamw" in {r.name for r in optiplug.list_optimizers()}  # the default plugin always loads
    monkeypatch.setenv("OPTIPLUG_LOAD_PLUGINS", "acme-good")
    reload_plugins()
    assert "ep_sgd" in {r.name for r in optiplug.list_optimizers()}
    monkeypatch.delenv("OPTIPLUG_LOAD_PLUGINS")
    monkeypatch.setenv("OPTIPLUG_DISABLE_PLUGINS", "ep_good")  # entry-point name works too
    reload_plugins()
    assert "ep_sgd" not in {r.name for r in optiplug.list_optimizers()}


def test_plugins_load_once_and_lazily(site_dir):
    _write_distribution(site_dir, "acme-good", "ep_good", GOOD_PLUGIN)
    reload_plugins()
    assert "ep_good" not in sys.modules  # nothing imported until a lookup
    optiplug.list_optimizers()
    module = sys.modules["ep_good"]
    optiplug.list_optimizers()
    optiplug.get_entry("ep_sgd")
    assert sys.modules["ep_good"] is module


def test_missing_dependency_names_the_package(temp_plugin, tmp_path):
    class NeedsConfig(optiplug.OptimizerConfig):
        name: Literal["needs_pkg"] = "needs_pkg"

    class Plugin:
        @optiplug.hookimpl
        def register_optimizers(self, register):
            register(optiplug.OptimizerEntry(config=NeedsConfig, build=build_demo, requires=("no-such-dist-xyz>=1.0",)))

    temp_plugin(Plugin(), "needs-plugin")
    from optiplug.testing import tiny_llama

    with pytest.raises(optiplug.MissingDependencyError) as info:
        optiplug.build_optimizer(tiny_llama(), "needs_pkg")
    assert str(info.value) == (
        "optimizer 'needs_pkg' needs the package 'no-such-dist-xyz', which is not installed: pip install 'no-such-dist-xyz>=1.0'"
    )


def test_import_error_inside_a_factory_becomes_a_clear_message(temp_plugin):
    class LazyConfig(optiplug.OptimizerConfig):
        name: Literal["lazy_missing"] = "lazy_missing"

    def build(ctx, cfg):
        import not_installed_module_xyz  # noqa: F401

    class Plugin:
        @optiplug.hookimpl
        def register_optimizers(self, register):
            register(optiplug.OptimizerEntry(config=LazyConfig, build=build))

    temp_plugin(Plugin(), "lazy-plugin")
    from optiplug.testing import tiny_llama

    with pytest.raises(
        optiplug.MissingDependencyError,
        match=r"optimizer 'lazy_missing' needs the module 'not_installed_module_xyz', which is not installed: pip install 'not_installed_module_xyz'",
    ):
        optiplug.build_optimizer(tiny_llama(), "lazy_missing")


# ---- aliases: other names for an entry, with preset fields ------------------------------------


class AliasedConfig(optiplug.OptimizerConfig):
    name: Literal["demo_momentum"] = "demo_momentum"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False


def build_aliased(ctx, cfg):
    import torch

    return torch.optim.SGD(ctx.param_groups(0.0), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


ALIASES = (
    optiplug.Alias("demo_heavy_ball", {"momentum": 0.99}, summary="heavy ball"),
    optiplug.Alias("demo_nag", {"nesterov": True}),
    optiplug.Alias("demo_momentum", {"momentum": 0.0}, transformers=True),  # transformers' meaning of the name
    optiplug.Alias("demo_sgd_hf", {"momentum": 0.0}, transformers=True),
)


def aliased_plugin(aliases=ALIASES, config=AliasedConfig):
    class Plugin:
        @optiplug.hookimpl
        def register_optimizers(self, register):
            register(optiplug.OptimizerEntry(config=config, build=build_aliased, summary="demo", aliases=aliases))

    return Plugin()


def test_an_alias_selects_its_entry_with_the_preset_and_the_canonical_name(temp_plugin):
    temp_plugin(aliased_plugin(), "aliased")
    cfg = optiplug.parse_optimizer("demo_heavy_ball")
    assert type(cfg) is AliasedConfig and cfg.name == "demo_momentum" and cfg.momentum == 0.99
    assert optiplug.parse_optimizer({"name": "demo_nag", "lr": 0.5}) == AliasedConfig(nesterov=True, lr=0.5)
    assert optiplug.parse_optimizer("demo_heavy_ball", momentum=0.99).momentum == 0.99  # agreeing is fine
    assert optiplug.get_entry("demo_nag") is optiplug.get_entry("demo_momentum")
    from optiplug.testing import tiny_llama

    optimizer = optiplug.build_optimizer(tiny_llama(), "demo_heavy_ball")
    assert {group["momentum"] for group in optimizer.param_groups} == {0.99}


def test_a_value_contradicting_the_preset_is_one_clear_error(temp_plugin):
    temp_plugin(aliased_plugin(), "aliased")
    with pytest.raises(optiplug.ConfigError) as info:
        optiplug.parse_optimizer({"name": "demo_heavy_ball", "momentum": 0.5})
    assert str(info.value) == (
        "optimizer.momentum: 'demo_heavy_ball' is 'demo_momentum' with momentum=0.99, but momentum=0.5 is given: "
        "drop momentum, or select 'demo_momentum' with momentum=0.5"
    )


def test_transformers_names_look_at_transformers_aliases_first(temp_plugin):
    from optiplug.registry import registry, resolve

    temp_plugin(aliased_plugin(), "aliased")
    assert optiplug.parse_optimizer("demo_momentum").momentum == 0.9  # a config's name: the canonical entry
    found = resolve("optimizer", "demo_momentum", transformers=True)
    assert found.row.name == "demo_momentum" and dict(found.preset) == {"momentum": 0.0}
    assert registry.parse("optimizer", "demo_momentum", transformers=True).momentum == 0.0
    # a transformers alias no canonical name shadows is a config name too; a plain alias is found on that route
    assert optiplug.parse_optimizer("demo_sgd_hf").momentum == 0.0
    assert registry.parse("optimizer", "demo_nag", transformers=True).nesterov is True
    assert resolve("optimizer", "adamw", transformers=True).alias is None


def test_unknown_names_suggest_aliases_too(temp_plugin):
    temp_plugin(aliased_plugin(), "aliased")
    with pytest.raises(optiplug.UnknownNameError, match=r"Did you mean 'demo_heavy_ball'"):
        optiplug.parse_optimizer("demo_heavy_bal")


class OtherConfig(optiplug.OptimizerConfig):
    name: Literal["demo_heavy_ball"] = "demo_heavy_ball"


def test_an_alias_colliding_with_another_plugins_name_follows_the_duplicate_rule(temp_plugin):
    temp_plugin(aliased_plugin(), "aliased")
    temp_plugin(make_plugin(OtherConfig), "other")
    with pytest.warns(RuntimeWarning, match="'demo_heavy_ball' is registered twice"):
        names = {r.name for r in optiplug.list_optimizers()}
    assert "demo_heavy_ball" not in names and "demo_momentum" in names
    with pytest.raises(optiplug.DuplicateNameError) as info:
        optiplug.parse_optimizer("demo_heavy_ball")
    assert str(info.value) == (
        "optimizer 'demo_heavy_ball' is registered twice, by plugins 'other' and 'aliased' (an alias of "
        "'demo_momentum'): uninstall one"
    )
    assert optiplug.parse_optimizer("demo_nag").nesterov is True  # every other name keeps working


def test_two_plugins_giving_one_alias_make_it_unusable(temp_plugin):
    class TwinConfig(optiplug.OptimizerConfig):
        name: Literal["demo_twin"] = "demo_twin"
        momentum: float = 0.0

    temp_plugin(aliased_plugin(), "aliased")
    temp_plugin(aliased_plugin(aliases=(optiplug.Alias("demo_nag", {"momentum": 0.5}),), config=TwinConfig), "twin")
    with (
        pytest.warns(RuntimeWarning, match="'demo_nag' is registered twice"),
        pytest.raises(optiplug.DuplicateNameError),
    ):
        optiplug.parse_optimizer("demo_nag")
    assert optiplug.parse_optimizer("demo_heavy_ball").momentum == 0.99


def test_aliases_are_checked_where_the_plugin_declares_them(temp_plugin):
    with pytest.raises(optiplug.PluginError, match=r"alias 'x': preset cannot set 'name'"):
        optiplug.Alias("x", {"name": "y"})
    with pytest.raises(optiplug.PluginError, match=r"aliases must be optiplug.Alias objects, got 'x'"):
        optiplug.OptimizerEntry(config=AliasedConfig, build=build_aliased, aliases=("x",))
    with pytest.raises(optiplug.PluginError, match=r"an alias cannot repeat the entry's own name"):
        optiplug.OptimizerEntry(config=AliasedConfig, build=build_aliased, aliases=(optiplug.Alias("demo_momentum"),))
    temp_plugin(aliased_plugin(aliases=(optiplug.Alias("demo_typo", {"momentun": 0.5}),)), "typo-preset")
    with pytest.raises(optiplug.PluginError) as info:
        optiplug.parse_optimizer("demo_typo")
    assert str(info.value) == (
        "optimizer alias 'demo_typo' (plugin 'typo-preset') presets momentun, which 'demo_momentum' does not have; "
        "report it to the plugin's authors"
    )


def test_scheduler_aliases(temp_plugin):
    class Plugin:
        @optiplug.hookimpl
        def register_schedulers(self, register):
            from optiplug.builtin.schedulers import CosineWithMinLrConfig, build_cosine_with_min_lr

            class DemoFloor(CosineWithMinLrConfig):
                name: Literal["demo_floor"] = "demo_floor"  # type: ignore[assignment]

            alias = optiplug.Alias("demo_floor_half", {"min_lr_rate": 0.5}, transformers=True)
            register(optiplug.SchedulerEntry(config=DemoFloor, build=build_cosine_with_min_lr, aliases=(alias,)))

    temp_plugin(Plugin(), "floor")
    cfg = optiplug.parse_scheduler("demo_floor_half", warmup_steps=2)
    assert (cfg.name, cfg.min_lr_rate, cfg.warmup_steps) == ("demo_floor", 0.5, 2)


# ---- hooks are called through pluggy; a plugin whose hook fails contributes nothing -----------


class DemoSchedulerConfig(optiplug.SchedulerConfig):
    name: Literal["demo_sched"] = "demo_sched"


def test_a_plugin_whose_other_register_hook_raises_contributes_nothing(temp_plugin):
    class HalfBroken:
        @optiplug.hookimpl
        def register_optimizers(self, register):
            register(optiplug.OptimizerEntry(config=DemoConfig, build=build_demo))

        @optiplug.hookimpl
        def register_schedulers(self, register):
            raise RuntimeError("no schedulers today")

        @optiplug.hookimpl
        def trainer_callbacks(self, trainer, config):
            raise AssertionError("a left-out plugin's hooks must not run")

    temp_plugin(HalfBroken(), "half-broken")
    with pytest.warns(RuntimeWarning, match="plugin 'half-broken' was left out"):
        names = {r.name for r in optiplug.list_optimizers()}
    assert "demo_sched" not in {r.name for r in optiplug.list_schedulers()}
    assert "demo_sgd" not in names and "adamw" in names  # its optimizer hook worked, but the plugin is out
    assert "half-broken" not in {p.name for p in optiplug.registry.loaded_plugins()}
    pm = optiplug.registry.get_plugin_manager()
    assert all(impl.plugin_name != "half-broken" for impl in pm.hook.trainer_callbacks.get_hookimpls())
    causes = {f.name: f.cause for f in plugin_failures()}
    assert causes["half-broken"] == "register_schedulers raised RuntimeError: no schedulers today"


def test_a_wrapper_hook_implementation_registers_through_pluggy(temp_plugin):
    class Wrapping:
        @optiplug.hookimpl(wrapper=True)
        def register_optimizers(self, register):
            register(optiplug.OptimizerEntry(config=DemoConfig, build=build_demo, summary="wrapped"))
            return (yield)

    temp_plugin(Wrapping(), "wrapping")
    assert optiplug.get_entry("demo_sgd").summary == "wrapped"


def test_tryfirst_and_trylast_hooks_run_in_pluggys_order(temp_plugin):
    calls: list[str] = []

    def plugin(label, **marks):
        class Plugin:
            @optiplug.hookimpl(**marks)
            def register_schedulers(self, register):
                calls.append(label)

        return Plugin()

    temp_plugin(plugin("last", trylast=True), "p-last")
    temp_plugin(plugin("first", tryfirst=True), "p-first")
    temp_plugin(plugin("plain"), "p-plain")
    optiplug.list_schedulers()
    assert calls == ["first", "plain", "last"]


def test_the_default_plugin_is_registered_like_any_other():
    info = {p.name: p for p in optiplug.registry.loaded_plugins()}
    assert info["optiplug:optimizers"].distribution == "optiplug"
    assert info["optiplug:optimizers"].hooks == ("register_optimizers",)
    assert list(info)[:3] == ["optiplug:optimizers", "optiplug:schedulers", "optiplug:transformers"]


def test_a_snapshot_being_read_is_never_changed(temp_plugin):
    from optiplug.registry import registry

    before = registry._snapshot()
    temp_plugin(make_plugin(), "demo-plugin")
    assert "demo_sgd" not in before.rows["optimizer"]  # a reader holding the old snapshot sees it whole
    assert "demo_sgd" in registry._snapshot().rows["optimizer"]


def test_a_lazy_config_is_built_when_first_read_and_checked(temp_plugin):
    built: list[str] = []

    def load():
        built.append("demo_sgd")
        return DemoConfig

    class Lazy:
        @optiplug.hookimpl
        def register_optimizers(self, register):
            register(optiplug.OptimizerEntry(config=optiplug.LazyConfig("demo_sgd", load), build=build_demo))
            register(optiplug.OptimizerEntry(config=optiplug.LazyConfig("demo_wrong", load), build=build_demo))

    temp_plugin(Lazy(), "lazy")
    assert {"demo_sgd", "demo_wrong"} <= {r.name for r in optiplug.list_optimizers()} and built == []
    assert optiplug.parse_optimizer("demo_sgd", lr=0.5) == DemoConfig(lr=0.5) and built == ["demo_sgd"]
    with pytest.raises(optiplug.PluginError) as info:
        optiplug.parse_optimizer("demo_wrong")
    assert str(info.value) == (
        "optimizer 'demo_wrong': its LazyConfig loaded DemoConfig, whose name is 'demo_sgd'; "
        "report it to the plugin's authors"
    )


def test_a_lazy_config_from_a_module_imports_the_module_when_first_read(temp_plugin, tmp_path, monkeypatch):
    (tmp_path / "lazy_demo_configs.py").write_text(
        textwrap.dedent(
            """
            from typing import Literal
            import optiplug

            class LazyDemoConfig(optiplug.OptimizerConfig):
                name: Literal["lazy_demo"] = "lazy_demo"
                lr: float = 0.1
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_demo_configs", raising=False)

    class Lazy:
        @optiplug.hookimpl
        def register_optimizers(self, register):
            config = optiplug.LazyConfig.from_module("lazy_demo", "lazy_demo_configs:LazyDemoConfig")
            register(optiplug.OptimizerEntry(config=config, build=build_demo))

    temp_plugin(Lazy(), "lazy")
    assert "lazy_demo" in {r.name for r in optiplug.list_optimizers()} and "lazy_demo_configs" not in sys.modules
    config = optiplug.parse_optimizer("lazy_demo", lr=0.5)
    assert type(config) is sys.modules["lazy_demo_configs"].LazyDemoConfig and config.lr == 0.5
    with pytest.raises(optiplug.PluginError, match="the path must be 'module:ClassName', got 'lazy_demo_configs'"):
        optiplug.LazyConfig.from_module("lazy_demo", "lazy_demo_configs")


def test_lazy_attributes_gives_the_named_attributes_of_a_module_imported_on_first_use(tmp_path, monkeypatch):
    (tmp_path / "lazy_demo_attributes.py").write_text("VALUE = 42\nOTHER = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_demo_attributes", raising=False)
    getattr_ = optiplug.lazy_attributes("demo_package", "lazy_demo_attributes", ["VALUE"])
    assert "lazy_demo_attributes" not in sys.modules
    assert getattr_("VALUE") == 42 and "lazy_demo_attributes" in sys.modules
    with pytest.raises(AttributeError, match="module 'demo_package' has no attribute 'OTHER'"):
        getattr_("OTHER")  # only the names given
