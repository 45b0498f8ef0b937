"""``load_tokenizer`` (``tokenizers``-based) against ``transformers``' fast tokenizer on the same files."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from hf_models import transformers

from bagualu.models import ModelLoadError, load_tokenizer
from bagualu.models.byte_tokenizer import byte_level_tokenizer

pytestmark = pytest.mark.unit

TEXTS = ["Hello world", "  héllo\n\tworld 八卦炉 <|eot|>", "", "def f(x):\n    return x ** 2  # square"]
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "<|start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi 八卦炉"}]


def _trained_bpe(tmp_path):
    """A byte-level BPE trained by ``tokenizers`` on the standard library's own text, Llama-3 style."""
    import inspect
    import json as json_mod

    corpus = [inspect.getsource(json_mod), inspect.getsource(pytest)]
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|bos|>", "<|eot|>", "<|start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
           "eos_token": "<|eot|>", "chat_template": LLAMA3_STYLE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_encode_decode_and_chat_match_transformers(tmp_path, kind):
    if kind == "byte":
        byte_level_tokenizer().save(tmp_path)
    else:
        _trained_bpe(tmp_path)
    ours = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_id == hf.eos_token_id and ours.bos_token_id == hf.bos_token_id
    for gen in (True, False):
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == hf.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=gen)
    hf_ids = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert ours.apply_chat_template(MESSAGES, tokenize=True) == list(hf_ids)


def test_template_from_chat_template_jinja_and_raise_exception(tmp_path):
    _trained_bpe(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    template = cfg.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(tmp_path).chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(tmp_path).apply_chat_template(MESSAGES)
    (tmp_path / "chat_template.jinja").write_text(template)
    tok = load_tokenizer(tmp_path)
    assert tok.apply_chat_template(MESSAGES).startswith("<|bos|><|start|>system\nBe brief.<|eot|>")
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="bad role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_added_token_dict_form(tmp_path):
    """Older checkpoints store special tokens as AddedToken dicts; transformers 5 no longer reads them."""
    _trained_bpe(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"__type": "AddedToken", "content": "<|eot|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token == "<|eot|>" and tok.eos_token_id == 1


def test_missing_or_broken_tokenizer_names_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json: is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="tokenizer.json: cannot be read"):
        load_tokenizer(tmp_path)
    byte_level_tokenizer().save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json: is not valid JSON"):
        load_tokenizer(tmp_path)
