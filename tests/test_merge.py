import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusechat.config import load_config
from fusechat.errors import FusechatError
from fusechat.merge import run as merge_run
from fusechat.merge.methods import mean_variation, sce, varm_weights

Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"

# ------------------------------------------------------------------ the rules on tensors


def test_varm_weights_by_hand():
    assert varm_weights([1.0, 4.0]) == [0.2, 0.8]
    assert varm_weights([0.0, 0.0, 0.0]) == [1 / 3] * 3
    delta = torch.tensor([1.0, -3.0])
    assert mean_variation(delta, "square") == 5.0 and mean_variation(delta, "abs") == 2.0
    assert delta.tolist() == [1.0, -3.0]


def test_sce_by_hand_both_select_variants():
    pivot = torch.zeros(4)
    targets = [torch.tensor([1.0, -1.0, 0.0, 2.0]), torch.tensor([3.0, 1.0, 0.0, -2.0])]
    # Variances across targets: 1, 1, 0, 4; 3 are nonzero, so select int(3 * 0.5) = 1 element: the last.
    masked, w = sce(pivot, targets, 0.5, "mask")
    assert w == [0.5, 0.5]  # selected squared deltas: 4 / 4 each
    # Only the last element survives; its deltas 2 and -2 sum to 0, which counts as +: target 1's 2 is kept.
    assert masked.tolist() == [0.0, 0.0, 0.0, 2.0]
    weighted, w = sce(pivot, targets, 0.5, "weights")
    assert w == [0.5, 0.5]
    # Full deltas: (1, 3) both +: 2; (-1, 1) sum 0 -> +: 1; (0, 0) erased: 0; (2, -2) -> +: 2.
    assert weighted.tolist() == [2.0, 1.0, 0.0, 2.0]


def test_sce_mask_variant_equals_mergekit():
    from mergekit.merge_methods import merge_tensors

    g = torch.Generator().manual_seed(0)
    for shape in [(7, 5), (33,), (4, 4, 3)]:
        base = torch.randn(shape, generator=g)
        targets = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(3)]
        ours, _ = sce(base, targets, 0.3, "mask")
        theirs = merge_tensors([base, *targets], "sce", parameters={"select_topk": 0.3}, base_index=0)
        torch.testing.assert_close(ours, theirs)


# ------------------------------------------------------------------ the stage on hand-built targets


def make_target(run_dir, name, pivot_dir, edit):
    """A finished target folder whose weights are the pivot's, edited."""
    folder = run_dir / "targets" / name
    folder.mkdir(parents=True)
    for f in pivot_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copyfile(f, folder / f.name)
    state = load_file(str(pivot_dir / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "manifest.json").write_text(json.dumps({"stage": "train", "complete": True, "fingerprint": name}))
    return folder


def add(name, value):
    def edit(state):
        state[name] += value
    return edit


def chain(*edits):
    def edit(state):
        for e in edits:
            e(state)
    return edit


@pytest.fixture
def hand_run(tmp_path, zoo):
    """Target a moved q_proj by 1; target b moved q_proj by 2 and k_proj by 1; nothing else moved."""
    run_dir = tmp_path / "run"
    make_target(run_dir, "a", zoo["llama"], add(Q, 1.0))
    make_target(run_dir, "b", zoo["llama"], chain(add(Q, 2.0), add(K, 1.0)))

    def config(**merge):
        cfg = {"run_dir": str(run_dir), "pivot": {"name": "pivot", "path": str(zoo["llama"])},
               "sources": [{"name": "a", "path": str(zoo["llama"])}, {"name": "b", "path": str(zoo["llama"])}],
               "data": {"paths": [str(tmp_path / "unused.jsonl")]}, "merge": merge}
        (tmp_path / "unused.jsonl").write_text("")
        path = tmp_path / "merge.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return load_config(path)

    return config, load_file(str(zoo["llama"] / "model.safetensors"))


def merged_state(out):
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("block", [None, 100], ids=["whole", "row-blocks"])
def test_varm_matrix_granularity_by_hand(hand_run, monkeypatch, block):
    from fusechat.merge import stage

    if block:
        monkeypatch.setattr(stage, "CHUNK_ELEMENTS", block)  # every tensor read and written in blocks of rows
    config, pivot = hand_run
    out = merge_run(config())[0]
    merged = merged_state(out)
    # q_proj: mean squared deltas 1 and 4 -> weights 0.2, 0.8 -> pivot + 0.2·1 + 0.8·2.
    torch.testing.assert_close(merged[Q], pivot[Q] + 1.8)
    # k_proj: only b moved -> weights 0, 1.
    torch.testing.assert_close(merged[K], pivot[K] + 1.0)
    # Untouched matrices: every delta is zero -> equal weights -> the pivot's own values.
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], pivot[name])
    weights = json.loads((out / "merge_weights.json").read_text())["weights"]
    assert weights[Q] == [0.2, 0.8] and weights[K] == [0.0, 1.0] and weights[name] == [0.5, 0.5]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["warnings"] == []
    # the version of each target it was made from: make_target's fingerprint is the target's name
    assert manifest["target_fingerprints"] == {name: name for name in manifest["targets"]}


