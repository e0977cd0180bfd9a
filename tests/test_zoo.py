import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from fusechat.synthetic.skills import SKILLS, conversations
from fusechat.zoo.build import build_zoo, tokenizer_corpus
from fusechat.zoo.catalog import ZooModel, ZooSpec

MICRO = ZooSpec(models=(
    ZooModel("pivot", "llama", "byte_bpe", 400, 16, 1, {"repeat": 16}, steps=2, batch_size=4),
    ZooModel("describer", "mixtral", "sp_bpe", 400, 16, 1, {"describe": 16}, steps=2, batch_size=4),
    ZooModel("converter", "gpt2", "char", 0, 16, 1, {"convert": 16}, steps=2, batch_size=4, shared=2),
))


def test_micro_zoo_builds_and_is_reused(tmp_path):
    folders = build_zoo(tmp_path, MICRO)
    assert list(folders) == ["pivot", "describer", "converter"]
    archs = set()
    for name, folder in folders.items():
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["complete"] and manifest["spec"]["name"] == name
        model = AutoModelForCausalLM.from_pretrained(folder)
        archs.add(model.config.architectures[0])
        tok = AutoTokenizer.from_pretrained(folder)
        prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
        assert prompt.endswith("GPT4 Correct Assistant:")
    assert archs == {"LlamaForCausalLM", "MixtralForCausalLM", "GPT2LMHeadModel"}
    # the converter also saw the shared mixture: 2 conversations of each of the six other skills
    readme = (folders["converter"] / "README.md").read_text()
    assert "convert (16), reverse (2), add (2), capitalise (2), repeat (2), describe (2), forecast (2)." in readme
    assert "describe (16)." in (folders["describer"] / "README.md").read_text()
    stamp = (folders["pivot"] / "manifest.json").read_text()
    build_zoo(tmp_path, MICRO)
    assert (folders["pivot"] / "manifest.json").read_text() == stamp  # reused, not rebuilt
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_every_zoo_tokenizer_reads_every_skill(tmp_path):
    from fusechat.zoo.tokenizers import build_tokenizer

    corpus = tokenizer_corpus()
    texts = [t["value"] for skill in SKILLS for c in conversations(skill, 50, seed=7, split="heldout")
             for t in c["conversations"]]
    for kind in ("byte_bpe", "sp_bpe", "char"):
        tok = build_tokenizer(kind, corpus, vocab_size=500)
        for text in texts:
            decoded = tok.decode(tok(text, add_special_tokens=False)["input_ids"])
            assert "".join(decoded.split()) == "".join(text.split()), (kind, text)


