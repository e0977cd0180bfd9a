import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from fusechat.zoo.build import ZooModel, ZooSpec, build_zoo, tokenizer_corpus
from fusechat.zoo.skills import SKILLS, conversations

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