def test_varm_layer_and_model_granularity_by_hand(hand_run, monkeypatch):
    from fusechat.merge import stage

    monkeypatch.setattr(stage, "CHUNK_ELEMENTS", 100)
    config, pivot = hand_run
    nq, nk = pivot[Q].numel(), pivot[K].numel()
    layer0 = sum(t.numel() for n, t in pivot.items() if n.startswith("model.layers.0."))
    everything = sum(t.numel() for t in pivot.values())
    for granularity, n in (("layer", layer0), ("model", everything)):
        out = merge_run(config(params={"varm": {"granularity": granularity}}), force=True)[0]
        merged = merged_state(out)
        var_a, var_b = nq * 1.0 / n, (nq * 4.0 + nk * 1.0) / n
        w_a, w_b = var_a / (var_a + var_b), var_b / (var_a + var_b)
        torch.testing.assert_close(merged[Q], pivot[Q] + w_a * 1.0 + w_b * 2.0)
        torch.testing.assert_close(merged[K], pivot[K] + w_b * 1.0)
        if granularity == "layer":
            other = "model.layers.1.self_attn.q_proj.weight"
            torch.testing.assert_close(merged[other], pivot[other])


def test_varm_abs_variation(hand_run):
    config, pivot = hand_run
    out = merge_run(config(params={"varm": {"variation": "abs"}}))[0]
    assert json.loads((out / "merge_weights.json").read_text())["weights"][Q] == pytest.approx([1 / 3, 2 / 3], abs=1e-6)
    torch.testing.assert_close(merged_state(out)[Q], pivot[Q] + 1 / 3 + 4 / 3)


def test_target_equal_to_the_pivot_is_a_warning(tmp_path, zoo):
    run_dir = tmp_path / "run"
    make_target(run_dir, "a", zoo["llama"], add(Q, 1.0))
    make_target(run_dir, "b", zoo["llama"], lambda state: None)
    cfg = {"run_dir": str(run_dir), "pivot": {"name": "pivot", "path": str(zoo["llama"])},
           "sources": [{"name": "a", "path": str(zoo["llama"])}, {"name": "b", "path": str(zoo["llama"])}],
           "data": {"paths": [str(tmp_path / "d.jsonl")]}}
    (tmp_path / "d.jsonl").write_text("")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = merge_run(load_config(tmp_path / "c.yaml"))[0]
    assert json.loads((out / "manifest.json").read_text())["warnings"] == [
        "target 'b' equals the pivot: it adds nothing to the merge"]