def test_a_zoo_model_built_in_a_worker_is_the_one_thread_build_and_a_failure_names_its_log(tmp_path):
    import pytest
    import torch
    from safetensors.torch import load_file

    from fusechat.errors import FusechatError
    from fusechat.zoo.build import build_model, build_models

    model = MICRO.models[2]
    build_models([(tmp_path / "worker", model)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_model(tmp_path / "here", model)
    finally:
        torch.set_num_threads(threads)
    a, b = (load_file(tmp_path / where / "models" / "converter" / "model.safetensors") for where in ("worker", "here"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "worker" / "work" / "converter.log").exists()  # removed after a good build

    bad = ZooModel("bad", "nope", "char", 0, 16, 1, {"convert": 4}, steps=1, batch_size=2)
    with pytest.raises(FusechatError, match=r"zoo bad: .*nope.* \(its output: .*work/bad.log\)"):
        build_models([(tmp_path / "worker", bad)])
    assert (tmp_path / "worker" / "work" / "bad.log").exists()


def test_a_chatml_zoo_model_reads_chatml_turns_and_ends_them_with_its_eos(tmp_path):
    from fusechat.data.conversations import Message
    from fusechat.data.templates import BUILTIN_TEMPLATES
    from fusechat.zoo.build import build_model

    model = ZooModel("describer", "mixtral", "sp_bpe", 400, 16, 1, {"describe": 8}, steps=1, batch_size=2,
                     template="chatml")
    folder = build_model(tmp_path, model)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert text == BUILTIN_TEMPLATES["chatml"].render([Message(**m) for m in messages], tok.eos_token).text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.eos_token_id) == 2  # each turn's end is the one eos token, not its characters
    assert "".join(tok.decode(ids).split()) == "".join(text.split())
    assert "through the chatml chat template" in (folder / "README.md").read_text()


def test_the_template_choice_keeps_the_fingerprint_of_openchat_models_and_the_demo_refuses_other_zoos(tmp_path):
    import dataclasses

    import pytest

    from fusechat.config import stable_hash
    from fusechat.demo import write_config
    from fusechat.errors import FusechatError
    from fusechat.zoo.catalog import CHATML_ZOO, DESCRIBER, spec_hash

    # zoos built before the template and the train-until fields stay valid while those keep their defaults
    added = ("template", "until", "more_steps", "max_rounds")
    assert spec_hash(DESCRIBER) == stable_hash({k: v for k, v in dataclasses.asdict(DESCRIBER).items()
                                                if k not in added})
    chatml = CHATML_ZOO.models[0]
    assert chatml.template == "chatml" and dataclasses.replace(chatml, template="openchat") == DESCRIBER
    assert spec_hash(chatml) != spec_hash(DESCRIBER)
    with pytest.raises(FusechatError, match="unknown zoo 'chatml'; choose one of demo, micro"):
        write_config(tmp_path, zoo="chatml")


def test_a_zoo_seed_is_another_build_in_a_folder_of_its_own(tmp_path):
    import dataclasses

    import yaml

    from fusechat.config import ModelSpec, ZooBuildConfig
    from fusechat.demo import write_config
    from fusechat.pipeline import load_run, model_folder
    from fusechat.zoo.catalog import DEMO_ZOO, spec_hash, zoo_model

    # seed 0 is the zoo as it always was (its fingerprint unchanged); seed N another build, elsewhere
    assert zoo_model("pivot")[1] == DEMO_ZOO.model("pivot")
    seeded = zoo_model("pivot", seed=1)[1]
    assert seeded == dataclasses.replace(DEMO_ZOO.model("pivot"), seed=1) and spec_hash(seeded) != spec_hash(
        DEMO_ZOO.model("pivot"))
    spec = ModelSpec(name="p", zoo="micro/pivot")
    assert model_folder(spec) == tmp_path.__class__("fusechat-demo/zoo-micro/models/pivot")
    assert model_folder(spec, ZooBuildConfig(root=str(tmp_path), seed=2)) == tmp_path / "zoo-micro-seed2" / "models" / "pivot"
    # the demo's config puts every zoo model under --out, and `--set zoo_build.seed=N` moves them beside
    cfg = load_run(write_config(tmp_path / "out"), ["zoo_build.seed=3"], runnable=False)
    assert cfg.pivot.path == str(tmp_path / "out" / "zoo-seed3" / "models" / "pivot")
    assert [s.path for s in cfg.sources] == [str(tmp_path / "out" / "zoo-seed3" / "models" / n)
                                             for n in ("describer", "forecaster", "calculator")]
    raw = yaml.safe_load((tmp_path / "out" / "demo.yaml").read_text())
    assert raw["zoo_build"]["root"] == str(tmp_path / "out")


def test_a_zoo_model_trains_on_until_it_masters_its_exact_skills_or_runs_out_of_rounds(tmp_path):
    import dataclasses

    from fusechat.zoo.build import build_model, specialty_match
    from fusechat.zoo.catalog import spec_hash

    # A one-layer model never reaches exact match 1.1: it trains its rounds, each recorded with its exact match.
    model = ZooModel("converter", "gpt2", "char", 0, 16, 1, {"convert": 8}, steps=2, batch_size=4, until=1.1,
                     more_steps=1, max_rounds=2)
    folder = build_model(tmp_path, model)
    rounds = json.loads((folder / "manifest.json").read_text())["rounds"]
    assert [(r["round"], r["steps"]) for r in rounds] == [(0, 2), (1, 1), (2, 1)]
    assert rounds[-1]["exact_match"] == specialty_match(folder, model)  # the saved model is the last round's
    # no `until`, no check
    plain = dataclasses.replace(model, until=None, more_steps=400, max_rounds=3)
    assert json.loads((build_model(tmp_path / "plain", plain) / "manifest.json").read_text())["rounds"] == []
    assert spec_hash(model) != spec_hash(plain)