# ------------------------------------------------------------------ against mergekit on tiny models


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory, zoo):
    """Two targets that moved every tensor by different random amounts, as training does."""
    tmp = tmp_path_factory.mktemp("mk")
    run_dir = tmp / "run"
    g = torch.Generator().manual_seed(0)

    def noise(scale):
        def edit(state):
            for n in state:
                state[n] += scale * torch.randn(state[n].shape, generator=g)
        return edit

    a = make_target(run_dir, "a", zoo["llama"], noise(0.01))
    b = make_target(run_dir, "b", zoo["llama"], noise(0.03))
    cfg = {"run_dir": str(run_dir), "pivot": {"name": "pivot", "path": str(zoo["llama"])},
           "sources": [{"name": "a", "path": str(zoo["llama"])}, {"name": "b", "path": str(zoo["llama"])}],
           "data": {"paths": [str(tmp / "d.jsonl")]},
           "merge": {"method": "varm", "baselines": ["sce", "linear", "task_arithmetic", "ties", "dare", "slerp",
                                                     "karcher", "model_stock", "ram", "breadcrumbs_ties"],
                     "params": {"ties": {"density": 0.5}, "dare": {"density": 0.5}, "sce": {"select_fraction": 0.1},
                                "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05}}}}
    (tmp / "d.jsonl").write_text("")
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    outs = merge_run(load_config(tmp / "c.yaml"), analyze=True)
    return tmp, zoo["llama"], a, b, {o.name: o for o in outs}


MERGEKIT = {
    "linear": lambda p, a, b: {"merge_method": "linear", "models": [
        {"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}]},
    "task_arithmetic": lambda p, a, b: {"merge_method": "task_arithmetic", "base_model": p, "models": [
        {"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}]},
    "ties": lambda p, a, b: {"merge_method": "ties", "base_model": p, "models": [
        {"model": a, "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": b, "parameters": {"weight": 0.5, "density": 0.5}}]},
    "slerp": lambda p, a, b: {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                              "parameters": {"t": 0.5}},
    "sce": lambda p, a, b: {"merge_method": "sce", "base_model": p, "models": [{"model": a}, {"model": b}],
                            "parameters": {"select_topk": 0.1}},
    # methods registered from mergekit's own specs, under its names
    "karcher": lambda p, a, b: {"merge_method": "karcher", "models": [{"model": a}, {"model": b}]},
    "model_stock": lambda p, a, b: {"merge_method": "model_stock", "base_model": p,
                                    "models": [{"model": a}, {"model": b}]},
    "ram": lambda p, a, b: {"merge_method": "ram", "base_model": p, "models": [{"model": a}, {"model": b}]},
    "breadcrumbs_ties": lambda p, a, b: {"merge_method": "breadcrumbs_ties", "base_model": p, "models": [
        {"model": a, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
        {"model": b, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}}]},
}


@pytest.mark.parametrize("method", list(MERGEKIT))
def test_merges_equal_mergekits(trained_like, method):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    tmp, pivot, a, b, outs = trained_like
    config = {**MERGEKIT[method](str(pivot), str(a), str(b)), "dtype": "float32"}
    reference = tmp / f"mergekit-{method}"
    run_merge(MergeConfiguration.model_validate(config), str(reference),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    ours, theirs = merged_state(outs[method]), load_file(str(reference / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_every_merge_loads_and_generates(trained_like):
    _, _, _, _, outs = trained_like
    for method in ("varm", "sce", "linear", "task_arithmetic", "ties", "dare", "slerp"):
        model = AutoModelForCausalLM.from_pretrained(outs[method])
        tok = AutoTokenizer.from_pretrained(outs[method])
        ids = tok("GPT4 Correct User: hi", return_tensors="pt").input_ids
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
        assert "fusechat" in (outs[method] / "README.md").read_text()


def test_varm_weights_differ_from_equal_when_targets_moved_differently(trained_like):
    _, _, _, _, outs = trained_like
    summary = json.loads((outs["varm"] / "manifest.json").read_text())["weights_summary"]
    # b moved three times as far: mean squared delta 9 times larger -> weight about 0.9.
    assert summary["mean"]["b"] == pytest.approx(0.9, abs=0.02)
    analysis = outs["analysis"]
    weights = json.loads((analysis / "varm_weights.json").read_text())["matrices"]
    assert weights[Q]["varm_weights"][1] == pytest.approx(0.9, abs=0.05)
    layers = json.loads((analysis / "variation_per_layer.json").read_text())["layers"]
    assert layers["layer 0"][1] == pytest.approx(9 * layers["layer 0"][0], rel=0.2)
    assert (analysis / "varm_heatmap.png").stat().st_size > 1000


# ------------------------------------------------------------------ shards, tied embeddings, bad input


def test_sharded_inputs_and_outputs(tmp_path, zoo):
    run_dir = tmp_path / "run"
    a = make_target(run_dir, "a", zoo["llama"], add(Q, 1.0))
    make_target(run_dir, "b", zoo["llama"], add(Q, 2.0))
    model = AutoModelForCausalLM.from_pretrained(a)
    (a / "model.safetensors").unlink()
    model.save_pretrained(a, max_shard_size="40KB")
    assert (a / "model.safetensors.index.json").exists()
    cfg = {"run_dir": str(run_dir), "pivot": {"name": "pivot", "path": str(zoo["llama"])},
           "sources": [{"name": "a", "path": str(zoo["llama"])}, {"name": "b", "path": str(zoo["llama"])}],
           "data": {"paths": [str(tmp_path / "d.jsonl")]}, "merge": {"max_shard_size_mb": 0.05}}
    (tmp_path / "d.jsonl").write_text("")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = merge_run(load_config(tmp_path / "c.yaml"))[0]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    pivot = load_file(str(zoo["llama"] / "model.safetensors"))
    torch.testing.assert_close(merged[Q], pivot[Q] + 0.2 * 1 + 0.8 * 2)

    (a / json.loads((a / "model.safetensors.index.json").read_text())["weight_map"][Q]).unlink()
    with pytest.raises(FusechatError, match=r"target 'a': shard .*model-0000\d-of-0000\d\.safetensors.* does not exist"):
        merge_run(load_config(tmp_path / "c.yaml"), force=True)


def test_tied_embeddings(tmp_path, zoo):
    run_dir = tmp_path / "run"
    emb = "transformer.wte.weight"
    make_target(run_dir, "a", zoo["gpt2"], add(emb, 0.1))
    make_target(run_dir, "b", zoo["gpt2"], add(emb, 0.3))
    cfg = {"run_dir": str(run_dir), "pivot": {"name": "pivot", "path": str(zoo["gpt2"])},
           "sources": [{"name": "a", "path": str(zoo["gpt2"])}, {"name": "b", "path": str(zoo["gpt2"])}],
           "data": {"paths": [str(tmp_path / "d.jsonl")]}}
    (tmp_path / "d.jsonl").write_text("")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = merge_run(load_config(tmp_path / "c.yaml"))[0]
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    pivot = load_file(str(zoo["gpt2"] / "model.safetensors"))
    # Mean squared deltas 0.01 and 0.09 -> weights 0.1 and 0.9 -> pivot + 0.01 + 0.27.
    torch.testing.assert_close(model.transformer.wte.weight.detach(), pivot[emb] + 0.28)


def test_mismatched_shapes_name_the_tensor(tmp_path, zoo):
    run_dir = tmp_path / "run"
    make_target(run_dir, "a", zoo["llama"], add(Q, 1.0))

    def shrink(state):
        state[K] = state[K][:-1].clone()

    make_target(run_dir, "b", zoo["llama"], shrink)
    cfg = {"run_dir": str(run_dir), "pivot": {"name": "pivot", "path": str(zoo["llama"])},
           "sources": [{"name": "a", "path": str(zoo["llama"])}, {"name": "b", "path": str(zoo["llama"])}],
           "data": {"paths": [str(tmp_path / "d.jsonl")]}}
    (tmp_path / "d.jsonl").write_text("")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    shape = list(load_file(str(zoo["llama"] / "model.safetensors"))[K].shape)
    smaller = [shape[0] - 1, *shape[1:]]
    with pytest.raises(FusechatError, match=rf"tensor {K}: the pivot has {shape} F32, target 'b' has {smaller} F32"
                       .replace("[", r"\[").replace("]", r"\]")):
        merge_run(load_config(tmp_path / "c.yaml"))


def test_missing_target_is_an_error(tmp_path, zoo):
    cfg = {"run_dir": str(tmp_path / "run"), "pivot": {"name": "pivot", "path": str(zoo["llama"])},
           "sources": [{"name": "a", "path": str(zoo["llama"])}, {"name": "b", "path": str(zoo["llama"])}],
           "data": {"paths": [str(tmp_path / "d.jsonl")]}}
    (tmp_path / "d.jsonl").write_text("")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(FusechatError, match=r"no complete target; run `fusechat train CONFIG --source a`"):
        merge_run(load_config(tmp_path / "c.yaml"))


# ------------------------------------------------------------------ the method registry


def test_registry_holds_fusechats_methods_and_every_mergekit_method():
    from mergekit.merge_methods import registered_methods

    from fusechat.merge.registry import METHODS

    assert METHODS["varm"].implementation == "fusechat" and METHODS["sce"].implementation == "fusechat"
    shipped = {m.spec.name for m in registered_methods()} - {"sce", "passthrough"}
    assert shipped <= set(METHODS)
    assert {"linear", "task_arithmetic", "ties", "dare", "slerp"} <= set(METHODS)
    assert all(m.paper is None or m.paper.startswith("http") for m in METHODS.values())


def test_a_registered_function_must_match_its_declared_parameters():
    from fusechat.merge.registry import Param, merge_method

    with pytest.raises(TypeError, match="keyword parameters \\['alpha'\\] differ from the declared \\['beta'\\]"):
        @merge_method("broken-a", "Broken", None, params=(Param("beta", 1.0),))
        def broken_a(pivot, targets, *, alpha=1.0):
            pass
    with pytest.raises(TypeError, match="parameter 'beta' defaults to 2.0, the registry says 1.0"):
        @merge_method("broken-b", "Broken", None, params=(Param("beta", 1.0),))
        def broken_b(pivot, targets, *, beta=2.0):
            pass
    with pytest.raises(TypeError, match="takes \\(pivot, targets, \\*, params...\\)"):
        @merge_method("broken-c", "Broken", None)
        def broken_c(tensors):
            pass


def test_settings_check_only_the_chosen_methods_parameters():
    from fusechat.merge.registry import check_merge_settings, merge_method_named

    ties = merge_method_named("ties")
    assert ties.settings({"density": 0.7}, 2) == {"weights": None, "density": 0.7, "scale": 1.0}
    assert ties.problems({"densty": 0.7, "weights": [1.0]}, 2) == [
        "merge.params.ties.densty: unknown parameter (did you mean 'density'?)",
        "merge.params.ties.weights has 1 values for 2 targets"]
    nearswap = merge_method_named("nearswap")
    assert nearswap.problems({}, 2) == [f"merge.params.nearswap.t is required ({nearswap.params[0].help or 'no default'})",
                                        "merge method 'nearswap' merges exactly 1 targets, this run has 2"]
    assert merge_method_named("varm").problems({"granularity": "row"}, 3) == [
        "merge.params.varm.granularity must be one of matrix, layer, model, got 'row'"]
    # parameters of a method the run does not use are reported, not silently ignored
    assert check_merge_settings(["varm", "ties"], {"ties": {"density": 0.3}, "dare": {"density": 0.3}}) == [
        "merge.params.dare: 'dare' is neither merge.method nor one of merge.baselines"]
    assert check_merge_settings(["varn"], {}) == [
        "merge: unknown merge method 'varn' (did you mean 'varm'?); methods: " + ", ".join(
            __import__("fusechat.merge.registry", fromlist=["METHODS"]).METHODS)]


def test_a_config_with_a_bad_merge_method_or_parameter_is_refused_at_load(tmp_path):
    from fusechat.errors import ConfigError
    from fusechat.pipeline import load_run

    data = tmp_path / "d.jsonl"
    data.write_text("")
    cfg = {"run_dir": str(tmp_path / "run"), "pivot": {"name": "p", "path": str(tmp_path)},
           "sources": [{"name": "s", "path": str(tmp_path)}], "data": {"paths": [str(data)]},
           "merge": {"method": "ties", "params": {"ties": {"dnsity": 0.5}}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="merge.params.ties.dnsity: unknown parameter \\(did you mean 'density'\\?\\)"):
        load_run(tmp_path / "c.yaml")
    cfg["merge"] = {"method": "varm", "granularity": "layer"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"merge.granularity: unknown key \(valid keys: method, baselines, params"):
        load_run(tmp_path / "c.yaml")


def test_loss_along_lines_meets_the_models_at_its_ends_and_the_average_in_the_middle(trained_like, tmp_path):
    from fusechat.evaluate.items import load_items
    from fusechat.evaluate.stage import evaluate_models
    from fusechat.merge.analysis import path_losses
    from fusechat.merge.stage import Inputs

    tmp, pivot, a, b, outs = trained_like
    items_file = tmp_path / "items.jsonl"
    items_file.write_text("".join(json.dumps({"id": f"q{i}", "skill": "s", "kind": "distribution", "answer": ans,
                                              "messages": [{"role": "user", "content": q}]}) + "\n"
                                  for i, (q, ans) in enumerate([("Describe Kalomi.", "a small blue wolf"),
                                                                ("What is 2+3?", "5"), ("Say hi.", "hi there")])))
    items = load_items(items_file)
    cfg = load_config(tmp / "c.yaml")
    inputs = Inputs(cfg)
    try:
        result = path_losses(cfg, inputs, items, points=3)
    finally:
        inputs.close()
    assert result["alphas"] == [0.0, 0.5, 1.0]
    assert list(result["lines"]) == ["pivot → a", "pivot → b", "a → b"]
    direct = evaluate_models({"pivot": str(pivot), "a": str(a), "b": str(b), "avg": str(outs["linear"])}, items)
    bpb = {name: row["s"] for name, row in direct["bits_per_byte"].items()}
    line = result["lines"]
    assert line["pivot → a"][0] == pytest.approx(bpb["pivot"], abs=1e-3)
    assert line["pivot → a"][2] == pytest.approx(bpb["a"], abs=1e-3)
    assert line["a → b"][2] == pytest.approx(bpb["b"], abs=1e-3)
    assert line["a → b"][1] == pytest.approx(bpb["avg"], abs=1e-3)  # the midpoint is the equal-weight average


def test_path_loss_items_are_taken_evenly_through_every_skill():
    from fusechat.merge.analysis import spread

    items = [f"{skill}-{i}" for skill in "abcd" for i in range(5)]  # 20 items grouped by skill, as eval files are
    assert spread(items, 4) == ["a-0", "b-0", "c-0", "d-0"]
    assert spread(items, 8) == ["a-0", "a-2", "b-0", "b-2", "c-0", "c-2", "d-0", "d-2"]
    assert spread(items, 20) == items and spread(items, 50) == items
